"""Weight loaders: each format yields the checkpoint's tensors under HF names; auto picks the right one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fixtures_models import build_model, save_model, tiny_config

from tessera.backends.cpu.platform import CpuPlatform
from tessera.core.config import LoadConfig, ModelConfig
from tessera.core.errors import ConfigError, UnknownPluginError
from tessera.core.plugins import get_plugins
from tessera.core.worker.model_loader import load_model, select_loader
from tessera.plugins.loaders.dummy_loader import hf_parameter_shapes
from tessera.plugins.loaders.gguf_file import GgufFile
from tessera.plugins.loaders.gguf_loader import _unpermute_llama_qk, llama_config
from tessera.plugins.loaders.pt_loader import NpcacheLoader, PtLoader


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loaders")
    return {
        "safetensors": save_model(str(root / "st"), "llama", "safetensors"),
        "pt": save_model(str(root / "pt"), "llama", "pt"),
        "pt_bf16": _save_bf16_pt(str(root / "pt_bf16")),
    }


def _save_bf16_pt(path: str) -> str:
    save_model(path, "tied", "pt")
    file = os.path.join(path, "pytorch_model.bin")
    state = torch.load(file, weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, file)
    return path


def _state(path: str, loader) -> dict[str, torch.Tensor]:
    config = ModelConfig(model=path)
    return {name: tensor.clone() for name, tensor in loader.iter_weights(path, config, None)}


def _reference_state(path: str) -> dict[str, torch.Tensor]:
    return build_model(tiny_config("llama")).state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_loader_yields_the_checkpoint_tensors(folders, fmt):
    plugins = get_plugins()
    loader = plugins.weight_loaders.get(fmt)(LoadConfig(load_format=fmt))
    assert loader.can_load(folders[fmt])
    state = _state(folders[fmt], loader)
    reference = _reference_state(folders[fmt])
    assert set(state) == set(reference)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    files = loader.load_files(folders[fmt], ModelConfig(model=folders[fmt]))
    assert files.hf_config.architectures == ["LlamaForCausalLM"]
    assert files.tokenizer is not None and files.chat_template


def test_auto_picks_gguf_for_a_file_safetensors_then_pt_for_folders(folders, smollm2_path):
    plugins = get_plugins()
    assert select_loader(folders["safetensors"], LoadConfig(), plugins)[0] == "safetensors"
    assert select_loader(folders["pt"], LoadConfig(), plugins)[0] == "pt"
    assert select_loader(smollm2_path, LoadConfig(), plugins)[0] == "gguf"


def test_auto_with_no_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no weight loader recognizes .*--load-format"):
        select_loader(str(tmp_path), LoadConfig(), get_plugins())


def test_unknown_or_unregistered_load_format_is_a_clear_error():
    with pytest.raises(ConfigError, match="load_format='nope' is invalid"):
        LoadConfig(load_format="nope")
    with pytest.raises(UnknownPluginError, match="'tensorizer'; registered: dummy, gguf, npcache, pt, safetensors"):
        select_loader("/tmp", LoadConfig(load_format="tensorizer"), get_plugins())


def test_dummy_weights_have_the_checkpoint_shapes(folders):
    path = folders["safetensors"]
    loaded = load_model(ModelConfig(model=path, dtype="float32"), LoadConfig(load_format="dummy"), CpuPlatform())
    assert loaded.load_format == "dummy"
    shapes = hf_parameter_shapes(loaded.hf_config)
    reference = _reference_state(path)
    assert shapes == {name: tuple(t.shape) for name, t in reference.items()}
    real = dict(loaded.model.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    assert real.shape == (64 + 2 * 32, 64) and real.std() > 0.05  # random, not zeros or ones


def test_dummy_with_the_embedded_gguf_config(smollm2_path):
    loader = get_plugins().weight_loaders.get("dummy")(LoadConfig(load_format="dummy"))
    files = loader.load_files(smollm2_path, ModelConfig(skip_tokenizer_init=True))
    assert files.hf_config.num_hidden_layers == 30 and files.tokenizer is None


@pytest.mark.parametrize("source", ["pt", "pt_bf16"])
def test_npcache_round_trips_and_is_reused(folders, tmp_path, monkeypatch, source):
    path = folders[source]
    loader = NpcacheLoader(LoadConfig(load_format="npcache", download_dir=str(tmp_path)))
    direct = _state(path, PtLoader())
    first = _state(path, loader)
    assert os.path.isfile(os.path.join(loader.cache_dir(path), "weight_names.json"))

    def no_pt(*args, **kwargs):
        raise AssertionError("the .bin files were read again instead of the cache")

    monkeypatch.setattr(PtLoader, "iter_weights", no_pt)
    second = _state(path, loader)
    assert set(first) == set(second) == set(direct)
    for name, tensor in direct.items():
        assert first[name].dtype == second[name].dtype == tensor.dtype
        assert torch.equal(first[name], tensor) and torch.equal(second[name], tensor)


def test_gguf_qk_unpermute_inverts_llama_cpp_permute():
    config = tiny_config("llama")

    def permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:  # what llama.cpp's converter does
        return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q, k = torch.randn(64, 64), torch.randn(32, 64)
    assert torch.equal(_unpermute_llama_qk("model.layers.0.self_attn.q_proj.weight", permute(q, 4), config), q)
    assert torch.equal(_unpermute_llama_qk("model.layers.0.self_attn.k_proj.weight", permute(k, 2), config), k)
    assert torch.equal(_unpermute_llama_qk("model.layers.0.mlp.up_proj.weight", q, config), q)


def test_gguf_metadata_and_config_of_smollm2(smollm2_path):
    gguf = GgufFile(smollm2_path)
    assert gguf.architecture() == "llama" and len(gguf.tensors) == 272
    assert len(gguf.metadata["tokenizer.ggml.tokens"]) == 49152
    assert gguf.tensors["blk.0.ffn_gate.weight"].shape == (1536, 576)
    config = llama_config(gguf)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) == (3, 49152, 8192)
    assert config.tie_word_embeddings and config.eos_token_id == 2
    weight = gguf.load_tensor(gguf.tensors["blk.0.attn_norm.weight"])
    assert weight.dtype == np.float32 and weight.shape == (576,)


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path):
    """(tessera's fp32 load of the SmolLM2 GGUF, transformers' fp32 load of the same file)."""
    from transformers import AutoModelForCausalLM

    ours = load_model(ModelConfig(dtype="float32"), LoadConfig(), CpuPlatform())
    folder, name = os.path.split(smollm2_path)
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm2_pair, smollm2_tokenizer):
    from tessera.core.interfaces.attention import AttentionMetadata

    ours, theirs = smollm2_pair
    assert ours.load_format == "gguf" and ours.max_model_len == 8192
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    ids = smollm2_tokenizer("What is the capital of France?").input_ids
    assert ours.tokenizer("What is the capital of France?").input_ids == ids
    num_layers, num_kv_heads, head_dim = ours.model.kv_cache_spec()
    backend = ours.attention_backend
    caches = [backend.allocate_kv_cache(4, 16, num_kv_heads, head_dim, torch.float32, "cpu") for _ in range(num_layers)]
    n = len(ids)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(n) + 32, block_tables=torch.tensor([[2]], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        query_lens_cpu=[n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n, block_size=16, is_decode_only=False,
    )
    with torch.no_grad():
        logits = ours.model.compute_logits(ours.model(torch.tensor(ids), torch.arange(n), caches, metadata))
        reference = theirs(torch.tensor([ids])).logits[0]
    assert reference.abs().max() > 5
    # fp32 throughout; the prefill runs torch's flash-attention kernel, whose blockwise softmax
    # sums in another order than transformers' eager attention (differences up to ~1.2e-4 seen)
    torch.testing.assert_close(logits, reference, rtol=0, atol=3e-4)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_fast_dequantization_is_bit_exact_with_gguf_py(qtype):
    import gguf as gguf_py

    from tessera.plugins.loaders.gguf_file import _FAST_DEQUANT

    kind = gguf_py.GGMLQuantizationType[qtype]
    weights = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    packed = gguf_py.quants.quantize(weights, kind)
    _, type_size = gguf_py.GGML_QUANT_SIZES[kind]
    ours = _FAST_DEQUANT[int(kind)](packed.reshape(-1, type_size)).reshape(weights.shape)
    assert np.array_equal(ours, gguf_py.quants.dequantize(packed, kind))
    assert np.abs(ours - weights).max() < 0.5  # and it is a dequantization of `weights`


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_groups_encode_exactly_the_dequantized_values(qtype):
    """The codes and (scale, zero) the loader hands to quantization methods mean the same weights
    as the dequantized tensor: w = (q - 8) * scale + zero, with Q8_0's signed values shifted by 128."""
    import gguf as gguf_py

    from tessera.plugins.loaders.gguf_file import _FAST_DEQUANT, _GROUPS

    kind = gguf_py.GGMLQuantizationType[qtype]
    weights = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    blocks = gguf_py.quants.quantize(weights, kind).reshape(-1, gguf_py.GGML_QUANT_SIZES[kind][1])
    q, scale_zero = _GROUPS[int(kind)](blocks)
    assert q.dtype == np.uint8 and q.max() <= (15 if qtype.startswith("Q4") else 255)
    decoded = (q.astype(np.float32) - 8) * scale_zero[:, :1] + scale_zero[:, 1:]
    assert np.array_equal(decoded, _FAST_DEQUANT[int(kind)](blocks))


def test_fast_block_sizes_agree_with_gguf_py():
    import gguf as gguf_py

    from tessera.plugins.loaders.gguf_file import _FAST_BLOCK_BYTES, _FAST_DEQUANT

    assert set(_FAST_BLOCK_BYTES) == set(_FAST_DEQUANT)
    for ggml_type, type_size in _FAST_BLOCK_BYTES.items():
        assert gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(ggml_type)] == (32, type_size)


def test_reading_the_embedded_gguf_does_not_import_gguf_py(smollm2_path):
    # gguf-py pulls in mistral-common, pydantic, requests, ... (~26 MB a serving process keeps);
    # the types of the default model are decoded without it.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from tessera.plugins.loaders.gguf_file import GgufFile\n"
        f"f = GgufFile({smollm2_path!r})\n"
        "for info in f.tensors.values():\n"
        "    f.load_tensor(info); f.load_groups(info)\n"
        "print('gguf imported:', 'gguf' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gguf imported: False" in result.stdout
