"""`--quantization gguf`: keep a GGUF file's Q4_0 / Q4_1 matrices as 4-bit groups, and a Q8_0 (or
Q4) token embedding as 8-bit (4-bit) groups.

Where the platform offers a kernel for such groups (`Platform.group_quant_kernel()`: the CPU
platform's `tessera::group_quant_linear` on CPUs with AVX512-BF16 and VNNI,
backends/cpu/group_quant_linear.py) and it suits the layer, the layer keeps only the groups in the
kernel's layout, which is faster than the alternatives at every batch size there; the dequantized
weight the loader filled is dropped, so a Q4 layer holds about a quarter of its bf16 size. The
embedding does the same (`GgufEmbeddingMethod`): lookups decode the rows they need and the LM head,
when tied to it, multiplies with the 8-bit table, so the model holds one 30 MB table instead of a
56 MB bf16 one plus oneDNN's 56 MB packed copy for the head.

Elsewhere a linear layer keeps two forms: small batches (decode) are memory-bandwidth bound, so they
multiply with the 4-bit weights through `aten._weight_int4pack_mm_for_cpu`; larger batches are
compute bound, where oneDNN's bf16 GEMM on a dequantized copy (pre-packed for oneDNN,
core/layers/onednn.py) wins; the embedding keeps its plain weight. Layers whose GGUF tensors are
another type (or not on the CPU) keep only the dequantized weight. Measurements and the crossover
are in docs/quantization.md.

The GGUF loader fills two extra parameters per packable matrix when this method is active:
`qweight` (N, K) uint8 codes and `scales_zeros` (N, K / 32, 2) float32 such that
w = (q - 8) * scale + zero per group of 32 inputs: Q4_1 (w = q*d + m) gives scale=d, zero=m+8d;
Q4_0 (w = (q-8)*d) gives scale=d, zero=0; Q8_0 (w = v*d, v signed) gives q = v + 128, scale=d,
zero=-120d (embeddings only: linear layers take Q4 groups).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessera.core.interfaces.quantization import EmbeddingMethod, LinearMethod, QuantizationMethod
from tessera.core.layers.linear import UnquantizedLinearMethod

GROUP_SIZE = 32  # GGUF Q4_0 / Q4_1 block size
# Without tessera::group_quant_linear: at most this many rows go through torch's int4 kernel; above it
# the pre-packed bf16 GEMM is faster (measured on a 2-core x86 CPU, see docs/quantization.md).
MAX_INT4_ROWS = 8


def int4_pack(qweight: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, (K/32, N, 2) scales_and_zeros) for the CPU int4 kernel from (N, K) nibbles
    and (N, K/32, 2) per-group (scale, zero)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qweight.to(torch.int32).contiguous(), 1)
    return packed, scales_zeros.transpose(0, 1).contiguous().to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """y = x W^T with W held as int4 groups of 32; x is (..., K), y is (..., N)."""
    rows = x.reshape(-1, x.shape[-1])  # (num_rows, K)
    if rows.dtype != scales_zeros.dtype:
        rows = rows.to(scales_zeros.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, GROUP_SIZE, scales_zeros)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _loaded_groups(layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Remove the layer's `qweight` / `scales_zeros`; return them if the checkpoint filled every
    group (NaN marks a group no shard filled), else None."""
    qweight = layer._parameters.pop("qweight", None)
    scales_zeros = layer._parameters.pop("scales_zeros", None)
    if qweight is None or scales_zeros is None or bool(torch.isnan(scales_zeros).any()):
        return None
    return qweight.data, scales_zeros.data


def _pack_for_platform_kernel(layer: Any, qweight: torch.Tensor, scales_zeros: torch.Tensor) -> bool:
    """Where the platform's group kernel suits the layer: keep only its packed groups (the plain
    `weight` is deleted) and say True."""
    platform = getattr(layer, "platform", None)
    kernel = platform.group_quant_kernel() if platform is not None else None
    weight = layer.weight
    if kernel is None or not kernel.usable(weight.shape[0], weight.shape[1], weight.dtype):
        return False
    layer.group_kernel = kernel
    layer.group_blocks = kernel.pack(qweight, scales_zeros)
    del layer.weight
    return True


