"""The lm-format-enforcer guided-decoding backend: JSON schema, any JSON object, regex, choice.

Uses the library's core classes with our own tokenizer data: its transformers integration does not
import under transformers 5. Pure Python and character-level, so it is the slowest of the four.
"""

from __future__ import annotations

import json
from typing import Any

from lmformatenforcer import (
    CharacterLevelParser,
    CharacterLevelParserConfig,
    JsonSchemaParser,
    RegexParser,
    StringParser,
    TokenEnforcer,
    TokenEnforcerTokenizerData,
    UnionParser,
)

from tessera.core.interfaces.guided import Grammar as GrammarBase
from tessera.core.interfaces.guided import GuidedConstraint, GuidedDecodingBackend
from tessera.plugins.guided._common import check_spec, parse_choices, reason_from
from tessera.plugins.guided._tokenizer_data import (
    DEFAULT_MAX_JSON_WHITESPACE,
    TokenizerData,
    cached,
    fill_eos_only,
    get_tokenizer_data,
)

_LOOKAROUND = ("(?=", "(?!", "(?<=", "(?<!")


def _build_enforcer_data(data: TokenizerData, vocab_size: int) -> TokenEnforcerTokenizerData:
    regular: list[tuple[int, str, bool]] = []
    for token_id, token in enumerate(data.token_bytes):
        if not token or token_id in data.special_ids:
            continue
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            # a token holding part of a multi-byte character: the character-level parser cannot
            # check it alone, so it is never allowed (fail closed; such characters come out whole)
            continue
        # every token's text is exact and context-free, so each counts as a "new word"
        regular.append((token_id, text, True))

    def decode(token_ids: list[int]) -> str:
        return data.decode(token_ids).rstrip("\ufffd")

    return TokenEnforcerTokenizerData(regular, decode, list(data.eos_token_ids), True, vocab_size)


def _parser(kind: str, spec: str) -> CharacterLevelParser:
    if kind == "json":
        return JsonSchemaParser(json.loads(spec))
    if kind == "json_object":
        return JsonSchemaParser({"type": "object"})
    if kind == "regex":
        return RegexParser(spec)
    if kind == "choice":
        return UnionParser([StringParser(c) for c in parse_choices(spec)])
    raise ValueError(f"lm-format-enforcer has no engine for {kind!r} constraints")


class LMFormatEnforcerGrammar(GrammarBase):
    """One sequence: its generated tokens; the TokenEnforcer memoizes states by token prefix."""

    def __init__(self, enforcer: TokenEnforcer, eos_token_ids: tuple[int, ...], history: list[int] | None = None) -> None:
        self._enforcer = enforcer
        self._eos = eos_token_ids
        self._history = history if history is not None else []
        self._has_accepted_eos = False

    def _allowed(self) -> Any:
        return self._enforcer.get_allowed_tokens(self._history)  # cached per prefix

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        if self._has_accepted_eos:
            fill_eos_only(bitmask, row, self._eos)
            return
        words = self._allowed().allowed_tokens  # (ceil(vocab/32),) int32, our bit layout
        bitmask[row].copy_(words[: bitmask.shape[1]])

    def accept_token(self, token_id: int) -> bool:
        if self._has_accepted_eos or not self._allowed().is_token_allowed(token_id):
            return False
        if token_id in self._eos:
            self._has_accepted_eos = True
        else:
            self._history.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return self._has_accepted_eos

    def copy(self) -> LMFormatEnforcerGrammar:
        # the enforcer is keyed by prefix (built for beam search), so copies can share it
        other = LMFormatEnforcerGrammar(self._enforcer, self._eos, list(self._history))
        other._has_accepted_eos = self._has_accepted_eos
        return other


class LMFormatEnforcerBackend(GuidedDecodingBackend):
    """Character-level parsers walked over a token prefix tree; no compile step, slow masks."""

    name = "lm-format-enforcer"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self._data = get_tokenizer_data(tokenizer)
        self._enforcer_data = cached(
            tokenizer, ("lm-format-enforcer", vocab_size), lambda: _build_enforcer_data(self._data, vocab_size)
        )

    def unsupported_reason(self, constraint: GuidedConstraint) -> str | None:
        check_spec(constraint)
        if constraint.kind == "grammar":
            return "lm-format-enforcer has no context-free grammar engine; use xgrammar or llguidance"
        if constraint.whitespace_pattern is not None:
            return "lm-format-enforcer does not support guided_whitespace_pattern (use outlines or llguidance)"
        if constraint.kind == "regex" and any(s in constraint.spec for s in _LOOKAROUND):
            # interegular misreads lookarounds instead of rejecting them
            return "lm-format-enforcer regexes cannot use lookaround assertions"
        try:
            _parser(constraint.kind, constraint.spec)
        except Exception as exc:
            return f"lm-format-enforcer cannot express this {constraint.kind} constraint: {reason_from(exc)}"
        return None

    def compile(self, constraint: GuidedConstraint) -> GuidedConstraint:
        # parsers are cheap to build and carry per-use state, so each sequence builds its own
        _parser(constraint.kind, constraint.spec)
        return constraint

    def new_grammar(self, compiled: GuidedConstraint) -> LMFormatEnforcerGrammar:
        parser = _parser(compiled.kind, compiled.spec)
        enforcer = TokenEnforcer(self._enforcer_data, parser)
        # TokenEnforcer replaced the parser's config with its alphabet; bound whitespace like the
        # other backends so a small model cannot loop on it
        parser.config = CharacterLevelParserConfig(
            alphabet=self._enforcer_data.tokenizer_alphabet,
            max_consecutive_whitespaces=DEFAULT_MAX_JSON_WHITESPACE,
        )
        return LMFormatEnforcerGrammar(enforcer, self._data.eos_token_ids)
