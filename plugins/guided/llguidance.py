"""The llguidance guided-decoding backend: JSON schema, any JSON object, regex, choice, Lark/GBNF grammars."""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance as llg
from llguidance.gbnf_to_lark import any_to_lark

from tessera.core.interfaces.guided import Grammar as GrammarBase
from tessera.core.interfaces.guided import GuidedConstraint, GuidedDecodingBackend
from tessera.plugins.guided._common import check_spec, parse_choices, reason_from
from tessera.plugins.guided._tokenizer_data import (
    DEFAULT_JSON_WHITESPACE,
    TokenizerData,
    cached,
    fill_eos_only,
    get_tokenizer_data,
)


@functools.lru_cache(maxsize=256)
def _to_grammar(kind: str, spec: str, whitespace: str | None) -> str:
    """The llguidance grammar text of a constraint (not yet checked against a tokenizer)."""
    if kind in ("json", "json_object"):
        schema = spec if kind == "json" else '{"type": "object"}'
        options = {"whitespace_pattern": whitespace or DEFAULT_JSON_WHITESPACE}
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        # Lark string literals take JSON escapes
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in parse_choices(spec)))
    if kind == "grammar":
        # any_to_lark passes Lark through and converts GBNF ("::=" rules, the spec's EBNF form)
        return llg.LLMatcher.grammar_from_lark(any_to_lark(spec))
    raise ValueError(f"unknown constraint kind {kind!r}")


_SENTINEL = "\n"  # a character no tokenizer merges with the text after it


class _TokenizerAdapter:
    """What llguidance's TokenizerWrapper reads: the exact token bytes and an encode function."""

    def __init__(self, tokenizer: Any, data: TokenizerData, vocab_size: int) -> None:
        num_padding = max(0, vocab_size - data.num_tokens)
        self.eos_token_id = data.eos_token_id
        self.bos_token_id = None
        # ids past the tokenizer (the model's padded vocab) are empty special tokens: never allowed
        self.tokens = list(data.token_bytes) + [b""] * num_padding
        self.special_token_ids = sorted(data.special_ids) + list(range(data.num_tokens, data.num_tokens + num_padding))
        self._tokenizer = tokenizer
        self._sentinel_ids = self._encode(_SENTINEL)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._encode(text)
        if self._bytes_of(ids) == text.encode("utf-8"):
            return ids
        # sentencepiece tokenizers put a space before what they encode ("Paris" -> "▁Paris"):
        # encode after a sentinel and drop its tokens, so the ids spell exactly `text`
        after = self._encode(_SENTINEL + text)
        count = len(self._sentinel_ids)
        if after[:count] == self._sentinel_ids and self._bytes_of(after[count:]) == text.encode("utf-8"):
            return after[count:]
        return ids

    def _bytes_of(self, ids: list[int]) -> bytes:
        return b"".join(self.tokens[t] if 0 <= t < len(self.tokens) else b"" for t in ids)


class LLGuidanceGrammar(GrammarBase):
    """One sequence's llguidance matcher."""

    def __init__(self, matcher: llg.LLMatcher, eos_token_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids
        self._has_accepted_eos = False

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        if self._has_accepted_eos or self._matcher.is_error():
            fill_eos_only(bitmask, row, self._eos)
            return
        view = bitmask[row]
        assert view.is_contiguous() and view.dtype.itemsize == 4
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)

    def accept_token(self, token_id: int) -> bool:
        if self._has_accepted_eos:
            return False
        is_ok = bool(self._matcher.consume_token(token_id))
        if is_ok and token_id in self._eos:
            self._has_accepted_eos = True
        return is_ok

    def is_terminated(self) -> bool:
        # stopped: only EOS can follow (or it was accepted)
        return self._has_accepted_eos or bool(self._matcher.is_stopped())

    def copy(self) -> LLGuidanceGrammar:
        other = LLGuidanceGrammar(self._matcher.deep_copy(), self._eos)
        other._has_accepted_eos = self._has_accepted_eos
        return other


class LLGuidanceBackend(GuidedDecodingBackend):
    """Earley parser + lazy lexer (Rust): the fastest compile, masks computed on demand."""

    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self._data = get_tokenizer_data(tokenizer)
        self._ll_tokenizer = cached(tokenizer, ("llguidance", vocab_size), self._build_tokenizer)

    def _build_tokenizer(self) -> llg.LLTokenizer:
        adapter = _TokenizerAdapter(self.tokenizer, self._data, self.vocab_size)
        return llg.LLTokenizer(llg.TokenizerWrapper(adapter), eos_token=list(self._data.eos_token_ids))

    def unsupported_reason(self, constraint: GuidedConstraint) -> str | None:
        check_spec(constraint)
        try:
            grammar = _to_grammar(constraint.kind, constraint.spec, constraint.whitespace_pattern)
        except Exception as exc:
            return f"llguidance cannot express this {constraint.kind} constraint: {reason_from(exc)}"
        error = llg.LLMatcher.validate_grammar(grammar, self._ll_tokenizer)
        if error:
            return f"llguidance cannot express this {constraint.kind} constraint: {reason_from(Exception(error))}"
        return None

    def compile(self, constraint: GuidedConstraint) -> llg.LLMatcher:
        # build the matcher here, in the worker thread: its construction is the expensive part;
        # each sequence then gets a deep copy of this pristine one
        grammar = _to_grammar(constraint.kind, constraint.spec, constraint.whitespace_pattern)
        matcher = llg.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"llguidance could not compile the {constraint.kind} constraint: {matcher.get_error()}")
        return matcher

    def new_grammar(self, compiled: llg.LLMatcher) -> LLGuidanceGrammar:
        return LLGuidanceGrammar(compiled.deep_copy(), self._data.eos_token_ids)
