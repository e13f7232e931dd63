"""CPU attention over the paged KV cache.

Each step's requests split into decodes (one query token) and prefills (a prompt or a chunk of
one). Decodes are computed together, straight from the block tables, by the C++ kernel in
csrc/paged_attention.cpp (or, without a compiler, by a gather into a padded batch and two grouped
matmuls). Prefills, for bf16 caches with the head sizes it is built for, also run together in one
C++ call that reads the cache through the block tables; otherwise each is one SDPA call: on its
own K/V when the whole sequence is in this step, else on its cached K/V gathered by slot with a
causal mask offset to the chunk's position. What the step's layout implies (which rows decode, the gather
indices, the masks) is computed by the first layer and reused by the others. In a decode-only
step each layer is a single C++ call that stores the step's keys and values and attends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tessera.backends.cpu import kernels
from tessera.core.interfaces.attention import AttentionBackend, AttentionMetadata


@dataclass
class _Prefill:
    tokens: slice  # this request's rows in the flat batch
    seq_len: int  # tokens of its sequence so far, this step's included
    table: torch.Tensor  # its block table
    block_size: int

    @property
    def is_fresh(self) -> bool:
        """The whole sequence is in this step (no cached tokens before it)."""
        return self.tokens.stop - self.tokens.start == self.seq_len

    # For the SDPA path only (the C++ prefill kernel reads the block table itself), so made on
    # first use and kept for the step's other layers: a long chunk's mask is megabytes.
    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """(seq_len,) cache slots of the whole sequence."""
        return _slots(self.table, self.seq_len, self.block_size)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(query_len, seq_len) bool causal mask at the chunk's offset."""
        query_len = self.tokens.stop - self.tokens.start
        rows = torch.arange(self.seq_len - query_len, self.seq_len).unsqueeze(1)
        return torch.arange(self.seq_len).unsqueeze(0) <= rows


@dataclass
class _StepPlan:
    decode_rows: torch.Tensor | None  # flat indices of decode tokens; None when every row decodes
    decode_tables: torch.Tensor  # (num_decodes, max_blocks) int32
    decode_seq_lens: torch.Tensor  # (num_decodes,) int32
    decode_seq_lens_cpu: list[int]
    prefills: list[_Prefill]
    # the prefills for the C++ prefill kernel: their first rows, query lengths, sequence
    # lengths and block tables (int32, one row per prefill)
    prefill_starts: torch.Tensor | None = None
    prefill_query_lens: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
    prefill_tables: torch.Tensor | None = None
    # torch fallback for decodes (no kernel): padded gather indices and the length mask
    gather_slots: torch.Tensor | None = None  # (num_decodes, max_seq_len) int64
    gather_mask: torch.Tensor | None = None  # (num_decodes, 1, 1, max_seq_len) bool


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kwargs: Any) -> torch.Tensor:
    """q (..., num_heads, q_len, d), k/v (..., num_kv_heads, k_len, d) with grouped heads."""
    if q.dim() == 3:
        # torch's CPU flash-attention kernel takes only batched (4-d) inputs; 3-d ones fall back
        # to the unfused math path, 3-5x slower for a 300-600 token prompt
        return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale, **kwargs).squeeze(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[-3] != q.shape[-3], **kwargs)


def _decode_matmul(
    query: torch.Tensor,  # (num_reqs, num_heads, head_dim)
    keys: torch.Tensor,  # (num_reqs, num_kv_heads, max_seq_len, head_dim)
    values: torch.Tensor,
    mask: torch.Tensor,  # (num_reqs, 1, 1, max_seq_len) bool
    scale: float,
) -> torch.Tensor:  # (num_reqs, num_heads, head_dim)
    """One-query attention as two grouped matmuls with a float32 softmax (the torch fallback)."""
    num_reqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    q = query.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # (num_reqs, num_kv_heads, group, max_seq_len)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(values.dtype)
    return (probs @ values).view(num_reqs, num_heads, head_dim)


