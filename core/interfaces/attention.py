"""Attention backends: how a platform computes attention over the paged KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built once per step by the model runner and shared by all layers.

    Tokens of all scheduled requests are flattened into one sequence of `num_tokens`.
    Request i owns tokens [query_start_loc[i], query_start_loc[i+1]) of the flat batch; they sit
    at positions [seq_lens[i] - query_lens[i], seq_lens[i]) of its sequence.
    All tensors live on the platform's device.
    """

    slot_mapping: Any  # (num_tokens,) int64: cache slot (block_id * block_size + offset) per token
    block_tables: Any  # (num_reqs, max_blocks_per_req) int32, padded with 0
    seq_lens: Any  # (num_reqs,) int32: tokens in cache after this step, per request
    query_start_loc: Any  # (num_reqs + 1,) int32: prefix sums of query lengths
    query_lens_cpu: list[int]  # per request, on the host (for shape decisions without syncs)
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    is_decode_only: bool  # every request computes exactly one token
    # Scratch space for the backend: tensors derived from this layout (gather indices, masks) that
    # the first layer computes and the other layers reuse within the step.
    backend_state: dict[str, Any] = field(default_factory=dict)


class AttentionBackend(ABC):
    """Computes attention for one layer and writes that step's K/V into the paged cache.

    The core creates one backend object per model; each attention layer calls `forward` once per
    step. The KV cache tensor of a layer is made by `allocate_kv_cache`.
    """

    name: str = "abstract"

    @abstractmethod
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: Any, device: Any
    ) -> Any:
        """Called once per attention layer at start-up; returns that layer's cache tensor."""

    @abstractmethod
    def forward(
        self,
        query: Any,  # (num_tokens, num_heads, head_dim)
        key: Any,  # (num_tokens, num_kv_heads, head_dim)
        value: Any,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: Any,
        metadata: AttentionMetadata,
        scale: float,
    ) -> Any:  # (num_tokens, num_heads, head_dim)
        """Called by every attention layer every step: store key/value at metadata.slot_mapping,
        then attend each query token causally to its request's cached tokens."""

    def copy_blocks(self, kv_caches: list[Any], src_to_dst: list[tuple[int, int]]) -> None:
        """Called when blocks are copied (swap in/out); default copies whole blocks."""
        for cache in kv_caches:
            for src, dst in src_to_dst:
                cache[:, dst].copy_(cache[:, src])
