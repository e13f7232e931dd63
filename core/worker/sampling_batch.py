"""Build the sampler's SamplingBatch from the per-request states of one step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.core.sampling_params import SamplingParams
from tessera.core.worker.sampler import SamplingBatch


@dataclass
class RequestState:
    """What the model runner remembers about a request between steps."""

    request_id: str
    token_ids: list[int]  # prompt + outputs; the runner appends each sampled token
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    prompt_logprobs: list = field(default_factory=list)
    _fixed_bias: tuple[torch.Tensor | None] | None = field(default=None, repr=False, compare=False)
    _prompt_vocab: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def fixed_bias(self, vocab_size: int) -> torch.Tensor | None:
        """logit_bias and allowed_token_ids as one additive (vocab,) row, or None. It is the same at
        every step, so it is built once: built per step, a bias over the whole vocabulary (49k
        entries) took ~250 ms a step, for every request in the batch."""
        if self._fixed_bias is None:
            self._fixed_bias = (_fixed_bias_row(self.sampling_params, vocab_size),)
        return self._fixed_bias[0]

    def prompt_vocab(self) -> torch.Tensor:
        """The distinct token ids of the prompt (the repetition penalty's "seen" set), made once:
        made at every step from a 6k-token prompt it cost ~0.4 ms a request."""
        if self._prompt_vocab is None:
            self._prompt_vocab = torch.tensor(self.token_ids[: self.num_prompt_tokens], dtype=torch.long).unique()
        return self._prompt_vocab


def _banned_until_min_tokens(params: SamplingParams) -> list[int]:
    banned = list(params.stop_token_ids)
    if not params.ignore_eos:
        banned += list(params.eos_token_ids)
    return banned


def _fixed_bias_row(params: SamplingParams, vocab_size: int) -> torch.Tensor | None:
    if not params.logit_bias and params.allowed_token_ids is None:
        return None
    bias = torch.zeros(vocab_size, dtype=torch.float32)
    if params.allowed_token_ids is not None:
        bias.fill_(float("-inf"))
        bias[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = 0.0
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        inside = ids < vocab_size
        bias.index_add_(0, ids[inside], values[inside])
    return bias


def _bias_row(state: RequestState, vocab_size: int) -> torch.Tensor | None:
    """Additive (vocab,) bias: logit_bias, allowed_token_ids and the min_tokens ban; None if none."""
    params = state.sampling_params
    fixed = state.fixed_bias(vocab_size)
    banned = _banned_until_min_tokens(params) if state.num_output_tokens < params.min_tokens else []
    if not banned:
        return fixed
    bias = fixed.clone() if fixed is not None else torch.zeros(vocab_size, dtype=torch.float32)
    bias[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    return bias


def _penalty_tensors(states: list[RequestState], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(len(states), vocab_size, dtype=torch.float32)
    prompt_mask = torch.zeros(len(states), vocab_size, dtype=torch.bool)
    for row, state in enumerate(states):
        if not state.sampling_params.needs_penalties:
            continue
        outputs = torch.tensor(state.token_ids[state.num_prompt_tokens :], dtype=torch.long)
        counts[row].scatter_add_(0, outputs, torch.ones(len(outputs), dtype=torch.float32))
        prompt_mask[row, state.prompt_vocab()] = True
    return counts, prompt_mask


def build_sampling_batch(states: list[RequestState], vocab_size: int, device: torch.device) -> SamplingBatch:
    """One row per state, in order."""
    params = [s.sampling_params for s in states]
    temperature = torch.tensor([0.0 if p.is_greedy else p.temperature for p in params], dtype=torch.float32)
    all_greedy = all(p.is_greedy for p in params)
    any_top_k = any(p.top_k > 0 for p in params)
    any_top_p = any(p.top_p < 1.0 for p in params)
    any_min_p = any(p.min_p > 0.0 for p in params)
    any_penalty = any(p.needs_penalties for p in params)

    bias_rows = [_bias_row(s, vocab_size) for s in states]
    logit_bias = None
    if any(row is not None for row in bias_rows):
        logit_bias = torch.stack([r if r is not None else torch.zeros(vocab_size) for r in bias_rows])

    counts = prompt_mask = None
    if any_penalty:
        counts, prompt_mask = _penalty_tensors(states, vocab_size)

    logprob_rows = [(row, p.logprobs) for row, p in enumerate(params) if p.logprobs is not None]
    seeded_rows = [
        (row, p.seed, s.num_output_tokens)
        for row, (p, s) in enumerate(zip(params, states))
        if p.seed is not None and not p.is_greedy
    ]

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return SamplingBatch(
        temperature=temperature.to(device),
        all_greedy=all_greedy,
        # a top_k at or above the vocabulary keeps every token (any size is valid, 10**20 included)
        top_k=tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], torch.long)
        if any_top_k
        else None,
        top_p=tensor([p.top_p for p in params], torch.float32) if any_top_p else None,
        min_p=tensor([p.min_p for p in params], torch.float32) if any_min_p else None,
        presence_penalty=tensor([p.presence_penalty for p in params], torch.float32) if any_penalty else None,
        frequency_penalty=tensor([p.frequency_penalty for p in params], torch.float32) if any_penalty else None,
        repetition_penalty=tensor([p.repetition_penalty for p in params], torch.float32) if any_penalty else None,
        output_token_counts=counts.to(device) if counts is not None else None,
        prompt_token_mask=prompt_mask.to(device) if prompt_mask is not None else None,
        logit_bias=logit_bias.to(device) if logit_bias is not None else None,
        grammar_bitmask=None,
        grammar_rows=None,
        seeded_rows=seeded_rows,
        logprob_rows=logprob_rows,
    )