class GgufLinearMethod(LinearMethod):
    """When every shard arrived as Q4: only the 4-bit blocks of `tessera::group_quant_linear` where
    it is usable, else the dequantized weight for big batches plus torch's int4 packs for small ones."""

    def __init__(self, max_int4_rows: int = MAX_INT4_ROWS) -> None:
        self.max_int4_rows = max_int4_rows
        self.dense = UnquantizedLinearMethod()

    def create_weights(self, layer: Any, input_size: int, output_size: int, dtype: Any) -> None:
        self.dense.create_weights(layer, input_size, output_size, dtype)
        layer.group_blocks = None  # the platform kernel's packed weight, when it is used
        layer.group_kernel = None
        layer.int4_weight = None  # torch's int4 packs, otherwise
        if torch.device(layer.device).type != "cpu" or input_size % GROUP_SIZE:
            return
        qweight = torch.zeros(output_size, input_size, dtype=torch.uint8, device=layer.device)
        # NaN marks groups no checkpoint shard filled: then the layer stays dequantized.
        scales_zeros = torch.full((output_size, input_size // GROUP_SIZE, 2), float("nan"), device=layer.device)
        for name, tensor in (("qweight", qweight), ("scales_zeros", scales_zeros)):
            param = nn.Parameter(tensor, requires_grad=False)
            param.output_dim = 0  # type: ignore[attr-defined]
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: Any) -> None:
        groups = _loaded_groups(layer)
        if groups is not None:
            if _pack_for_platform_kernel(layer, *groups):
                return  # the 4-bit blocks serve every batch size
            layer.int4_weight = int4_pack(*groups, layer.weight.dtype)
        # else not every shard was Q4_0 / Q4_1: only the dequantized weight is used
        self.dense.process_weights_after_loading(layer)

    def apply(self, layer: Any, x: Any, bias: Any | None) -> Any:
        if layer.group_blocks is not None:
            return layer.group_kernel.linear(x, layer.group_blocks, bias)
        if layer.int4_weight is None or x.numel() > self.max_int4_rows * x.shape[-1]:
            return self.dense.apply(layer, x, bias)
        y = int4_linear(x, *layer.int4_weight, layer.weight.shape[0])
        return y if bias is None else y + bias

    def decoder_stack_weight(self, layer: Any) -> Any | None:
        if layer.group_blocks is not None:
            return layer.group_blocks
        return self.dense.decoder_stack_weight(layer) if layer.int4_weight is None else None


class GgufEmbeddingMethod(EmbeddingMethod):
    """A Q8_0 / Q4 token table in the platform kernel's layout, where it has one that suits the
    table: lookups decode the rows asked for, the (tied) LM head multiplies with it directly."""

    def create_weights(self, layer: Any, num_embeddings: int, embedding_dim: int, dtype: Any) -> None:
        layer.group_blocks = None
        layer.group_kernel = None
        if torch.device(layer.weight.device).type != "cpu" or embedding_dim % GROUP_SIZE:
            return
        device = layer.weight.device
        qweight = torch.zeros(num_embeddings, embedding_dim, dtype=torch.uint8, device=device)
        scales_zeros = torch.full((num_embeddings, embedding_dim // GROUP_SIZE, 2), float("nan"), device=device)
        for name, tensor in (("qweight", qweight), ("scales_zeros", scales_zeros)):
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def process_weights_after_loading(self, layer: Any) -> bool:
        groups = _loaded_groups(layer)  # None: the file's table is another type
        return groups is not None and _pack_for_platform_kernel(layer, *groups)

    def embedding(self, layer: Any, ids: Any) -> Any:
        return layer.group_kernel.embedding(ids, layer.group_blocks)

    def apply(self, layer: Any, hidden_states: Any) -> Any:
        # float32 logits: bf16 ones are steps of 0.125 at 16-32, which can tie the top two tokens
        return layer.group_kernel.linear(hidden_states, layer.group_blocks, None, torch.float32)


class GgufQuantization(QuantizationMethod):
    """Registered as `gguf`; the default for GGUF files (see the GGUF loader)."""

    name = "gguf"

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any] | None) -> GgufQuantization:
        return cls()

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return GgufLinearMethod()

    def get_embedding_method(self) -> EmbeddingMethod:
        return GgufEmbeddingMethod()
