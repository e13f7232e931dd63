"""GGUF matmuls on CPUs with AVX512-BF16 and VNNI: the weight layout and the `tessera::group_quant_linear` op.

The kernel (csrc/group_quant_linear.cpp) multiplies bf16 activations with weights kept as 4- or
8-bit codes in groups of 32 inputs (GGUF Q4_0, Q4_1, Q8_0) at every batch size. 4-bit layers keep
bf16 activations: each group's nibbles become bf16 with one unpack instruction and are multiplied
into up to 8 rows with `vdpbf16ps` (memory bound at one row, ~1.4x faster than torch's int4
kernel; compute bound and close to oneDNN's bf16 GEMM at hundreds of rows). 8-bit tables (the LM
head) round each group of 32 activations to 8 bits and multiply in integer arithmetic
(`vpdpbusd`): 4x faster than the packed bf16 head at one row. A layer using it needs no
dequantized bf16 copy of its weight. An embedding table kept this way serves lookups too
(`embedding`), so a tied embedding and LM head share one 8-bit copy. Measurements:
docs/quantization.md.

`repack` turns (N, K) codes and per-group (scale, zero) into the kernel's layout. The CPU
platform offers the kernel to quantization methods as `CpuGroupQuantKernel` (through
`Platform.group_quant_kernel()`, core/interfaces/quantization.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from tessera.backends.cpu import kernels
from tessera.core.interfaces.quantization import GroupQuantKernel

GROUP_SIZE = 32  # inputs per quantization group
BLOCK_COLUMNS = 16  # output columns per weight block
_CHUNK = 64  # bytes: 16 columns x 4 inputs, what one `vpdpbusd` takes


class GroupQuantBlocks(NamedTuple):
    packed: torch.Tensor  # (N/16, K/32, 256) uint8 for 4-bit codes, (N/16, K/32, 512) for 8-bit
    scales_mins: torch.Tensor  # (N/16, K/32, 32) float16: the 16 columns' d, then their m (w = d q + m)


@functools.cache
def kernel_available() -> bool:
    """Whether `tessera::group_quant_linear` runs here: the kernels built, on a CPU with AVX512-BF16
    and VNNI. Loading them defines the op (in C++); its shape function for the compiler is added here."""
    module = kernels.load()
    if module is None or not module.group_quant_linear_supported():
        return False
    torch.library.register_fake("tessera::group_quant_linear")(_group_quant_linear_shape)
    torch.library.register_fake("tessera::group_quant_embedding")(_group_quant_embedding_shape)
    return True


def _group_quant_linear_shape(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_mins: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0] * BLOCK_COLUMNS, dtype=out_dtype or x.dtype)


def _group_quant_embedding_shape(
    ids: torch.Tensor, packed: torch.Tensor, scales_mins: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    return ids.new_empty(*ids.shape, packed.shape[1] * GROUP_SIZE, dtype=out_dtype or torch.bfloat16)


@functools.cache
def _chunk_order() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of a 4-bit chunk's 64 bytes: which input pair (of the low nibble; the high
    nibble's is 2 more), column and input within the pair it holds. AVX-512's byte unpack works
    within 16-byte lanes: bytes 0-7 of each lane feed pairs 0 and 2, bytes 8-15 pairs 1 and 3, and
    lane l's bytes become the words 8l..8l+7, where word 2j + u is column j, input u."""
    byte = torch.arange(_CHUNK)
    lane, within = byte // 16, byte % 16
    word = 8 * lane + within % 8
    return within // 8, word // 2, word % 2


def repack(qweight: torch.Tensor, scales_zeros: torch.Tensor) -> GroupQuantBlocks:
    """The kernel's layout from (N, K) unsigned codes and (N, K/32, 2) float (scale, zero), where
    w = (q - 8) * scale + zero. Codes up to 15 are packed in 4 bits, larger ones in 8. The kernel
    keeps GGUF's form w = d q + m with d and m in fp16 (as GGUF files store them, so exact for those)."""
    out_features, in_features = qweight.shape
    blocks, groups = out_features // BLOCK_COLUMNS, in_features // GROUP_SIZE
    codes = qweight.to(torch.uint8)
    if int(codes.max()) <= 15:
        # (block, column j, group, chunk c, pair t, input u) -> (block, group, chunk, pair, column, input)
        q = codes.reshape(blocks, BLOCK_COLUMNS, groups, 4, 4, 2).permute(0, 2, 3, 4, 1, 5)
        pair, column, within_pair = _chunk_order()
        low = q[:, :, :, pair, column, within_pair]
        high = q[:, :, :, pair + 2, column, within_pair]
        packed = (low | (high << 4)).reshape(blocks, groups, 4 * _CHUNK)
    else:  # (block, column j, group, chunk c, byte i): input 4 c + i of the group
        q = codes.reshape(blocks, BLOCK_COLUMNS, groups, 8, 4)
        packed = q.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 8 * _CHUNK)
    scale, zero = scales_zeros[..., 0].float(), scales_zeros[..., 1].float()
    scales_mins = torch.stack([scale, zero - 8 * scale])  # (2, N, K/32): d, m
    scales_mins = scales_mins.reshape(2, blocks, BLOCK_COLUMNS, groups).permute(1, 3, 0, 2)
    return GroupQuantBlocks(
        packed.contiguous(), scales_mins.reshape(blocks, groups, 2 * BLOCK_COLUMNS).to(torch.float16).contiguous()
    )


def group_quant_linear(
    x: torch.Tensor, weight: GroupQuantBlocks, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y = x W^T (+ bias) for bf16 x (..., K); y (..., N) in bf16, or float32 if asked (the sums
    are float32 either way). Only where `kernel_available()`."""
    return torch.ops.tessera.group_quant_linear(x, weight.packed, weight.scales_mins, bias, out_dtype)


def embedding(ids: torch.Tensor, weight: GroupQuantBlocks, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of W (N, K), decoded from the kernel's layout: (..., K) in `dtype`, each value
    the float32 d q + m rounded once, as the dequantized table holds it. One C++ op
    (`tessera::group_quant_embedding`) that reads only the rows' bytes: the ~15 tensor ops it
    replaces took ~0.1 ms for one token and ~0.2 ms for 32 (docs/benchmarks.md)."""
    out_dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    rows = torch.ops.tessera.group_quant_embedding(ids, weight.packed, weight.scales_mins, out_dtype)
    return rows if rows.dtype == dtype else rows.to(dtype)


class CpuGroupQuantKernel(GroupQuantKernel):
    """`tessera::group_quant_linear` for layers with bf16 activations, whole blocks of 16 outputs
    and whole groups of 32 inputs."""

    def usable(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and out_features % BLOCK_COLUMNS == 0 and in_features % GROUP_SIZE == 0

    def pack(self, qweight: torch.Tensor, scales_zeros: torch.Tensor) -> GroupQuantBlocks:
        return repack(qweight, scales_zeros)

    def linear(
        self, x: torch.Tensor, packed: GroupQuantBlocks, bias: torch.Tensor | None, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        return group_quant_linear(x, packed, bias, out_dtype)

    def embedding(self, ids: torch.Tensor, packed: GroupQuantBlocks) -> torch.Tensor:
        return embedding(ids, packed, torch.bfloat16)
