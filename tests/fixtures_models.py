"""Builders of tiny random Hugging Face models (config + weights + tokenizer) saved to a folder."""

from __future__ import annotations

import os
from typing import Any

import torch

# Variants of the tiny Llama family the engine tests run against transformers.
VARIANTS = ("llama", "llama3_rope", "mistral", "tied")

_TRAINING_TEXT = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Tessera is an inference engine; it pages the KV cache in blocks of sixteen tokens.",
    "def main():\n    print('hello')\n",
]


def save_tokenizer(path: str, vocab_size: int = 300) -> Any:
    """A small byte-level BPE tokenizer trained on a few sentences, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(path)
    return fast


def tiny_config(variant: str = "llama", **overrides: Any) -> Any:
    """A 2-layer config with grouped-query attention (4 query heads, 2 KV heads, head_dim 16)."""
    from transformers import LlamaConfig, MistralConfig

    common: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if variant == "llama":
        common["rope_theta"] = 10000.0
    elif variant == "llama3_rope":
        common["max_position_embeddings"] = 512
        common["rope_theta"] = 5000.0
        common["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
    elif variant == "tied":
        common["tie_word_embeddings"] = True
        common["num_key_value_heads"] = 1
    elif variant != "mistral":
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    common.update(overrides)
    if variant == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(**common)
    return LlamaConfig(**common)


def build_model(config: Any, seed: int = 0) -> Any:
    """A transformers model with random weights (norm weights randomized too), float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def save_model(path: str, variant: str = "llama", save_format: str = "safetensors", seed: int = 0, **overrides: Any) -> str:
    """Save a tiny random model of `variant` (weights as .safetensors or a .bin) plus a tokenizer."""
    os.makedirs(path, exist_ok=True)
    model = build_model(tiny_config(variant, **overrides), seed=seed)
    if save_format == "safetensors":
        model.save_pretrained(path)
    elif save_format == "pt":
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(path)
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        raise ValueError(f"save_format must be safetensors or pt, not {save_format!r}")
    save_tokenizer(path)
    return path


# mistral-common ships these tokenizer files in mistral_common/data/.
MISTRAL_TOKENIZER_FILES = {
    "v3": "mistral_instruct_tokenizer_240323.model.v3",  # sentencepiece, 32768 tokens
    "v7": "mistral_instruct_tokenizer_241114.model.v7",  # sentencepiece, system prompts in their own tokens
    "tekken": "tekken_240718.json",  # tiktoken-based, cut below to keep the test model small
}
_TEKKEN_VOCAB = 2000  # tokens kept after tekken's 1000 special ones


def save_mistral_tokenizer(path: str, kind: str = "v3") -> str:
    """Put the `kind` mistral-common tokenizer file in folder `path` under the name a Mistral
    checkpoint gives it (tokenizer.model.v3, tekken.json); tekken's vocabulary is cut to its first
    2000 ordinary tokens. Returns the file's path."""
    import json
    import shutil

    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    source = os.path.join(str(MistralTokenizer._data_path()), MISTRAL_TOKENIZER_FILES[kind])
    os.makedirs(path, exist_ok=True)
    if kind != "tekken":
        target = os.path.join(path, f"tokenizer.model.{kind}")
        shutil.copyfile(source, target)
        return target
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    data["vocab"] = data["vocab"][:_TEKKEN_VOCAB]
    data["config"]["num_vocab_tokens"] = _TEKKEN_VOCAB
    data["config"]["default_vocab_size"] = data["config"]["default_num_special_tokens"] + _TEKKEN_VOCAB
    target = os.path.join(path, "tekken.json")
    with open(target, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return target


def save_mistral_model(path: str, kind: str = "v3", seed: int = 0) -> str:
    """A tiny random Mistral model whose vocabulary is the `kind` mistral-common tokenizer's, with
    that tokenizer file (and no Hugging Face tokenizer) in the folder."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer_file = save_mistral_tokenizer(path, kind)
    vocab_size = MistralTokenizer.from_file(tokenizer_file).instruct_tokenizer.tokenizer.n_words
    model = build_model(tiny_config("mistral", vocab_size=vocab_size, max_position_embeddings=1024), seed=seed)
    model.save_pretrained(path)
    return path
