"""tessera::int4_linear, the CPU backend's 4-bit GGUF matmul, against the arithmetic it stands for."""

from __future__ import annotations

import pytest
import torch

from tessera.backends.cpu import int4_linear as cpu_int4
from tessera.backends.cpu.platform import CpuPlatform

pytestmark = pytest.mark.skipif(
    not cpu_int4.kernel_available(), reason="needs AVX512-BF16, AVX512-VNNI and the CPU kernels built (see the log)"
)


def random_groups(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles (N, K) uint8, scales_zeros (N, K/32, 2), the weight they encode (N, K) float32)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen)
    # GGUF's d and m are fp16 numbers (w = d q + m, zero = m + 8 d)
    scale = (torch.rand(out_features, in_features // 32, generator=gen) * 0.02 + 0.001).half().float()
    zero = (torch.randn(out_features, in_features // 32, generator=gen) * 0.05).half().float() + 8 * scale
    weight = (q.float() - 8).reshape(out_features, -1, 32) * scale[..., None] + zero[..., None]
    return q, torch.stack([scale, zero], dim=-1), weight.reshape(out_features, in_features)


def quantized_inputs(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each group of 32 inputs rounded to s * q, q in -127..127, with
    s = max|x| / 127 (rounding half to even, in float32 like the kernel)."""
    groups = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inverse) * (amax / 127.0)).reshape(x.shape)


def assert_matches(y: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    # The integer dot products are exact; scaling and summing the groups in fp32 and rounding once
    # to bf16 keeps the result within bf16 rounding (2^-8 relative) of the float64 value. An input
    # that falls on a rounding boundary may round the other way than in float64: one step of its
    # group (max|x| / 127) times one weight.
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    one_step = x.float().abs().max().item() / 127 * weight.abs().max().item()
    atol = 2**-10 * expected.abs().max().item() + one_step
    torch.testing.assert_close(y.double(), expected.double(), rtol=2**-7, atol=atol)


def random_inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (48, 96), (960, 576)])
def test_matches_the_quantized_arithmetic_for_every_row_count(rows, out_features, in_features):
    q, scales_zeros, weight = random_groups(out_features, in_features)
    x = random_inputs(rows, in_features)
    y = cpu_int4.int4_linear(x, cpu_int4.int4_repack(q, scales_zeros))
    assert_matches(y, quantized_inputs(x).double() @ weight.double().T, x, weight)


def test_rounding_the_inputs_to_8_bits_costs_under_one_percent():
    """Against the plain float matmul (bf16 inputs as they are): the error llama.cpp also accepts
    for these formats, a fraction of what the 4-bit weights themselves cost."""
    q, scales_zeros, weight = random_groups(960, 576, seed=3)
    x = random_inputs(64, 576)
    y = cpu_int4.int4_linear(x, cpu_int4.int4_repack(q, scales_zeros)).float()
    expected = x.float() @ weight.T
    assert (y - expected).norm() / expected.norm() < 0.01


def test_adds_the_bias_and_keeps_leading_dimensions():
    q, scales_zeros, weight = random_groups(32, 64, seed=1)
    bias = torch.randn(32).to(torch.bfloat16)
    x = random_inputs(2, 3, 64)
    y = cpu_int4.int4_linear(x, cpu_int4.int4_repack(q, scales_zeros), bias)
    assert y.shape == (2, 3, 32)
    assert_matches(y, quantized_inputs(x).double() @ weight.double().T + bias.double(), x, weight)


def test_each_weight_column_and_input_lands_in_its_place():
    """One nonzero weight at a time: a wrong layout moves it to another output or input."""
    out_features, in_features = 16, 32
    # distinct inputs up to 127, so that 8 bits hold them exactly (their group's scale is 1)
    x = (4 * torch.arange(1, in_features + 1, dtype=torch.float32) - 1).to(torch.bfloat16)[None]
    for column, inp in [(0, 0), (3, 5), (7, 8), (8, 1), (15, 31), (9, 18), (12, 27)]:
        q = torch.full((out_features, in_features), 8, dtype=torch.uint8)  # 8 encodes 0 (zero = 0)
        q[column, inp] = 9  # weight 1.0 at (column, inp)
        scales_zeros = torch.zeros(out_features, 1, 2)
        scales_zeros[..., 0] = 1.0
        y = cpu_int4.int4_linear(x, cpu_int4.int4_repack(q, scales_zeros))
        expected = torch.zeros(1, out_features)
        expected[0, column] = 4 * (inp + 1) - 1
        assert torch.equal(y.float(), expected), (column, inp)


def test_runs_inside_a_compiled_graph():
    q, scales_zeros, weight = random_groups(48, 64, seed=2)
    blocks = cpu_int4.int4_repack(q, scales_zeros)
    compiled = torch.compile(lambda x: cpu_int4.int4_linear(x, blocks) * 2, dynamic=True, fullgraph=True)
    for rows in (3, 5):
        x = random_inputs(rows, 64, seed=rows)
        assert_matches(compiled(x), 2 * (quantized_inputs(x).double() @ weight.double().T), x, 2 * weight)


def test_the_cpu_platform_offers_it_for_bf16_layers_of_whole_blocks():
    kernel = CpuPlatform().int4_group_kernel()
    assert kernel is not None
    assert kernel.usable(960, 576, torch.bfloat16)
    assert not kernel.usable(960, 576, torch.float32)
    assert not kernel.usable(968, 576, torch.bfloat16)  # not whole blocks of 16
    assert not kernel.usable(960, 560, torch.bfloat16)  # not whole groups of 32
