"""The CPU decoder stack (one C++ call for a step's layers) against the model's own forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fixtures_models import build_model, tiny_config

from tessera.backends.cpu import group_quant_linear as cpu_quant
from tessera.backends.cpu.attention import CpuAttentionBackend
from tessera.backends.cpu.platform import CpuPlatform
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.layers import LayerContext
from tessera.plugins.models.llama import LlamaForCausalLM
from tessera.plugins.quantization.gguf import GgufQuantization

pytestmark = pytest.mark.skipif(
    not cpu_quant.kernel_available(), reason="4-bit layers need the group kernel (AVX512-BF16, VNNI, a C++ build)"
)

BLOCK_SIZE = 16
BLOCKS_PER_REQUEST = 4
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def q4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round an (N, K) weight to 4-bit groups of 32 inputs, as GGUF Q4_1 does: (the dequantized
    weight, (N, K) codes, (N, K/32, 2) (scale, zero) with w = (q - 8) * scale + zero)."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 32, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-4)
    codes = ((groups - low) / scale).round().clamp(0, 15)
    zero = low + 8 * scale
    dequantized = (codes - 8) * scale + zero
    return dequantized.reshape(rows, cols), codes.reshape(rows, cols).to(torch.uint8), torch.cat([scale, zero], -1)


def bf16_model(config, quantized: bool = True, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    """A tessera Llama whose projections hold 4-bit groups (in the group kernel's layout), or
    plain weights (bf16 ones packed for oneDNN)."""
    context = LayerContext(
        dtype, torch.device("cpu"), CpuAttentionBackend(), quantization=GgufQuantization() if quantized else None,
        platform=CpuPlatform(),
    )
    model = LlamaForCausalLM(config, SimpleNamespace(max_model_len=None), context)
    weights = []
    for name, tensor in build_model(config).state_dict().items():
        if quantized and any(f".{p}." in name for p in _PROJECTIONS) and name.endswith(".weight"):
            dequantized, codes, scales_zeros = q4_groups(tensor)
            base = name.removesuffix(".weight")
            weights += [(name, dequantized), (base + ".qweight", codes), (base + ".scales_zeros", scales_zeros)]
        else:
            weights.append((name, tensor))
    model.load_weights(weights)
    return model


def metadata(query_lens: list[int], seq_lens: list[int], requests: list[int] | None = None) -> AttentionMetadata:
    """Request i (the i-th, or requests[i]) owns cache blocks [i * 4, i * 4 + 4); its tokens are
    the last query_lens[i] of seq_lens[i]."""
    slots, tables = [], []
    requests = requests if requests is not None else list(range(len(query_lens)))
    for index, query_len, seq_len in zip(requests, query_lens, seq_lens, strict=True):
        first_block = index * BLOCKS_PER_REQUEST
        tables.append(list(range(first_block, first_block + BLOCKS_PER_REQUEST)))
        slots += [first_block * BLOCK_SIZE + position for position in range(seq_len - query_len, seq_len)]
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
        is_decode_only=all(q == 1 for q in query_lens),
    )


_OVERRIDES = {"plain": {}, "qkv_bias": {"attention_bias": True}, "llama3_rope": {"variant": "llama3_rope"}}
# sizes off the 16-value vectors, so the elementwise loops take their scalar tails (bf16 weights
# only: 4-bit groups need inputs in multiples of 32)
_OFF_VECTOR_WIDTH = {"hidden_size": 72, "intermediate_size": 136, "head_dim": 40}


@pytest.mark.parametrize(
    ("quantized", "overrides"),
    [(q, o) for q in (True, False) for o in _OVERRIDES.values()] + [(False, _OFF_VECTOR_WIDTH)],
    ids=[f"{q}-{name}" for q in ("4bit_groups", "bf16_onednn") for name in _OVERRIDES] + ["bf16_onednn-sizes_off_vector_width"],
)
@pytest.mark.parametrize("prompt_lens", [[7], [5, 19, 33]])
@torch.inference_mode()
def test_decoder_stack_matches_the_model_forward(quantized: bool, overrides: dict, prompt_lens: list[int]) -> None:
    overrides = dict(overrides)
    config = tiny_config(overrides.pop("variant", "llama"), **overrides)
    model = bf16_model(config, quantized)
    if not quantized:  # the stack multiplies the packed weights themselves
        assert all(layer.mlp.down_proj.weight.is_mkldnn for layer in model.model.layers)
    decode = model.decoder_stack_forward()
    assert decode is not None and not decode.runs_every_step  # head size 16: no C++ prefill attention
    if config.attention_bias:  # the random checkpoint's biases are zeros: make them count
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.bias.uniform_(-0.5, 0.5)
    num_layers, num_kv_heads, head_dim = model.kv_cache_spec()
    backend = CpuAttentionBackend()
    kv_caches = [
        backend.allocate_kv_cache(BLOCKS_PER_REQUEST * len(prompt_lens), BLOCK_SIZE, num_kv_heads, head_dim, torch.bfloat16, "cpu")
        for _ in range(num_layers)
    ]
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, config.vocab_size, (sum(prompt_lens),), generator=generator)
    prompt_positions = torch.cat([torch.arange(n) for n in prompt_lens])
    model(prompt_ids, prompt_positions, kv_caches, metadata(prompt_lens, prompt_lens))  # fills the caches
    for step in range(3):  # decode steps, each request one token further
        seq_lens = [n + step + 1 for n in prompt_lens]
        step_metadata = metadata([1] * len(prompt_lens), seq_lens)
        ids = torch.randint(3, config.vocab_size, (len(prompt_lens),), generator=generator)
        positions = torch.tensor([n - 1 for n in seq_lens])
        expected = model(ids, positions, kv_caches, step_metadata)  # stores this step's keys and values too
        actual = decode(ids, positions, kv_caches, step_metadata)  # stores them again, then attends
        # bf16 rounding differs (the stack rounds once per fused loop, eager ops once per op)
        assert_close_to(actual, expected)
        logits, expected_logits = model.compute_logits(actual), model.compute_logits(expected)
        assert (logits - expected_logits).abs().max().item() < 0.04 * expected_logits.abs().max().item()


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within bf16 rounding of the model's forward: ~1% of the largest value (a position off by
    one, for instance, is ~35%)."""
    assert actual.shape == expected.shape and actual.dtype == torch.bfloat16
    scale = expected.float().abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() < 0.04 * scale


@pytest.mark.parametrize("quantized", [True, False], ids=["4bit_groups", "bf16_onednn"])
@torch.inference_mode()
def test_steps_with_prompts_run_through_the_stack_where_prefill_attention_is_built(quantized: bool) -> None:
    # head size 64 has the C++ prefill attention, so the stack takes every step
    config = tiny_config(head_dim=64)
    model = bf16_model(config, quantized)
    forward = model.decoder_stack_forward()
    assert forward is not None and forward.runs_every_step
    num_layers, num_kv_heads, head_dim = model.kv_cache_spec()
    kv_caches = [
        CpuAttentionBackend().allocate_kv_cache(4 * BLOCKS_PER_REQUEST, BLOCK_SIZE, num_kv_heads, head_dim, torch.bfloat16, "cpu")
        for _ in range(num_layers)
    ]
    generator = torch.Generator().manual_seed(0)

    def both(query_lens: list[int], seq_lens: list[int], requests: list[int]) -> None:
        """One step through the model's forward, then the same through the stack (which stores
        the step's keys and values again); their outputs agree."""
        ids = torch.randint(3, config.vocab_size, (sum(query_lens),), generator=generator)
        positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens, strict=True)])
        expected = model(ids, positions, kv_caches, metadata(query_lens, seq_lens, requests))
        step = metadata(query_lens, seq_lens, requests)
        assert forward.takes(step)
        full = forward(ids, positions, kv_caches, step)
        assert_close_to(full, expected)
        # the rows a step samples from (each request's last) alone through the rest of the last layer
        last_rows = torch.tensor(query_lens).cumsum(0) - 1
        sampled = forward(ids, positions, kv_caches, step, output_rows=last_rows)
        if quantized:  # the same arithmetic per row (oneDNN may pick other kernels for fewer rows)
            assert torch.equal(sampled, full[last_rows])
        else:
            assert_close_to(sampled, full[last_rows])

    both([33, 9], [33, 9], requests=[1, 3])  # prompts only
    # a fresh 21-token prompt, a 17-token chunk after 33 cached tokens, a one-token prompt and a decode
    both([21, 17, 1, 1], [21, 50, 1, 10], requests=[0, 1, 2, 3])
    both([1, 1, 1, 1], [22, 51, 2, 11], requests=[0, 1, 2, 3])  # then decode-only


