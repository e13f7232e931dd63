"""Model architectures: a torch module that runs one step of a batch over the paged KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tessera.core.interfaces.decoder_stack import StackedForward


class ModelArchitecture(ABC):
    """Implemented by a `torch.nn.Module` subclass registered under a Hugging Face architecture name.

    Lifecycle: the model runner constructs it with `(hf_config, model_config, context)`, calls
    `load_weights` with the loader's (name, tensor) stream in Hugging Face naming, then calls
    `forward` once per step and `compute_logits` for the positions that need logits.
    `context` is a `tessera.core.layers.LayerContext` (dtype, device, attention backend,
    tensor-parallel rank/size, quantization method).
    """

    # Hugging Face architecture names this class serves, e.g. ("LlamaForCausalLM",)
    architectures: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def forward(self, input_ids: Any, positions: Any, kv_caches: list[Any], metadata: Any) -> Any:
        """Called every step: input_ids and positions are (num_tokens,); returns hidden states
        (num_tokens, hidden_size)."""

    @abstractmethod
    def compute_logits(self, hidden_states: Any) -> Any:
        """Called every step on the rows that need logits; returns (num_rows, vocab_size) float32."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Called once after construction; returns the names of the parameters it loaded."""

    @abstractmethod
    def kv_cache_spec(self) -> tuple[int, int, int]:
        """Called before the KV cache is allocated: (num_layers, num_kv_heads, head_dim)."""

    def decoder_stack_forward(self) -> StackedForward | None:
        """Called once after loading: a faster `forward` through a platform's decoder stack
        (core/interfaces/decoder_stack.py), run instead of `forward` (compiled or not) for the
        steps it takes (every decode-only step, and steps with prompts where the stack runs them);
        None (the default) where there is none. It must compute what `forward` computes."""
        return None
