"""The attention layer: reshapes q/k/v into heads and hands them to the platform's AttentionBackend.

Under `torch.compile` the layer is one opaque custom op, `tessera::attention`: the compiled graph
holds only tensors that are the same kind every step, while the step's KV caches and layout
(Python lists that change every step) reach the backend through `step_context`, which the model
runner enters around each compiled forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.layers import LayerContext, divide


class _Step:
    layers: Sequence[Attention] = ()
    kv_caches: Sequence[Any] = ()
    metadata: AttentionMetadata | None = None


_step = _Step()


@contextlib.contextmanager
def step_context(layers: Sequence[Attention], kv_caches: Sequence[Any], metadata: AttentionMetadata) -> Iterator[None]:
    """Make this step's caches and layout visible to `tessera::attention` (layer i uses kv_caches[i])."""
    _step.layers, _step.kv_caches, _step.metadata = layers, kv_caches, metadata
    try:
        yield
    finally:
        _step.layers, _step.kv_caches, _step.metadata = (), (), None


# Registered with `torch.library.Library` rather than `torch.library.custom_op`: the dispatcher then
# calls the Python function directly, where `custom_op` adds its own wrappers (autograd and a
# Dynamo-disabling layer), ~5 us a call, once per layer and step (docs/benchmarks.md).
_library = torch.library.Library("tessera", "FRAGMENT")
_library.define("attention(Tensor query, Tensor key, Tensor value, int layer_index) -> Tensor")


def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_index: int) -> torch.Tensor:
    if _step.metadata is None:
        raise RuntimeError("tessera::attention called outside step_context")
    layer = _step.layers[layer_index]
    return layer.attend(query, key, value, _step.kv_caches[layer_index], _step.metadata)


_library.impl("attention", _attention_op, "CompositeExplicitAutograd")


@torch.library.register_fake("tessera::attention")
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_index: int) -> torch.Tensor:
    return torch.empty_like(query)


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
        self.layer_index = -1  # position among the model's attention layers; set by the model runner

    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads * head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads * head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads * head_dim)
        kv_cache: Any,
        metadata: AttentionMetadata | None,
    ) -> torch.Tensor:  # (num_tokens, num_heads * head_dim)
        if torch.compiler.is_compiling():  # caches and layout come from step_context
            return torch.ops.tessera.attention(query.contiguous(), key.contiguous(), value.contiguous(), self.layer_index)
        assert metadata is not None
        return self.attend(query, key, value, kv_cache, metadata)

    def attend(
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
