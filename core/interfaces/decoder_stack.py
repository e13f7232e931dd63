"""Decoder stacks: a platform's kernel that runs a model's whole layer stack for decode-only steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (hidden (num_tokens, hidden_size), positions (num_tokens,), kv_caches, AttentionMetadata) ->
# the final norm's output (num_tokens, hidden_size)
DecoderStackForward = Callable[[Any, Any, list[Any], Any], Any]


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One pre-norm decoder layer in the Llama layout:
        h = x + o(attention(rotary(qkv(rms_norm(x)))))
        y = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))
    Each projection is the weight its `LinearMethod.decoder_stack_weight` gives (a platform
    kernel's own form, core/interfaces/quantization.py) with an optional bias."""

    input_norm: Any  # (hidden_size,)
    qkv: Any  # (num_heads + 2 num_kv_heads) * head_dim outputs: [q | k | v]
    qkv_bias: Any | None
    o: Any
    o_bias: Any | None
    post_attention_norm: Any  # (hidden_size,)
    gate_up: Any  # 2 * intermediate_size outputs: [gate | up]
    gate_up_bias: Any | None
    down: Any
    down_bias: Any | None


@dataclass(frozen=True)
class DecoderStackSpec:
    """A model's layers for a `DecoderStackKernel`, ending with the final norm."""

    layers: tuple[DecoderLayerWeights, ...]
    final_norm: Any  # (hidden_size,)
    rms_norm_eps: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_scale: float
    # rotary tables (num_positions, rotary_dim), "rotate half" layout (core/layers/rotary.py)
    cos_cache: Any
    sin_cache: Any


class DecoderStackKernel(ABC):
    """Offered by `Platform.decoder_stack_kernel()`. Under torch.compile a one-token step is
    hundreds of small ops, and at small batches their per-op cost outweighs the arithmetic; a
    kernel that runs the stack in one call removes it. Models use it for steps in which every
    request decodes one token (`ModelArchitecture.decode_only_forward`)."""

    @abstractmethod
    def build(self, spec: DecoderStackSpec) -> DecoderStackForward | None:
        """Called once after loading: the stack's forward, or None where this kernel cannot run
        the spec (its weights, dtype or shapes)."""
