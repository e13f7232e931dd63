"""Llama/Mistral over the paged KV cache give transformers' logits: chunked prefill, batched decode."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from fixtures_models import VARIANTS, build_model, tiny_config

from tessera.backends.cpu.platform import CpuPlatform
from tessera.core.config import LoadConfig, ModelConfig
from tessera.core.errors import ConfigError, UnknownPluginError
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.plugins import get_plugins
from tessera.core.worker.model_loader import apply_rope_overrides, derive_max_model_len, load_model

BLOCK_SIZE = 16
NUM_BLOCKS = 16


def make_metadata(chunks: list[tuple[int, int]], tables: list[list[int]]) -> AttentionMetadata:
    """chunks[i] = (tokens request i already has in the cache, tokens it computes now)."""
    slots, query_lens, seq_lens = [], [], []
    for (done, new), table in zip(chunks, tables, strict=True):
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(done, done + new)]
        query_lens.append(new)
        seq_lens.append(done + new)
    block_tables = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=starts,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
        is_decode_only=all(q == 1 for q in query_lens),
    )


class Runner:
    """Drives a loaded model step by step and checks every step's logits against transformers."""

    def __init__(self, loaded, hf_model, prompts: list[list[int]], tables: list[list[int]]) -> None:
        self.loaded, self.hf_model = loaded, hf_model
        self.seqs = [list(p) for p in prompts]
        self.done = [0] * len(prompts)
        self.tables = tables
        num_layers, num_kv_heads, head_dim = loaded.model.kv_cache_spec()
        backend = loaded.attention_backend
        self.caches = [
            backend.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, loaded.dtype, loaded.device)
            for _ in range(num_layers)
        ]

    @torch.no_grad()
    def step(self, num_new: list[int]) -> tuple[float, float]:
        """Compute `num_new[i]` more tokens of request i (0: not scheduled); then append the greedy
        token to every request that finished its sequence. Returns (max |diff|, max |ref|)."""
        active = [i for i, n in enumerate(num_new) if n]
        chunks = [(self.done[i], num_new[i]) for i in active]
        metadata = make_metadata(chunks, [self.tables[i] for i in active])
        ids = torch.tensor([t for i in active for t in self.seqs[i][self.done[i] : self.done[i] + num_new[i]]])
        positions = torch.tensor([p for i in active for p in range(self.done[i], self.done[i] + num_new[i])])
        hidden = self.loaded.model(ids, positions, self.caches, metadata)
        logits = self.loaded.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), self.loaded.vocab_size)
        worst, scale, row = 0.0, 0.0, 0
        for i in active:
            end = self.done[i] + num_new[i]
            ref = self.hf_model(torch.tensor([self.seqs[i][:end]])).logits[0, self.done[i] : end]
            ours = logits[row : row + num_new[i]]
            worst = max(worst, (ours - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            self.done[i] = end
            row += num_new[i]
            if end == len(self.seqs[i]):
                self.seqs[i].append(int(ours[-1].argmax()))
        return worst, scale


def _load(path: str, dtype: str = "float32", load_format: str = "auto", **model_kwargs):
    config = ModelConfig(model=path, dtype=dtype, **model_kwargs)
    return load_model(config, LoadConfig(load_format=load_format), CpuPlatform(), get_plugins())


def _hf_reference(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _run_batch(loaded, hf_model) -> list[tuple[float, float]]:
    """Three requests of 37, 21 and 5 prompt tokens in non-contiguous blocks: two prefill chunks
    (the second mixed with a decode), then four decode-only steps."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, loaded.vocab_size, (n,), generator=gen).tolist() for n in (37, 21, 5)]
    tables = [[9, 3, 12], [1, 14], [7, 5]]
    runner = Runner(loaded, hf_model, prompts, tables)
    results = [runner.step([20, 10, 5]), runner.step([17, 11, 1])]
    results += [runner.step([1, 1, 1]) for _ in range(4)]
    assert runner.done == [41, 25, 10]
    return results


@pytest.mark.parametrize(
    ("variant", "save_format"),
    [(v, "safetensors") for v in VARIANTS] + [("llama", "pt")],
)
def test_batched_chunked_prefill_and_decode_match_transformers(tiny_model_path, variant, save_format):
    path = tiny_model_path(variant, save_format)
    loaded = _load(path)
    assert loaded.load_format == save_format
    assert loaded.dtype == torch.float32
    assert loaded.hf_config.architectures[0] == ("MistralForCausalLM" if variant == "mistral" else "LlamaForCausalLM")
    for worst, scale in _run_batch(loaded, _hf_reference(path)):
        assert scale > 0.5  # the reference logits are far from zero: the comparison means something
        assert worst < 1e-4


def test_single_fresh_prefill_then_decode(tiny_model_path):
    path = tiny_model_path("llama")
    loaded = _load(path)
    runner = Runner(loaded, _hf_reference(path), [list(range(3, 43))], [[11, 2, 8, 4]])
    results = [runner.step([40])] + [runner.step([1]) for _ in range(3)]
    assert max(worst for worst, _ in results) < 1e-4


def test_bfloat16_is_close_to_float32_reference(tiny_model_path):
    path = tiny_model_path("llama")
    loaded = _load(path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    for worst, scale in _run_batch(loaded, _hf_reference(path)):
        assert worst < 0.05 * scale


def test_loaded_model_fields(tiny_model_path):
    loaded = _load(tiny_model_path("tied"))
    assert loaded.max_model_len == 256
    assert loaded.eos_token_ids == (2,)
    assert loaded.vocab_size == 320
    assert loaded.tokenizer is not None and loaded.chat_template
    assert loaded.model.lm_head is loaded.model.model.embed_tokens
    assert loaded.model.kv_cache_spec() == (2, 1, 16)
    assert _load(tiny_model_path("llama"), max_model_len=100).max_model_len == 100


def test_max_model_len_beyond_the_model_needs_rope_scaling(tiny_model_path):
    path = tiny_model_path("llama")
    with pytest.raises(ConfigError, match="max_model_len=1000 is larger"):
        _load(path, max_model_len=1000)
    loaded = _load(path, max_model_len=1000, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert loaded.max_model_len == 1000
    assert loaded.model.model.layers[0].self_attn.rotary_emb.max_position >= 1000


def test_rope_overrides_reach_the_config_and_the_model(tiny_model_path):
    config = tiny_config("llama")
    apply_rope_overrides(config, {"type": "dynamic", "factor": 2.0}, 20000.0)
    from tessera.core.layers.rotary import rope_parameters

    params = rope_parameters(config)
    assert params["rope_type"] == "dynamic" and params["factor"] == 2.0 and params["rope_theta"] == 20000.0
    assert derive_max_model_len(config, None) == 512  # 256 stretched by the dynamic factor

    path = tiny_model_path("llama")
    base = _load(path).model.model.layers[0].self_attn.rotary_emb
    theta = _load(path, rope_theta=20000.0).model.model.layers[0].self_attn.rotary_emb
    assert not torch.equal(base.cos_cache[:50], theta.cos_cache[:50])


def test_mistral_sliding_window_is_refused_unless_it_covers_the_context(tmp_path):
    config = tiny_config("mistral", sliding_window=64)
    build_model(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="sliding-window"):
        _load(str(tmp_path), skip_tokenizer_init=True)
    assert _load(str(tmp_path), skip_tokenizer_init=True, max_model_len=64).max_model_len == 64


def test_unknown_architecture_lists_the_registered_ones(tiny_model_path, tmp_path):
    folder = tmp_path / "foo"
    shutil.copytree(tiny_model_path("llama"), folder)
    config_file = os.path.join(folder, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["architectures"] = ["FooForCausalLM"]
    with open(config_file, "w") as f:
        json.dump(config, f)
    with pytest.raises(UnknownPluginError, match="FooForCausalLM is not supported; registered: .*LlamaForCausalLM"):
        _load(str(folder))


@pytest.mark.parametrize("rows", [1, 5, 32, 70])
def test_prepacked_bf16_lm_head_matches_the_plain_matmul(rows):
    """The CPU keeps a bf16 LM head in oneDNN's packed layout: same logits as hidden @ W^T."""
    from tessera.core.layers import LayerContext
    from tessera.core.layers.embedding import VocabEmbedding
    from tessera.core.layers.logits import LogitsProcessor

    gen = torch.Generator().manual_seed(0)
    context = LayerContext(dtype=torch.bfloat16, device=torch.device("cpu"), attention_backend=None)
    head = VocabEmbedding(1000, 64, context)
    head.weight.data.copy_(torch.randn(1000, 64, generator=gen))
    processor = LogitsProcessor(vocab_size=990)
    hidden = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    logits = processor(head, hidden)
    assert processor._packed is not None  # the packed path ran
    expected = (hidden @ head.weight.t())[:, :990].float()
    assert logits.shape == (rows, 990) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=2e-2, atol=2e-2)
