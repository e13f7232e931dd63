"""The outlines guided-decoding backend (outlines-core): regex, JSON schema, any JSON object, choice.

outlines-core compiles a regex into a token-level DFA index; JSON schemas go through its
schema-to-regex converter. It has no context-free grammar engine, so `guided_grammar` is reported
unsupported with a reason: `auto` then picks xgrammar or llguidance, and an explicit
`guided_decoding_backend=outlines` with a grammar is a 400 that names them.
"""

from __future__ import annotations

import functools
from typing import Any

import outlines_core as oc

from tessera.core.interfaces.guided import Grammar as GrammarBase
from tessera.core.interfaces.guided import GuidedConstraint, GuidedDecodingBackend
from tessera.plugins.guided._common import check_spec, choice_regex, parse_choices, reason_from
from tessera.plugins.guided._tokenizer_data import (
    DEFAULT_JSON_WHITESPACE,
    TokenizerData,
    bitmask_words,
    cached,
    fill_eos_only,
    get_tokenizer_data,
)


@functools.lru_cache(maxsize=256)
def _to_regex(kind: str, spec: str, whitespace: str | None) -> str:
    """The regex a constraint compiles to; raises ValueError for a schema outlines cannot express."""
    if kind == "regex":
        return spec
    if kind == "choice":
        return choice_regex(parse_choices(spec))
    if kind == "json":
        return oc.json_schema.build_regex_from_schema(spec, whitespace or DEFAULT_JSON_WHITESPACE)
    if kind == "json_object":
        return oc.json_schema.build_regex_from_schema('{"type": "object"}', whitespace or DEFAULT_JSON_WHITESPACE)
    raise ValueError(f"outlines-core has no engine for {kind!r} constraints")


@functools.lru_cache(maxsize=256)
def _dfa_error(regex: str) -> str | None:
    """Build the regex's DFA against a one-token vocabulary: catches what outlines-core cannot
    compile (backreferences, anchors, word boundaries) in well under the cost of a real compile."""
    try:
        oc.Index(regex, oc.Vocabulary(0, {b"a": [1]}))
    except ValueError as exc:
        if "vocabulary" in str(exc):  # the regex is fine; the one-token vocabulary cannot spell it
            return None
        return reason_from(exc)
    return None


def _build_vocabulary(data: TokenizerData) -> oc.Vocabulary:
    # special tokens (empty bytes) stay out of the vocabulary, so no regex can ever allow them
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, token in enumerate(data.token_bytes):
        if token and token_id not in data.eos_token_ids:
            by_bytes.setdefault(token, []).append(token_id)
    return oc.Vocabulary(data.eos_token_id, by_bytes)


class OutlinesGrammar(GrammarBase):
    """One sequence's position in a compiled index (a Guide), plus its accepted tokens for copy()."""

    def __init__(self, index: oc.Index, eos_token_ids: tuple[int, ...], vocab_size: int) -> None:
        self._index = index
        self._guide = oc.Guide(index)
        self._eos = eos_token_ids
        self._words = bitmask_words(vocab_size)
        self._history: list[int] = []
        self._is_terminated = False

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        if self._is_terminated:
            fill_eos_only(bitmask, row, self._eos)
            return
        view = bitmask[row]
        assert view.is_contiguous() and view.dtype.itemsize == 4 and view.numel() == self._words
        # write straight into the row: outlines clears every bit, then sets the allowed ones
        self._guide.write_mask_into(view.data_ptr(), self._words, 4)

    def accept_token(self, token_id: int) -> bool:
        if self._is_terminated:
            return False
        if token_id in self._eos:
            if not self._guide.is_finished():
                return False
            self._is_terminated = True
            self._history.append(token_id)
            return True
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:  # a token with no transition from this state
            return False
        self._history.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return self._is_terminated

    def copy(self) -> OutlinesGrammar:
        # a Guide cannot be cloned cheaply (pickling copies the index): replay the accepted tokens
        other = OutlinesGrammar(self._index, self._eos, self._words * 32)
        for token_id in self._history:
            other.accept_token(token_id)
        return other


class OutlinesBackend(GuidedDecodingBackend):
    """Regex and JSON schema via outlines-core's DFA index; compile is slower, masks are fast."""

    name = "outlines"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self._data = get_tokenizer_data(tokenizer)
        self._vocabulary = cached(tokenizer, "outlines_vocabulary", lambda: _build_vocabulary(self._data))

    def unsupported_reason(self, constraint: GuidedConstraint) -> str | None:
        check_spec(constraint)
        if constraint.kind == "grammar":
            return (
                "outlines-core has no context-free grammar engine; guided_grammar needs "
                "guided_decoding_backend xgrammar or llguidance"
            )
        try:
            _to_regex(constraint.kind, constraint.spec, constraint.whitespace_pattern)
        except Exception as exc:
            return f"outlines cannot express this {constraint.kind} constraint: {reason_from(exc)}"
        if constraint.kind == "regex":
            if any(s in constraint.spec for s in ("(?=", "(?!", "(?<=", "(?<!")):
                return "outlines regexes cannot use lookaround assertions"
            error = _dfa_error(constraint.spec)
            if error is not None:
                return f"outlines cannot compile this regex (anchors, word boundaries and backreferences are unsupported): {error}"
        return None

    def compile(self, constraint: GuidedConstraint) -> oc.Index:
        regex = _to_regex(constraint.kind, constraint.spec, constraint.whitespace_pattern)
        try:
            return oc.Index(regex, self._vocabulary)
        except ValueError as exc:
            raise ValueError(f"outlines could not compile the {constraint.kind} constraint: {reason_from(exc)}") from exc

    def new_grammar(self, compiled: oc.Index) -> OutlinesGrammar:
        return OutlinesGrammar(compiled, self._data.eos_token_ids, self.vocab_size)