def test_a_float32_model_has_no_decoder_stack() -> None:
    assert bf16_model(tiny_config(), quantized=False, dtype=torch.float32).decoder_stack_forward() is None


def test_the_stack_checks_its_inputs() -> None:
    model = bf16_model(tiny_config())
    decode = model.decoder_stack_forward()
    kv_caches = [torch.empty(2, 4, BLOCK_SIZE, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    step = metadata([1], [3])
    beyond_rotary_table = torch.tensor([model.model.layers[0].self_attn.rotary_emb.max_position])
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        decode(torch.tensor([5]), beyond_rotary_table, kv_caches, step)
    with pytest.raises(RuntimeError, match="one KV cache per layer"):
        decode(torch.tensor([5]), torch.tensor([2]), kv_caches[:1], step)
    with pytest.raises(RuntimeError, match="output row 1 is not one of the 1 rows"):
        decode(torch.tensor([5]), torch.tensor([2]), kv_caches, step, output_rows=torch.tensor([1]))
    with pytest.raises(ValueError, match="runs decode-only steps"):  # head size 16 has no prefill kernel
        decode(torch.tensor([5, 6, 7]), torch.arange(3), kv_caches, metadata([3], [3]))


def test_with_a_stack_the_one_token_graph_is_not_compiled(monkeypatch) -> None:
    # a one-token step is always decode-only, so the model runner warms up without it
    from tessera.core.worker.compilation import WARM_UP_SIZES, CompiledForward

    compiled_sizes: list[list[int]] = []
    monkeypatch.setattr(CompiledForward, "_compile_sizes", lambda self, sizes, *args: compiled_sizes.append(sizes))
    model = bf16_model(tiny_config())
    kv_caches = [torch.empty(2, 8, BLOCK_SIZE, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    for single_token in (True, False):
        CompiledForward(model).warm_up(kv_caches, BLOCK_SIZE, torch.device("cpu"), single_token=single_token)
    assert compiled_sizes == [list(WARM_UP_SIZES), [s for s in WARM_UP_SIZES if s > 1]]


def test_a_stack_that_runs_prompts_spares_the_model_its_compile(tmp_path, monkeypatch) -> None:
    # with every step in the stack the compiled graph would never run, so none is made
    from fixtures_models import save_model

    from tessera import LLM, SamplingParams
    from tessera.core.worker.compilation import CompiledForward

    monkeypatch.setenv("TESSERA_ENFORCE_EAGER", "0")
    monkeypatch.setattr(CompiledForward, "warm_up", lambda *args, **kwargs: pytest.fail("compiled"))
    llm = LLM(save_model(tmp_path / "tiny", head_dim=64), dtype="bfloat16", seed=0)
    runner = llm.engine.runner
    assert runner.decoder_stack is not None and runner.decoder_stack.runs_every_step
    assert runner.compile_seconds is None and runner.forward is runner.model
    outputs = llm.generate([[5, 6, 7], [3, 9, 2, 7, 11]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]
