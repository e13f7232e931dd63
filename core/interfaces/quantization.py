"""Quantization methods: how linear layers (and embeddings) store and multiply quantized weights."""

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

    def decoder_stack_weight(self, layer: Any) -> Any | None:
        """Called after loading, by models that can use a platform's `DecoderStackKernel`: the
        weight in the form `apply` multiplies with when that is a platform kernel's own (the
        `GroupQuantKernel` layout, a oneDNN-packed tensor), which the stack kernel may take; None
        (the default) where the method has none."""
        return None


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

    def get_embedding_method(self) -> EmbeddingMethod | None:
        """Called by the vocabulary embedding's constructor (unsplit vocabularies only): a method
        that keeps the table in quantized form, or None for a plain weight (the default)."""
        return None


class EmbeddingMethod(ABC):
    """How a vocabulary embedding stores its table, when a quantization method keeps it in its own
    form. The same module is the LM head when the model ties them (core/layers/embedding.py)."""

    @abstractmethod
    def create_weights(self, layer: Any, num_embeddings: int, embedding_dim: int, dtype: Any) -> None:
        """Called in the layer's constructor: register the parameters the checkpoint will fill
        (besides the plain `weight`, which the layer always has)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: Any) -> bool:
        """Called once after all weights are loaded. True: the method serves the layer from now on
        (it may drop `weight`); False: the layer keeps its plain weight and forgets the method."""

    @abstractmethod
    def embedding(self, layer: Any, ids: Any) -> Any:
        """Called in every forward of the embedding: the rows of token `ids`, (..., embedding_dim)."""

    @abstractmethod
    def apply(self, layer: Any, hidden_states: Any) -> Any:
        """Called for the LM head: hidden_states (num_rows, embedding_dim) @ table^T."""


class GroupQuantKernel(ABC):
    """A platform's matmul for weights in groups of 32 inputs with unsigned codes of up to 8 bits
    (GGUF Q4_0 / Q4_1 / Q8_0), offered to quantization methods by `Platform.group_quant_kernel()`.
    The weights arrive as (N, K) uint8 codes q and (N, K / 32, 2) float (scale, zero), meaning
    w = (q - 8) * scale + zero (torch's int4 convention; Q4 codes are 0..15, Q8_0's are its signed
    values + 128)."""

    @abstractmethod
    def usable(self, out_features: int, in_features: int, dtype: Any) -> bool:
        """Called after loading: can a layer of this shape and activation dtype use the kernel?"""

    @abstractmethod
    def pack(self, qweight: Any, scales_zeros: Any) -> Any:
        """Called once per layer after loading: the weight in the kernel's own layout."""

    @abstractmethod
    def linear(self, x: Any, packed: Any, bias: Any | None, out_dtype: Any | None = None) -> Any:
        """Called in every forward: y = x W^T (+ bias) for x (..., K); y (..., N) in x's dtype,
        or in `out_dtype` where given (float32 for logits)."""

    @abstractmethod
    def embedding(self, ids: Any, packed: Any) -> Any:
        """Rows `ids` of W (N, K) from the packed form: (..., K) in the activation dtype."""
