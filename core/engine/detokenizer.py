"""Incremental detokenization: new text for each new token, equal in sum to a full decode."""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text fragments.

    Fast (Rust) tokenizers use `tokenizers`' DecodeStream, which holds back bytes of a
    character split across tokens. Other tokenizers fall back to re-decoding a short window.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self._backend is not None else None
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._window_step(token_id)

    def _window_step(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip_special)
        full = decode(self._token_ids[self._prefix_offset :], skip_special_tokens=self._skip_special)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete UTF-8 character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full[len(prefix) :]


class TokenTextCache:
    """Decoded text of single tokens (for logprobs), memoized per engine."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False) if self._tokenizer else ""
            self._cache[token_id] = text
        return text
