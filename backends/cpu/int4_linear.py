"""4-bit GGUF matmuls on CPUs with AVX512-BF16 and VNNI: the weight layout and the `tessera::int4_linear` op.

The kernel (csrc/int4_linear.cpp) multiplies bf16 activations with weights kept as 4-bit groups
of 32 inputs (GGUF Q4_0 / Q4_1) at every batch size. It rounds each group of 32 activations to
8 bits (as llama.cpp does for these formats) and multiplies them with the 4-bit weights in
integer arithmetic (`vpdpbusd`): for one row it reads the 4-bit weights (memory bound, ~2x
faster than torch's int4 kernel), for many rows it splits each group's nibbles once and
multiplies them into up to 8 rows (compute bound: 1.3-1.5x faster than oneDNN's bf16 GEMM at
32-512 rows). A layer using it needs no dequantized bf16 copy of its weight. Measurements:
docs/quantization.md.

`int4_repack` turns (N, K) nibbles and per-group (scale, zero) into the kernel's layout. The CPU
platform offers the kernel to quantization methods as `CpuInt4GroupKernel` (through
`Platform.int4_group_kernel()`, core/interfaces/quantization.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from tessera.backends.cpu import kernels
from tessera.core.interfaces.quantization import Int4GroupKernel

GROUP_SIZE = 32  # inputs per quantization group
BLOCK_COLUMNS = 16  # output columns per weight block


class Int4Blocks(NamedTuple):
    packed: torch.Tensor  # (N/16, K/32, 256) uint8
    scales_mins: torch.Tensor  # (N/16, K/32, 32) float16: the 16 columns' d, then their m (w = d q + m)


@functools.cache
def kernel_available() -> bool:
    """Whether `tessera::int4_linear` runs here: the kernels built, on a CPU with AVX512-BF16 and VNNI.
    Loading them defines the op (in C++); its shape function for the compiler is added here."""
    module = kernels.load()
    if module is None or not module.int4_linear_supported():
        return False
    torch.library.register_fake("tessera::int4_linear")(_int4_linear_shape)
    return True


def _int4_linear_shape(
    x: torch.Tensor, packed: torch.Tensor, scales_mins: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0] * BLOCK_COLUMNS)


def int4_repack(qweight: torch.Tensor, scales_zeros: torch.Tensor) -> Int4Blocks:
    """The kernel's layout from (N, K) nibbles 0..15 and (N, K/32, 2) float (scale, zero), where
    w = (q - 8) * scale + zero. The kernel keeps GGUF's form w = d q + m with d and m in fp16 (as
    GGUF files store them, so exact for those)."""
    out_features, in_features = qweight.shape
    blocks, groups = out_features // BLOCK_COLUMNS, in_features // GROUP_SIZE
    # (block, column j, group, half h, chunk c, byte i): input 16 h + 4 c + i of the group
    q = qweight.to(torch.uint8).reshape(blocks, BLOCK_COLUMNS, groups, 2, 4, 4)
    nibbles = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # (block, column, group, chunk, byte)
    packed = nibbles.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 256).contiguous()
    scale, zero = scales_zeros[..., 0].float(), scales_zeros[..., 1].float()
    scales_mins = torch.stack([scale, zero - 8 * scale])  # (2, N, K/32): d, m
    scales_mins = scales_mins.reshape(2, blocks, BLOCK_COLUMNS, groups).permute(1, 3, 0, 2)
    return Int4Blocks(packed, scales_mins.reshape(blocks, groups, 2 * BLOCK_COLUMNS).to(torch.float16).contiguous())


def int4_linear(x: torch.Tensor, weight: Int4Blocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for bf16 x (..., K); y (..., N) in bf16. Only where `kernel_available()`."""
    return torch.ops.tessera.int4_linear(x, weight.packed, weight.scales_mins, bias)


class CpuInt4GroupKernel(Int4GroupKernel):
    """`tessera::int4_linear` for layers with bf16 activations, whole blocks of 16 outputs and
    whole groups of 32 inputs."""

    def usable(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and out_features % BLOCK_COLUMNS == 0 and in_features % GROUP_SIZE == 0

    def pack(self, qweight: torch.Tensor, scales_zeros: torch.Tensor) -> Int4Blocks:
        return int4_repack(qweight, scales_zeros)

    def linear(self, x: torch.Tensor, packed: Int4Blocks, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, packed, bias)
