"""The xgrammar guided-decoding backend: JSON schema, any JSON, regex, choice, EBNF and Lark grammars."""

from __future__ import annotations

import functools
import json
from typing import Any

import xgrammar as xgr

from tessera.core.interfaces.guided import Grammar as GrammarBase
from tessera.core.interfaces.guided import GuidedConstraint, GuidedDecodingBackend
from tessera.plugins.guided._common import check_spec, parse_choices, reason_from
from tessera.plugins.guided._tokenizer_data import (
    DEFAULT_MAX_JSON_WHITESPACE,
    cached,
    fill_eos_only,
    get_tokenizer_data,
)


@functools.lru_cache(maxsize=256)
def _to_grammar(kind: str, spec: str) -> xgr.Grammar:
    """Parse a constraint into xgrammar's grammar IR (cheap, tokenizer-free); raises on unsupported input."""
    if kind == "json":
        # strict_mode: no properties beyond the schema's, which is a valid subset of any schema
        return xgr.Grammar.from_json_schema(spec, any_whitespace=True, max_whitespace_cnt=DEFAULT_MAX_JSON_WHITESPACE)
    if kind == "json_object":
        # not strict: {"type": "object"} must admit any properties
        return xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=True, max_whitespace_cnt=DEFAULT_MAX_JSON_WHITESPACE,
            strict_mode=False,
        )
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        # EBNF string literals use JSON-compatible escapes
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in parse_choices(spec))
        return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
    if kind == "grammar":
        # GBNF/EBNF (the spec's form) uses "::="; anything else is read as Lark
        return xgr.Grammar.from_ebnf(spec) if "::=" in spec else xgr.Grammar.from_lark(spec)
    raise ValueError(f"unknown constraint kind {kind!r}")


def _build_compiler(tokenizer: Any, vocab_size: int, is_json: bool) -> xgr.GrammarCompiler:
    data = get_tokenizer_data(tokenizer)
    # RAW vocabulary of exact bytes; special tokens are b"", which xgrammar never allows, and ids
    # from len(tokenizer) to vocab_size are padding it also never allows.
    vocab = list(data.token_bytes)
    if is_json:
        # xgrammar 0.2.8 lets length-bounded JSON strings hold raw control characters (invalid
        # JSON): for JSON, tokens with a control byte other than \n and \r are never allowed
        # (whitespace still has spaces and newlines; strings still have escapes)
        vocab = [b"" if any(c < 0x20 and c not in (0x0A, 0x0D) for c in tok) else tok for tok in vocab]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(data.eos_token_ids))
    return xgr.GrammarCompiler(info, max_threads=2)


class XGrammarGrammar(GrammarBase):
    """One sequence's xgrammar matcher."""

    def __init__(self, matcher: xgr.GrammarMatcher, eos_token_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        if self._matcher.is_terminated():  # xgrammar refuses to fill a mask after the stop token
            fill_eos_only(bitmask, row, self._eos)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def copy(self) -> XGrammarGrammar:
        return XGrammarGrammar(self._matcher.fork(), self._eos)


class XGrammarBackend(GuidedDecodingBackend):
    """Fastest mask computation of the four (adaptive token-mask cache, C++); the `auto` default."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self._eos = get_tokenizer_data(tokenizer).eos_token_ids

    def _compiler(self, kind: str) -> xgr.GrammarCompiler:
        is_json = kind in ("json", "json_object")
        return cached(
            self.tokenizer, ("xgrammar", self.vocab_size, is_json),
            lambda: _build_compiler(self.tokenizer, self.vocab_size, is_json),
        )

    def unsupported_reason(self, constraint: GuidedConstraint) -> str | None:
        check_spec(constraint)
        if constraint.whitespace_pattern is not None and constraint.kind in ("json", "json_object"):
            return "xgrammar does not support guided_whitespace_pattern (use outlines or llguidance)"
        try:
            _to_grammar(constraint.kind, constraint.spec)
        except Exception as exc:
            return f"xgrammar cannot express this {constraint.kind} constraint: {reason_from(exc)}"
        return None

    def compile(self, constraint: GuidedConstraint) -> xgr.CompiledGrammar:
        return self._compiler(constraint.kind).compile_grammar(_to_grammar(constraint.kind, constraint.spec))

    def new_grammar(self, compiled: xgr.CompiledGrammar) -> XGrammarGrammar:
        return XGrammarGrammar(xgr.GrammarMatcher(compiled), self._eos)
