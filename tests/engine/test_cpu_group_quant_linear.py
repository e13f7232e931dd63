"""tessera::group_quant_linear, the CPU backend's 4- and 8-bit GGUF matmul, against the arithmetic it stands for."""

from __future__ import annotations

import pytest
import torch

from tessera.backends.cpu import group_quant_linear as cpu_quant
from tessera.backends.cpu.platform import CpuPlatform

pytestmark = pytest.mark.skipif(
    not cpu_quant.kernel_available(), reason="needs AVX512-BF16, AVX512-VNNI and the CPU kernels built (see the log)"
)


def random_groups(
    out_features: int, in_features: int, seed: int = 0, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (N, K) uint8, scales_zeros (N, K/32, 2), the weight they encode (N, K) float32)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (out_features, in_features), dtype=torch.uint8, generator=gen)
    # GGUF's d and m are fp16 numbers (w = d q + m, zero = m + 8 d)
    scale = (torch.rand(out_features, in_features // 32, generator=gen) * 0.02 + 0.001).half().float()
    zero = (torch.randn(out_features, in_features // 32, generator=gen) * 0.05).half().float() + 8 * scale
    weight = (q.float() - 8).reshape(out_features, -1, 32) * scale[..., None] + zero[..., None]
    return q, torch.stack([scale, zero], dim=-1), weight.reshape(out_features, in_features)


def kernel_inputs(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x as the kernel sees it. 4-bit codes take the bf16 inputs as they are. 8-bit codes take each
    group of 32 inputs rounded to s * q, q in -127..127, with s = max|x| / 127 (rounding half to
    even, in float32 like the kernel)."""
    if bits == 4:
        return x.float()
    groups = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inverse) * (amax / 127.0)).reshape(x.shape)


def expected_output(x: torch.Tensor, weight: torch.Tensor, bits: int) -> torch.Tensor:
    return kernel_inputs(x, bits).double() @ weight.double().T


def assert_matches(y: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bits: int) -> None:
    # 4 bits: the products are exact (bf16 x bf16 in fp32) and sums fp32, so the result is within
    # bf16 rounding (2^-8 relative) of the float64 value plus fp32 summation order. 8 bits: the
    # integer dot products are exact, and the same holds for the scaled sums; an input that falls
    # on a rounding boundary may round the other way than in float64: one step of its group
    # (max|x| / 127) times one weight.
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    scale = expected.abs().max().item()
    if bits == 4:
        atol = 2**-7 * scale
    else:
        atol = 2**-10 * scale + x.float().abs().max().item() / 127 * weight.abs().max().item()
    torch.testing.assert_close(y.double(), expected.double(), rtol=2**-7, atol=atol)


def random_inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 40, 48, 57])
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (48, 96), (960, 576)])
def test_matches_the_arithmetic_it_stands_for_at_every_row_count(rows, out_features, in_features, bits):
    q, scales_zeros, weight = random_groups(out_features, in_features, bits=bits)
    x = random_inputs(rows, in_features)
    y = cpu_quant.group_quant_linear(x, cpu_quant.repack(q, scales_zeros))
    assert_matches(y, expected_output(x, weight, bits), x, weight, bits)


def test_rounding_the_inputs_of_8_bit_codes_costs_under_one_percent():
    """Against the plain float matmul (bf16 inputs as they are): the error llama.cpp also accepts
    for these formats, on the LM head only (the logits, not the hidden states of later layers)."""
    q, scales_zeros, weight = random_groups(960, 576, seed=3, bits=8)
    x = random_inputs(64, 576)
    y = cpu_quant.group_quant_linear(x, cpu_quant.repack(q, scales_zeros)).float()
    expected = x.float() @ weight.T
    assert (y - expected).norm() / expected.norm() < 0.01


@pytest.mark.parametrize("rows", [1, 8, 17])
def test_8_bit_codes_of_signed_values_and_groups_with_a_zero_point_side_by_side(rows):
    """Q8_0 stores signed values v as q = v + 128 with m = -128 d, where the kernel skips the
    zero-point term of a group (m + 128 d = 0 in all 16 columns of a block); any other group, or
    one column of a group off that, still takes it."""
    out_features, in_features = 48, 128  # 3 blocks x 4 groups
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 256, (out_features, in_features), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(out_features, in_features // 32, generator=gen) * 0.02 + 0.001).half().float()
    zero = -120 * scale  # Q8_0: w = (q - 128) d
    zero[16:32, 1] += 0.1  # a whole group of block 1 with another zero point
    zero[35, 2] -= 0.2  # one column of a group of block 2
    zero = (zero - 8 * scale).half().float() + 8 * scale  # m in fp16, as GGUF and the kernel store it
    weight = (q.float() - 8).reshape(out_features, -1, 32) * scale[..., None] + zero[..., None]
    weight = weight.reshape(out_features, in_features)
    x = random_inputs(rows, in_features, seed=rows)
    blocks = cpu_quant.repack(q, torch.stack([scale, zero], dim=-1))
    assert_matches(cpu_quant.group_quant_linear(x, blocks), expected_output(x, weight, 8), x, weight, 8)


@pytest.mark.parametrize("bits", [4, 8])
def test_float32_outputs_are_the_sums_before_bf16_rounding(bits):
    # what the LM head asks for: logits that bf16 would round to steps of 0.125 at 16-32
    q, scales_zeros, weight = random_groups(960, 576, seed=4, bits=bits)
    blocks, x = cpu_quant.repack(q, scales_zeros), random_inputs(9, 576, seed=4)
    y = cpu_quant.group_quant_linear(x, blocks, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    expected = expected_output(x, weight, bits)
    # float32 sums in another order than float64: far inside bf16's rounding (2^-9 relative)
    assert (y.double() - expected).abs().max().item() < 2**-14 * expected.abs().max().item()
    assert torch.equal(y.to(torch.bfloat16), cpu_quant.group_quant_linear(x, blocks))


def test_prompt_sized_calls_round_the_weights_to_bf16_once():
    """From 48 rows the kernel dequantizes each block to bf16 weights once per call: its float32
    sums are those of the bf16-rounded weights (within fp32 summation order), for both dtypes."""
    q, scales_zeros, weight = random_groups(960, 576, seed=6)
    blocks, x = cpu_quant.repack(q, scales_zeros), random_inputs(48, 576, seed=6)
    y = cpu_quant.group_quant_linear(x, blocks, out_dtype=torch.float32)
    rounded = x.double() @ weight.to(torch.bfloat16).double().T
    assert (y.double() - rounded).abs().max().item() < 2**-14 * rounded.abs().max().item()
    assert torch.equal(y.to(torch.bfloat16), cpu_quant.group_quant_linear(x, blocks))


@pytest.mark.parametrize("rows", [1, 8, 17, 48, 57])
def test_the_gated_mlp_input_is_silu_of_the_gate_times_the_up_projection(rows):
    """The decoder stack's fused gate/up matmul (bindings: group_quant_gated_linear) equals
    silu(gate) * up computed from group_quant_linear's bf16 [gate | up] output, to the last bit
    of bf16 (its exp is ATen's vectorized one, torch.exp here), on both kernel paths, with a bias."""
    from tessera.backends.cpu import kernels

    q, scales_zeros, _ = random_groups(2 * 96, 576, seed=rows)
    blocks, x = cpu_quant.repack(q, scales_zeros), random_inputs(rows, 576, seed=rows)
    bias = torch.randn(2 * 96).to(torch.bfloat16)
    both = cpu_quant.group_quant_linear(x, blocks, bias).float()
    gate, up = both[:, :96], both[:, 96:]
    expected = (gate / (1 + torch.exp(-gate)) * up).to(torch.bfloat16)
    fused = kernels.load().group_quant_gated_linear(x, blocks.packed, blocks.scales_mins, bias)
    assert fused.shape == (rows, 96) and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), expected.float(), rtol=2**-7, atol=1e-6)
    with pytest.raises(RuntimeError, match="4-bit codes of an even number"):
        kernels.load().group_quant_gated_linear(x, blocks.packed[:5].contiguous(), blocks.scales_mins[:5].contiguous())


def test_adds_the_bias_and_keeps_leading_dimensions():
    for bits in (4, 8):
        q, scales_zeros, weight = random_groups(32, 64, seed=1, bits=bits)
        bias = torch.randn(32).to(torch.bfloat16)
        x = random_inputs(2, 3, 64)
        y = cpu_quant.group_quant_linear(x, cpu_quant.repack(q, scales_zeros), bias)
        assert y.shape == (2, 3, 32)
        assert_matches(y, expected_output(x, weight, bits) + bias.double(), x, weight, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_each_weight_column_and_input_lands_in_its_place(bits):
    """One nonzero weight at a time: a wrong layout moves it to another output or input (of the
    matmul, and of a lookup)."""
    out_features, in_features = 16, 32
    # distinct inputs up to 127, which bf16 holds exactly and so do 8 bits (their group's scale is 1)
    x = (4 * torch.arange(1, in_features + 1, dtype=torch.float32) - 1).to(torch.bfloat16)[None]
    for column, inp in [(0, 0), (3, 5), (7, 8), (8, 1), (15, 31), (9, 18), (12, 27)]:
        q = torch.full((out_features, in_features), 8, dtype=torch.uint8)  # 8 encodes 0 (zero = 0)
        q[column, inp] = 9 if bits == 4 else 24  # weight 1.0 (4 bits) or 16.0 (8 bits)
        scales_zeros = torch.zeros(out_features, 1, 2)
        scales_zeros[..., 0] = 1.0
        blocks = cpu_quant.repack(q, scales_zeros)
        assert blocks.packed.shape[-1] == bits * 64  # the narrowest codes that hold every value
        y = cpu_quant.group_quant_linear(x, blocks)
        expected = torch.zeros(1, out_features)
        expected[0, column] = (4 * (inp + 1) - 1) * float(q[column, inp] - 8)
        assert torch.equal(y.float(), expected), (column, inp)
        rows = cpu_quant.embedding(torch.tensor([[column], [(column + 1) % 16]]), blocks, torch.float32)
        assert rows.shape == (2, 1, in_features)
        assert torch.equal(rows[:, 0], torch.tensor(
            [[float(q[c, k] - 8) for k in range(in_features)] for c in (column, (column + 1) % 16)]
        ))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_embedding_rows_decode_exactly(bits, dtype):
    """Lookups read the rows of W from the packed groups: the float32 values the groups encode,
    rounded once to the activation dtype, as the dequantized table gives."""
    q, scales_zeros, weight = random_groups(64, 96, seed=4, bits=bits)
    blocks = cpu_quant.repack(q, scales_zeros)
    ids = torch.tensor([[0, 17, 63], [5, 5, 48]])
    scale, zero = scales_zeros[..., 0], scales_zeros[..., 1]
    d, m = scale.half().float(), (zero - 8 * scale).half().float()  # as the kernel stores them
    expected = q.float().view(64, 3, 32) * d[..., None] + m[..., None]
    rows = cpu_quant.embedding(ids, blocks, dtype)
    assert rows.dtype == dtype and rows.shape == (2, 3, 96)
    assert torch.equal(rows, expected.view(64, 96)[ids].to(dtype))
    every_row = cpu_quant.embedding(torch.arange(64), blocks, torch.float32)
    assert torch.equal(every_row, expected.view(64, 96))


def test_an_embedding_id_outside_the_table_is_an_error():
    q, scales_zeros, _ = random_groups(32, 64, seed=5)
    blocks = cpu_quant.repack(q, scales_zeros)
    for bad in (32, -1):
        with pytest.raises(RuntimeError, match="outside the table's 32 rows"):
            cpu_quant.embedding(torch.tensor([0, bad]), blocks, torch.bfloat16)


def test_runs_inside_a_compiled_graph():
    q, scales_zeros, weight = random_groups(48, 64, seed=2)
    blocks = cpu_quant.repack(q, scales_zeros)
    compiled = torch.compile(lambda x: cpu_quant.group_quant_linear(x, blocks) * 2, dynamic=True, fullgraph=True)
    for rows in (3, 5):
        x = random_inputs(rows, 64, seed=rows)
        assert_matches(compiled(x), 2 * expected_output(x, weight, 4), x, 2 * weight, 4)


def test_the_embedding_runs_inside_a_compiled_graph():
    """Models without the decoder stack compile their forward, lookup included (the op's shape
    function is registered for that)."""
    q, scales_zeros, _ = random_groups(48, 64, seed=6)
    blocks = cpu_quant.repack(q, scales_zeros)
    compiled = torch.compile(lambda ids: cpu_quant.embedding(ids, blocks, torch.bfloat16) * 2, dynamic=True, fullgraph=True)
    for ids in (torch.tensor([0, 47, 16]), torch.tensor([5, 5, 31, 32, 1])):
        assert torch.equal(compiled(ids), cpu_quant.embedding(ids, blocks, torch.bfloat16) * 2)


def test_the_cpu_platform_offers_it_for_bf16_layers_of_whole_blocks():
    kernel = CpuPlatform().group_quant_kernel()
    assert kernel is not None
    assert kernel.usable(960, 576, torch.bfloat16)
    assert not kernel.usable(960, 576, torch.float32)
    assert not kernel.usable(968, 576, torch.bfloat16)  # not whole blocks of 16
    assert not kernel.usable(960, 560, torch.bfloat16)  # not whole groups of 32
