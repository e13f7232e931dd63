"""Decoder stacks: a platform's kernel that runs a model's whole layer stack for a step in one call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class DecoderStackForward(ABC):
    """A built stack. Every stack runs decode-only steps (each request computes one token);
    `runs_prefills` says whether it also runs steps with prompts or chunks of them."""

    runs_prefills: bool = False

    @abstractmethod
    def __call__(
        self, hidden: Any, positions: Any, kv_caches: list[Any], metadata: Any, output_rows: Any | None = None
    ) -> Any:
        """hidden (num_tokens, hidden_size), the embedded tokens; positions (num_tokens,); the
        step's `AttentionMetadata`; output_rows (num_outputs,) int64, the rows whose outputs the
        step uses (the tokens it samples from), or None for all. Returns the final norm's output
        for those rows, (num_outputs or num_tokens, hidden_size). Every row's keys and values are
        stored either way; a stack may skip the rest of the last layer for the other rows."""


@dataclass(frozen=True)
class StackedForward:
    """A model's forward through a stack: embed the tokens, then run the stack. What
    `ModelArchitecture.decoder_stack_forward` returns; the model runner calls it for the steps it
    `takes`, and the model's own forward for the rest."""

    embed: Callable[[Any], Any]  # input_ids (num_tokens,) -> (num_tokens, hidden_size)
    stack: DecoderStackForward

    @property
    def runs_every_step(self) -> bool:
        return self.stack.runs_prefills

    def takes(self, metadata: Any) -> bool:
        return bool(metadata.is_decode_only) or self.stack.runs_prefills

    def __call__(
        self, input_ids: Any, positions: Any, kv_caches: list[Any], metadata: Any, output_rows: Any | None = None
    ) -> Any:
        return self.stack(self.embed(input_ids), positions, kv_caches, metadata, output_rows)


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
    kernel that runs the stack in one call removes it. Models use it through
    `ModelArchitecture.decoder_stack_forward`. A stack that runs steps with prompts too spares the
    model its compiled graph, and the start-up its compile time."""

    @abstractmethod
    def build(self, spec: DecoderStackSpec) -> DecoderStackForward | None:
        """Called once after loading: the stack's forward, or None where this kernel cannot run
        the spec (its weights, dtype or shapes)."""
