"""The `gguf` quantization method: Q4_0 / Q4_1 packing, fused-layer shards, the Q8_0 embedding, and the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera.backends.cpu import group_quant_linear as cpu_quant
from tessera.backends.cpu.platform import CpuPlatform
from tessera.core.layers import LayerContext
from tessera.core.layers.embedding import VocabEmbedding
from tessera.core.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from tessera.core.layers.logits import LogitsProcessor
from tessera.plugins.loaders.gguf_file import _FAST_DEQUANT, _GROUPS, Q4_0, Q4_1, Q8_0
from tessera.plugins.quantization.gguf import (
    MAX_INT4_ROWS,
    GgufQuantization,
    int4_linear,
    int4_pack,
)


def q4_blocks(ggml_type: int, num_rows: int, num_cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF Q4_0 / Q4_1 blocks for a (num_rows, num_cols) matrix: (num_blocks, type_size) uint8."""
    rng = np.random.default_rng(seed)
    num_blocks = num_rows * num_cols // 32
    scales = [rng.uniform(0.001, 0.02, (num_blocks, 1)).astype(np.float16).view(np.uint8)]
    if ggml_type == Q4_1:
        scales.append(rng.uniform(-0.15, 0.0, (num_blocks, 1)).astype(np.float16).view(np.uint8))
    nibbles = rng.integers(0, 256, (num_blocks, 16), dtype=np.uint8)
    return np.concatenate([*scales, nibbles], axis=1)


def dequantized_and_groups(ggml_type: int, num_rows: int, num_cols: int, seed: int = 0):
    """(dequantized (N, K) float32, qweight (N, K) uint8, scales_zeros (N, K/32, 2)) torch tensors."""
    blocks = q4_blocks(ggml_type, num_rows, num_cols, seed)
    weight = _FAST_DEQUANT[ggml_type](blocks).reshape(num_rows, num_cols)
    q, scale_zero = _GROUPS[ggml_type](blocks)
    return (
        torch.from_numpy(weight),
        torch.from_numpy(q.reshape(num_rows, num_cols)),
        torch.from_numpy(scale_zero.reshape(num_rows, num_cols // 32, 2)),
    )


def assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() < 0.02 * scale


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1])
@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_int4_kernel_matches_the_dequantized_matmul(ggml_type: int, num_rows: int) -> None:
    weight, q, scales_zeros = dequantized_and_groups(ggml_type, 96, 128)
    # The groups reproduce the dequantized values exactly (before bf16 rounding of the scales).
    group_weight = (q.float() - 8).reshape(96, 4, 32) * scales_zeros[..., :1] + scales_zeros[..., 1:]
    torch.testing.assert_close(group_weight.reshape(96, 128), weight, rtol=0, atol=1e-6)
    x = torch.randn(num_rows, 128).to(torch.bfloat16)
    y = int4_linear(x, *int4_pack(q, scales_zeros, torch.bfloat16), 96)
    assert y.shape == (num_rows, 96) and y.dtype == torch.bfloat16
    assert_close_bf16(y, F.linear(x.float(), weight))


def _context() -> LayerContext:
    return LayerContext(torch.bfloat16, torch.device("cpu"), None, quantization=GgufQuantization(), platform=CpuPlatform())


def _load(layer, shards: dict, packed: bool = True) -> torch.Tensor:
    """Load per-shard checkpoint tensors the way LlamaForCausalLM.load_weights does; returns the
    fused dequantized weight."""
    params = dict(layer.named_parameters())
    fused = []
    for seed, (shard_id, (ggml_type, num_rows)) in enumerate(shards.items()):
        weight, q, scales_zeros = dequantized_and_groups(ggml_type, num_rows, layer.input_size, seed)
        fused.append(weight)
        params["weight"].weight_loader(params["weight"], weight, shard_id)
        if packed or shard_id not in ("v", 1):
            params["qweight"].weight_loader(params["qweight"], q, shard_id)
            params["scales_zeros"].weight_loader(params["scales_zeros"], scales_zeros, shard_id)
    layer.process_weights_after_loading()
    return torch.cat(fused)


@pytest.fixture(params=["group_kernel", "torch_int4_and_bf16"])
def layer_form(request, monkeypatch) -> str:
    """Which form Q4 layers take: tessera's group kernel only, or torch's int4 kernel plus bf16."""
    if request.param == "group_kernel" and not cpu_quant.kernel_available():
        pytest.skip("tessera::group_quant_linear needs AVX512-BF16, VNNI and the CPU kernels built")
    if request.param == "torch_int4_and_bf16":
        monkeypatch.setattr(cpu_quant.CpuGroupQuantKernel, "usable", lambda self, *args: False)
    return request.param