def _slots(table: torch.Tensor, length: int, block_size: int, seq_len: int | None = None) -> torch.Tensor:
    """Cache slots of positions [0, length) of a sequence with block table `table`. Positions at
    or past `seq_len` (padding) repeat the last real slot, so padding never reads unwritten memory."""
    positions = torch.arange(length, device=table.device)
    if seq_len is not None:
        positions = positions.clamp(max=seq_len - 1)
    return table.long()[positions // block_size] * block_size + positions % block_size


def step_plan(metadata: AttentionMetadata, with_kernels: bool) -> _StepPlan:
    """What a step's layout implies for attention (which rows decode, the prefills, the index
    tensors the kernels or the torch fallback take), made by the first layer that asks and kept
    in the step's metadata for the others (the decoder stack, backends/cpu/decoder_stack.py, asks
    too)."""
    plan = metadata.backend_state.get("cpu")
    if plan is None:
        plan = metadata.backend_state["cpu"] = _make_plan(metadata, with_kernels)
    return plan


def _make_plan(metadata: AttentionMetadata, with_kernels: bool) -> _StepPlan:
    block_size = metadata.block_size
    decodes: list[int] = []  # request indexes
    decode_rows: list[int] = []
    prefills: list[_Prefill] = []
    start = 0
    for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu)):
        if query_len == 1:
            decodes.append(index)
            decode_rows.append(start)
        else:  # a prompt, a later chunk of one, or a prompt whose prefix was cached
            prefills.append(_Prefill(slice(start, start + query_len), seq_len, metadata.block_tables[index], block_size))
        start += query_len
    index_tensor = torch.tensor(decodes, dtype=torch.long)
    all_decode = len(decodes) == len(metadata.query_lens_cpu)
    plan = _StepPlan(
        decode_rows=None if all_decode else torch.tensor(decode_rows, dtype=torch.long),
        decode_tables=(metadata.block_tables if all_decode else metadata.block_tables[index_tensor]).contiguous(),
        decode_seq_lens=(metadata.seq_lens if all_decode else metadata.seq_lens[index_tensor]).contiguous(),
        decode_seq_lens_cpu=[metadata.seq_lens_cpu[i] for i in decodes],
        prefills=prefills,
    )
    if prefills and with_kernels:
        indexes = [i for i, n in enumerate(metadata.query_lens_cpu) if n > 1]
        plan.prefill_starts = torch.tensor([p.tokens.start for p in prefills], dtype=torch.int32)
        plan.prefill_query_lens = torch.tensor([metadata.query_lens_cpu[i] for i in indexes], dtype=torch.int32)
        plan.prefill_seq_lens = torch.tensor([metadata.seq_lens_cpu[i] for i in indexes], dtype=torch.int32)
        plan.prefill_tables = metadata.block_tables[torch.tensor(indexes)].to(torch.int32).contiguous()
    if decodes and not with_kernels:
        max_len = max(plan.decode_seq_lens_cpu)
        plan.gather_slots = torch.stack(
            [
                _slots(table, max_len, block_size, seq_len)
                for table, seq_len in zip(plan.decode_tables, plan.decode_seq_lens_cpu, strict=True)
            ]
        )
        lengths = plan.decode_seq_lens.long().view(-1, 1, 1, 1)
        plan.gather_mask = torch.arange(max_len).view(1, 1, 1, -1) < lengths
    return plan


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, use_kernel: bool = True) -> None:
        self.kernels = kernels.load() if use_kernel else None
        # head sizes the C++ prefill kernel is built for on this CPU (bf16 caches; else SDPA)
        self.prefill_head_dims = set(self.kernels.prefill_attention_head_dims()) if self.kernels else set()

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: Any, device: Any
    ) -> torch.Tensor:
        # (2, num_blocks, block_size, num_kv_heads, head_dim): index 0 keys, 1 values. Left
        # uninitialized, so the OS backs a block with memory only once it is first written: every
        # slot is written before anything reads it, and no path reads past a sequence's length.
        return torch.empty(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)

    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        if key.dtype != kv_cache.dtype:
            key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
        plan = step_plan(metadata, with_kernels=self.kernels is not None)
        if self.kernels is not None and not plan.prefills:  # decode-only: one C++ call stores and attends
            return self.kernels.paged_decode_step(
                query, key, value, kv_cache, metadata.slot_mapping, plan.decode_tables, plan.decode_seq_lens, scale
            )
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # (num_slots, num_kv_heads, head_dim)
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
        if self.kernels is not None:
            self.kernels.write_kv_cache(kv_cache, key, value, metadata.slot_mapping)
        else:
            key_cache.index_copy_(0, metadata.slot_mapping, key)
            value_cache.index_copy_(0, metadata.slot_mapping, value)
        if not plan.prefills:  # decode-only step: no scatter needed
            return self._decode(query, kv_cache, key_cache, value_cache, plan, scale)
        out = torch.empty_like(query)
        if plan.decode_rows is not None and len(plan.decode_rows):
            rows = plan.decode_rows
            out[rows] = self._decode(query[rows], kv_cache, key_cache, value_cache, plan, scale)
        if self._prefill_kernel_takes(query, kv_cache):
            assert plan.prefill_tables is not None
            self.kernels.paged_prefill_attention(
                out, query.contiguous(), kv_cache[0], kv_cache[1], plan.prefill_tables, plan.prefill_starts,
                plan.prefill_query_lens, plan.prefill_seq_lens, scale,
            )
            return out
        for prefill in plan.prefills:
            out[prefill.tokens] = self._prefill(query, key, value, key_cache, value_cache, prefill, scale)
        return out

    def _prefill_kernel_takes(self, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether the C++ prefill kernel is built for this step's layout (bf16, its head sizes)."""
        return (
            self.kernels is not None
            and query.dtype == torch.bfloat16
            and kv_cache.dtype == torch.bfloat16
            and query.shape[-1] in self.prefill_head_dims
        )

    # -- decodes ----------------------------------------------------------------------------------
    def _decode(
        self,
        query: torch.Tensor,  # (num_decodes, num_heads, head_dim)
        kv_cache: torch.Tensor,
        key_cache: torch.Tensor,  # (num_slots, num_kv_heads, head_dim)
        value_cache: torch.Tensor,
        plan: _StepPlan,
        scale: float,
    ) -> torch.Tensor:
        query = query.contiguous()
        if self.kernels is not None:
            out = torch.empty_like(query)
            self.kernels.paged_decode_attention(
                out, query, kv_cache[0], kv_cache[1], plan.decode_tables, plan.decode_seq_lens, scale
            )
            return out
        assert plan.gather_slots is not None and plan.gather_mask is not None
        num_reqs, max_len = plan.gather_slots.shape
        flat = plan.gather_slots.view(-1)
        keys = key_cache.index_select(0, flat).view(num_reqs, max_len, *key_cache.shape[1:]).transpose(1, 2)
        values = value_cache.index_select(0, flat).view(num_reqs, max_len, *value_cache.shape[1:]).transpose(1, 2)
        if query.dtype == torch.float32:
            return _sdpa(query.unsqueeze(2), keys, values, scale, attn_mask=plan.gather_mask).squeeze(2)
        return _decode_matmul(query, keys, values, plan.gather_mask, scale)

    # -- prefills ---------------------------------------------------------------------------------
    @staticmethod
    def _prefill(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        prefill: _Prefill,
        scale: float,
    ) -> torch.Tensor:  # (query_len, num_heads, head_dim)
        q = query[prefill.tokens].transpose(0, 1)  # (num_heads, query_len, head_dim)
        if prefill.is_fresh:  # the whole sequence is in this step
            k, v = key[prefill.tokens].transpose(0, 1), value[prefill.tokens].transpose(0, 1)
            return _sdpa(q, k, v, scale, is_causal=True).transpose(0, 1)
        k = key_cache.index_select(0, prefill.slots).transpose(0, 1)  # (num_kv_heads, seq_len, head_dim)
        v = value_cache.index_select(0, prefill.slots).transpose(0, 1)
        return _sdpa(q, k.to(q.dtype), v.to(q.dtype), scale, attn_mask=prefill.mask).transpose(0, 1)
