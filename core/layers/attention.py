"""The attention layer: reshapes q/k/v into heads and hands them to the platform's AttentionBackend."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.layers import LayerContext, divide


class Attention(nn.Module):
    """Causal attention over the paged KV cache of one layer, for this rank's heads."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        context: LayerContext,
        scale: float | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_heads = divide(num_heads, context.tp_size)
        self.num_kv_heads = max(1, num_kv_heads // context.tp_size)
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.backend = context.attention_backend
        self.prefix = prefix

    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads * head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads * head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads * head_dim)
        kv_cache: Any,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # (num_tokens, num_heads * head_dim)
        num_tokens = query.shape[0]
        out = self.backend.forward(
            query.view(num_tokens, self.num_heads, self.head_dim),
            key.view(num_tokens, self.num_kv_heads, self.head_dim),
            value.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv_cache,
            metadata,
            self.scale,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
