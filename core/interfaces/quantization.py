"""Quantization methods: how linear layers store and multiply quantized weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class LinearMethod(ABC):
    """The arithmetic of one linear layer. `tessera.core.layers.linear` ships the unquantized one."""

    @abstractmethod
    def create_weights(self, layer: Any, input_size: int, output_size: int, dtype: Any) -> None:
        """Called in the layer's constructor: register the parameters the checkpoint will fill."""

    def process_weights_after_loading(self, layer: Any) -> None:
        """Called once after all weights are loaded (repacking, transposing, ...)."""

    @abstractmethod
    def apply(self, layer: Any, x: Any, bias: Any | None) -> Any:
        """Called in every forward: y = x W^T (+ bias)."""


class QuantizationMethod(ABC):
    """Registered under a `--quantization` name."""

    name: str = "abstract"

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any] | None) -> QuantizationMethod:
        """Called at start-up with the checkpoint's quantization_config (or None)."""
        return cls()

    @abstractmethod
    def get_linear_method(self, prefix: str) -> LinearMethod:
        """Called by each linear layer's constructor; `prefix` is its parameter path."""


class Int4GroupKernel(ABC):
    """A platform's matmul for weights in 4-bit groups of 32 inputs (GGUF Q4_0 / Q4_1), offered to
    quantization methods by `Platform.int4_group_kernel()`. The weights arrive as (N, K) nibbles
    q in 0..15 and (N, K / 32, 2) float (scale, zero), meaning w = (q - 8) * scale + zero."""

    @abstractmethod
    def usable(self, out_features: int, in_features: int, dtype: Any) -> bool:
        """Called after loading: can a layer of this shape and activation dtype use the kernel?"""

    @abstractmethod
    def pack(self, qweight: Any, scales_zeros: Any) -> Any:
        """Called once per layer after loading: the weight in the kernel's own layout."""

    @abstractmethod
    def linear(self, x: Any, packed: Any, bias: Any | None) -> Any:
        """Called in every forward: y = x W^T (+ bias) for x (..., K); y (..., N) in x's dtype."""
