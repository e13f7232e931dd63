"""The model runner: turns a SchedulerOutput into batch tensors, runs the model, samples."""

from __future__ import annotations

import logging
from typing import Any

import torch

from tessera.core.engine.types import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.worker.compilation import CompiledForward
from tessera.core.worker.sampler import sample, token_logprobs
from tessera.core.worker.sampling_batch import RequestState, build_sampling_batch

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, its KV cache tensors and the per-request state between steps.

    It never decides what runs: each step it computes exactly what the SchedulerOutput says.
    """

    def __init__(
        self, loaded: Any, block_size: int, num_blocks: int, num_swap_blocks: int = 0, compile_model: bool = False
    ) -> None:
        self.model = loaded.model
        self.device: torch.device = loaded.device
        self.dtype: torch.dtype = loaded.dtype
        self.vocab_size: int = loaded.vocab_size
        self.attention_backend = loaded.attention_backend
        self.block_size = block_size
        num_layers, num_kv_heads, head_dim = self.model.kv_cache_spec()
        self.kv_caches = [
            self.attention_backend.allocate_kv_cache(
                num_blocks, block_size, num_kv_heads, head_dim, self.dtype, self.device
            )
            for _ in range(num_layers)
        ]
        # swap space lives in host memory: (2, num_swap_blocks, block_size, kv_heads, head_dim)
        self.swap_caches = [
            torch.empty(2, num_swap_blocks, block_size, num_kv_heads, head_dim, dtype=self.dtype)
            for _ in range(num_layers if num_swap_blocks else 0)
        ]
        self.requests: dict[str, RequestState] = {}
        # the platform's decoder stack, if the model has one (core/interfaces/decoder_stack.py):
        # it runs every decode-only step, and every step where it runs prompts too
        self.decoder_stack = self.model.decoder_stack_forward()
        if self.decoder_stack is not None:
            steps = "every step" if self.decoder_stack.runs_every_step else "decode-only steps"
            logger.info("%s run through the platform's decoder stack kernel", steps)
        # the forward pass for the other steps: the model itself, or its torch.compile'd form
        # (see compilation.py), which is not needed when the stack runs every step
        self.forward: Any = self.model
        self.compile_seconds: float | None = None
        if compile_model and not (self.decoder_stack is not None and self.decoder_stack.runs_every_step):
            compiled = CompiledForward(self.model)
            # a one-token step is always decode-only, so with a stack that graph would never run
            self.compile_seconds = compiled.warm_up(
                self.kv_caches, block_size, self.device, single_token=self.decoder_stack is None
            )
            self.forward = compiled

    # -- state -------------------------------------------------------------------------------
    def _update_states(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in out.new_requests:
            self.requests[new.request_id] = RequestState(
                request_id=new.request_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _swap(self, out: SchedulerOutput) -> None:
        for device_cache, swap_cache in zip(self.kv_caches, self.swap_caches):
            for device_block, swap_block in out.blocks_to_swap_out:
                swap_cache[:, swap_block].copy_(device_cache[:, device_block])
            for swap_block, device_block in out.blocks_to_swap_in:
                device_cache[:, device_block].copy_(swap_cache[:, swap_block])

    # -- inputs ------------------------------------------------------------------------------
    def _prepare_inputs(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[RequestState], list[int]]:
        """Flatten the batch. Returns input ids, positions, attention metadata, the states that
        sample this step and the flat index of each one's last token."""
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sampling_states: list[RequestState] = []
        sample_indices: list[int] = []
        for request_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.requests[request_id]
            start = state.num_computed_tokens
            end = start + num_tokens
            input_ids.extend(state.token_ids[start:end])
            span = range(start, end)
            positions.extend(span)
            table = state.block_ids
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            query_lens.append(num_tokens)
            seq_lens.append(end)
            tables.append(table)
            if end == len(state.token_ids):
                sampling_states.append(state)
                sample_indices.append(len(input_ids) - 1)
        # one tensor from padded lists: filling it row by row costs ~0.25 ms at 32 requests
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        query_start = [0]
        for length in query_lens:
            query_start.append(query_start[-1] + length)
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=block_tables.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
            is_decode_only=all(q == 1 for q in query_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        return ids, pos, metadata, sampling_states, sample_indices

    # -- prompt logprobs -----------------------------------------------------------------------
    def _prompt_logprobs(
        self, out: SchedulerOutput, hidden: torch.Tensor
    ) -> dict[str, list[TokenLogprobs | None]]:
        result: dict[str, list[TokenLogprobs | None]] = {}
        offset = 0
        for request_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.requests[request_id]
            k = state.sampling_params.prompt_logprobs
            start = state.num_computed_tokens
            flat_start = offset
            offset += num_tokens
            if k is None or start >= state.num_prompt_tokens:
                continue
            # logits at position p score the prompt token at p + 1
            last = min(start + num_tokens, state.num_prompt_tokens - 1)
            entries: list[TokenLogprobs | None] = [None] if start == 0 else []
            if last > start:
                rows = hidden[flat_start : flat_start + (last - start)]
                logprobs = self.model.compute_logits(rows).float().log_softmax(dim=-1)
                targets = torch.tensor(state.token_ids[start + 1 : last + 1], device=logprobs.device)
                entries += token_logprobs(logprobs, targets, [k] * len(targets))
            result[request_id] = entries
        return result

    # -- step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        if self.swap_caches and (out.blocks_to_swap_out or out.blocks_to_swap_in):
            self._swap(out)
        if out.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        input_ids, positions, metadata, states, sample_indices = self._prepare_inputs(out)
        stack = self.decoder_stack
        wants_prompt_logprobs = _wants_prompt_logprobs(out, self.requests)
        if stack is not None and stack.takes(metadata) and not wants_prompt_logprobs:
            # the stack carries only the sampled rows through the rest of its last layer
            output_rows = torch.tensor(sample_indices, dtype=torch.long, device=self.device)
            sampled_hidden = stack(input_ids, positions, self.kv_caches, metadata, output_rows)
            prompt_logprobs = {}
        else:
            forward = stack if stack is not None and stack.takes(metadata) else self.forward
            hidden = forward(input_ids, positions, self.kv_caches, metadata)  # (num_tokens, hidden)
            prompt_logprobs = self._prompt_logprobs(out, hidden) if wants_prompt_logprobs else {}
            sampled_hidden = hidden[sample_indices]
        if not states:
            return ModelRunnerOutput(sampled_token_ids={}, prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(sampled_hidden)  # (num_sampling, vocab)
        batch = build_sampling_batch(states, self.vocab_size, self.device)
        if out.grammar_bitmask is not None:
            rows = [i for i, s in enumerate(states) if s.request_id in out.structured_output_rows]
            batch.grammar_bitmask = out.grammar_bitmask[
                [out.structured_output_rows[states[i].request_id] for i in rows]
            ]
            batch.grammar_rows = rows
        tokens, row_logprobs = sample(logits, batch)
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        for row, (state, token) in enumerate(zip(states, tokens)):
            state.token_ids.append(token)
            sampled[state.request_id] = token
            if row in row_logprobs:
                logprobs[state.request_id] = row_logprobs[row]
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _wants_prompt_logprobs(out: SchedulerOutput, requests: dict[str, RequestState]) -> bool:
    return any(
        requests[r].sampling_params.prompt_logprobs is not None
        and requests[r].num_computed_tokens < requests[r].num_prompt_tokens
        for r in out.num_scheduled_tokens
    )