@pytest.mark.parametrize("num_rows", [1, MAX_INT4_ROWS, MAX_INT4_ROWS + 1, 32])
def test_fused_qkv_and_gate_up_load_their_shards(num_rows: int, layer_form: str) -> None:
    qkv = QKVParallelLinear(64, 16, 4, 2, bias=False, context=_context())
    qkv_weight = _load(qkv, {"q": (Q4_1, 64), "k": (Q4_0, 32), "v": (Q4_1, 32)})
    gate_up = MergedColumnParallelLinear(64, [96, 96], bias=False, context=_context())
    gate_up_weight = _load(gate_up, {0: (Q4_1, 96), 1: (Q4_0, 96)})
    for layer, weight in ((qkv, qkv_weight), (gate_up, gate_up_weight)):
        if layer_form == "group_kernel":  # the 4-bit blocks alone: no dequantized copy is kept
            assert layer.group_blocks is not None and layer.int4_weight is None
            assert set(dict(layer.named_parameters())) == set()
        else:
            assert layer.group_blocks is None and layer.int4_weight is not None
            assert set(dict(layer.named_parameters())) == {"weight"}
        x = torch.randn(num_rows, 64).to(torch.bfloat16)
        assert_close_bf16(layer(x), F.linear(x.float(), weight))


def test_a_shard_without_int4_groups_keeps_the_layer_dequantized() -> None:
    layer = QKVParallelLinear(64, 16, 4, 2, bias=False, context=_context())
    weight = _load(layer, {"q": (Q4_1, 64), "k": (Q4_1, 32), "v": (Q4_1, 32)}, packed=False)
    assert layer.group_blocks is None and layer.int4_weight is None
    assert set(dict(layer.named_parameters())) == {"weight"}
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert_close_bf16(layer(x), F.linear(x.float(), weight))


@pytest.mark.slow
def test_default_model_greedy_tokens_match_the_dequantized_path() -> None:
    from tessera.core.entrypoints import LLM
    from tessera.core.sampling_params import SamplingParams

    prompts = ["What is the capital of France?", "List three prime numbers."]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    texts = {}
    for quantization in ("none", None):  # None: the GGUF default, `gguf`
        llm = LLM(quantization=quantization)
        runner = llm.engine.runner  # every step of both runs through the CPU decoder stack
        stack = runner.decoder_stack
        assert (stack is not None and stack.runs_every_step) == cpu_quant.kernel_available()
        outputs = llm.generate(prompts * 16, params)  # 32 rows (the bf16 path without tessera's kernel)
        single = llm.generate(prompts[:1], params)  # one row
        texts[quantization] = [o.outputs[0].token_ids for o in outputs] + [single[0].outputs[0].token_ids]
    assert texts["none"] == texts[None]


def q8_0_table(num_rows: int, num_cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random GGUF Q8_0 table: (dequantized (N, K) float32, qweight, scales_zeros) as the loader yields them."""
    rng = np.random.default_rng(seed)
    num_blocks = num_rows * num_cols // 32
    scales = rng.uniform(0.0005, 0.003, (num_blocks, 1)).astype(np.float16).view(np.uint8)
    values = rng.integers(-128, 128, (num_blocks, 32), dtype=np.int8).view(np.uint8)
    blocks = np.concatenate([scales, values], axis=1)
    q, scale_zero = _GROUPS[Q8_0](blocks)
    return (
        torch.from_numpy(_FAST_DEQUANT[Q8_0](blocks).reshape(num_rows, num_cols)),
        torch.from_numpy(q.reshape(num_rows, num_cols)),
        torch.from_numpy(scale_zero.reshape(num_rows, num_cols // 32, 2)),
    )


def _embedding(groups_arrive: bool) -> tuple[VocabEmbedding, torch.Tensor]:
    layer = VocabEmbedding(256, 64, _context())
    weight, q, scales_zeros = q8_0_table(256, 64)
    layer.weight.weight_loader(layer.weight, weight)
    if groups_arrive:
        dict(layer.named_parameters())["qweight"].data.copy_(q)
        dict(layer.named_parameters())["scales_zeros"].data.copy_(scales_zeros)
    layer.process_weights_after_loading()
    return layer, weight


def test_a_q8_0_embedding_keeps_one_8_bit_table_for_lookups_and_the_lm_head() -> None:
    if not cpu_quant.kernel_available():
        pytest.skip("tessera::group_quant_linear needs AVX512-BF16, VNNI and the CPU kernels built")
    layer, weight = _embedding(groups_arrive=True)
    assert layer.quant_method is not None and set(dict(layer.named_parameters())) == set()  # no bf16 table
    ids = torch.tensor([3, 255, 3, 40])
    assert torch.equal(layer(ids), weight[ids].to(torch.bfloat16))  # the rows the dequantized table holds
    hidden = torch.randn(5, 64).to(torch.bfloat16)
    logits = LogitsProcessor(250)(layer, hidden)  # the head is cut to the real vocabulary
    expected = hidden.float() @ weight[:250].T
    assert logits.dtype == torch.float32 and logits.shape == (5, 250)
    assert (logits - expected).norm() / expected.norm() < 0.01  # 8-bit inputs (see the kernel)
    # the head's float32 sums as they are: rounded to bf16, two close logits can tie
    assert layer.quant_method.apply(layer, hidden).dtype == torch.float32
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())


def test_an_embedding_whose_groups_never_arrived_keeps_its_plain_weight() -> None:
    layer, weight = _embedding(groups_arrive=False)
    assert layer.quant_method is None and set(dict(layer.named_parameters())) == {"weight"}
    ids = torch.tensor([7, 9])
    assert torch.equal(layer(ids), weight[ids].to(torch.bfloat16))
    hidden = torch.randn(2, 64).to(torch.bfloat16)
    assert_close_bf16(LogitsProcessor(256)(layer, hidden), hidden.float() @ weight.T)
