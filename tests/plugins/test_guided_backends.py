"""Contract test of every registered guided-decoding backend, driven with the real SmolLM2 tokenizer."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from decimal import Decimal

import jsonschema
import numpy as np
import pytest
import torch

from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.guided import GuidedConstraint, GuidedDecodingBackend
from tessera.core.plugins import load_plugins
from tessera.plugins.guided._tokenizer_data import bitmask_to_ids, bitmask_words, get_tokenizer_data

REGISTRY = load_plugins().guided_decoding_backends
BACKENDS = REGISTRY.names()
PADDING = 64  # the model's vocab is wider than the tokenizer's: padded ids must never be allowed

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
CHOICES = ["red", "green", "dark red", 'say "hi"\n', "naïve"]
REGEX = r"\d{3}-[a-z]{2,5}(\.[A-Z])?"
GRAMMAR = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9] [0-9]? | "(" expr ")"'
LARK = 'start: "yes" | "no" | "(" start ")"'


def _is_arith(text: str) -> bool:
    previous = None
    while previous != text:  # collapse innermost parentheses until none are left
        previous, text = text, re.sub(r"\((\d{1,2}(\+\d{1,2})*)\)", "0", text)
    return re.fullmatch(r"\d{1,2}(\+\d{1,2})*", text) is not None


def _number(text: str) -> int | float:
    # JSON Schema's "integer" is any number with a zero fraction: lm-format-enforcer writes 1E5
    value = Decimal(text)
    return int(value) if value == value.to_integral_value() else float(value)


def _is_json(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text, parse_float=_number)
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# (case id, constraint, full-text check, is the check exact: EOS allowed <=> text complete)
CASES: list[tuple[str, GuidedConstraint, Callable[[str], bool], bool]] = [
    ("choice", GuidedConstraint("choice", json.dumps(CHOICES)), lambda t: t in CHOICES, True),
    ("regex", GuidedConstraint("regex", REGEX), lambda t: re.fullmatch(REGEX, t) is not None, True),
    ("json", GuidedConstraint("json", json.dumps(SCHEMA)), lambda t: _is_json(t, SCHEMA), False),
    ("json_object", GuidedConstraint("json_object", ""), lambda t: _is_json(t, {"type": "object"}), False),
    ("grammar_ebnf", GuidedConstraint("grammar", GRAMMAR), _is_arith, False),
    ("grammar_lark", GuidedConstraint("grammar", LARK), lambda t: re.fullmatch(r"\(*(yes|no)\)*", t) is not None
     and t.count("(") == t.count(")"), False),
    ("json_whitespace", GuidedConstraint("json", json.dumps(SCHEMA), whitespace_pattern=r"[ ]{0,1}"),
     lambda t: _is_json(t, SCHEMA) and "\n" not in t, False),
]

# what each built-in backend is expected to express (a third-party backend only has to be consistent)
UNSUPPORTED = {
    "outlines": {"grammar_ebnf", "grammar_lark"},
    "lm-format-enforcer": {"grammar_ebnf", "grammar_lark", "json_whitespace"},
    "xgrammar": {"json_whitespace"},
    "llguidance": set(),
}


@pytest.fixture(scope="module")
def backends(smollm2_tokenizer) -> dict[str, GuidedDecodingBackend]:
    vocab_size = len(smollm2_tokenizer) + PADDING
    return {name: REGISTRY.get(name)(smollm2_tokenizer, vocab_size) for name in BACKENDS}


@functools.cache
def _token_classes(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: is it a special token, does it close something (a quote, bracket, brace)."""
    data = get_tokenizer_data(tokenizer)
    special = np.zeros(data.num_tokens, dtype=bool)
    special[list(data.special_ids)] = True
    closing = np.array([any(c in token for c in b'"}])') for token in data.token_bytes])
    return special, closing


def _allowed_ids(bitmask_row: torch.Tensor, vocab_size: int) -> np.ndarray:
    flags = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(flags)


def drive(backend: GuidedDecodingBackend, grammar, seed: int, check: Callable[[str], bool], is_exact: bool,
          max_steps: int = 300) -> str:
    """A seeded random "model": any allowed token, EOS half the time it is allowed; return the text.

    A third of the time it prefers a token that closes something (a quote, bracket or brace), so
    free-text strings and nested JSON end within the step budget.
    """
    data = get_tokenizer_data(backend.tokenizer)
    special, closing = _token_classes(backend.tokenizer)
    eos = data.eos_token_ids[0]
    rng = np.random.default_rng(seed)
    bitmask = torch.zeros((2, bitmask_words(backend.vocab_size)), dtype=torch.int32)
    tokens: list[int] = []
    for _ in range(max_steps):
        bitmask.fill_(-1)  # row 1: stale bits must be overwritten, not OR-ed
        grammar.fill_bitmask(bitmask, 1)
        allowed = _allowed_ids(bitmask[1], backend.vocab_size)
        text = data.decode(tokens)
        assert allowed.size, f"no token allowed after {text!r}"
        assert allowed[-1] < data.num_tokens, "a padded id past the tokenizer is allowed"
        can_end = bool((allowed == eos).any())
        others = allowed[allowed != eos]
        assert not special[others].any(), "a special token is allowed"
        if can_end:
            assert check(text), f"EOS allowed after an incomplete text {text!r}"
        elif is_exact:
            assert not check(text), f"EOS not allowed after a complete text {text!r}"
        if can_end and (rng.random() < 0.5 or others.size == 0):
            assert grammar.accept_token(eos)
            assert grammar.is_terminated()
            return text
        closers = others[closing[others]]
        candidates = closers if closers.size and rng.random() < 0.35 else others
        token = int(rng.choice(candidates))
        assert grammar.accept_token(token), f"an allowed token {token} was rejected"
        tokens.append(token)
        if grammar.is_terminated():  # only EOS can follow
            break
    text = data.decode(tokens)
    assert grammar.is_terminated(), f"not finished after {max_steps} tokens: {text!r}"
    return text


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_output_satisfies_the_constraint(backends, name: str, case) -> None:
    case_id, constraint, check, is_exact = case
    backend = backends[name]
    reason = backend.unsupported_reason(constraint)
    if name in UNSUPPORTED:
        assert (reason is not None) == (case_id in UNSUPPORTED[name]), reason
    if reason is not None:
        assert isinstance(reason, str) and reason
        return
    compiled = backend.compile(constraint)
    for seed in range(3):
        text = drive(backend, backend.new_grammar(compiled), seed, check, is_exact)
        assert check(text), f"{name} produced {text!r} for {case_id}"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    ("kind", "spec", "param"),
    [
        ("json", "{not json", "guided_json"),
        ("json", '{"type": 5}', "guided_json"),
        ("json", "[1, 2]", "guided_json"),
        ("regex", "(unclosed", "guided_regex"),
        ("choice", "[]", "guided_choice"),
        ("choice", '["a", 1]', "guided_choice"),
        ("grammar", "   ", "guided_grammar"),
    ],
)
def test_invalid_spec_is_an_invalid_request(backends, name: str, kind: str, spec: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        backends[name].unsupported_reason(GuidedConstraint(kind, spec))  # type: ignore[arg-type]
    assert info.value.param == param


@pytest.mark.parametrize("name", BACKENDS)
def test_grammar_copy_is_independent_and_eos_ends_it(backends, smollm2_tokenizer, name: str) -> None:
    backend = backends[name]
    constraint = GuidedConstraint("choice", json.dumps(["yes", "no"]))
    if backend.unsupported_reason(constraint) is not None:
        pytest.skip(f"{name} cannot express a choice")
    grammar = backend.new_grammar(backend.compile(constraint))
    twin = grammar.copy()
    data = get_tokenizer_data(smollm2_tokenizer)
    yes = smollm2_tokenizer.encode("yes", add_special_tokens=False)
    assert len(yes) == 1
    assert grammar.accept_token(yes[0])
    bitmask = torch.zeros((1, bitmask_words(backend.vocab_size)), dtype=torch.int32)
    grammar.fill_bitmask(bitmask, 0)
    assert bitmask_to_ids(bitmask[0], backend.vocab_size) == [data.eos_token_id]
    twin.fill_bitmask(bitmask, 0)  # the copy is still at the start: "yes" and "no" both open
    assert yes[0] in bitmask_to_ids(bitmask[0], backend.vocab_size)
    assert grammar.accept_token(data.eos_token_id) and grammar.is_terminated()
    assert not twin.is_terminated()
    grammar.fill_bitmask(bitmask, 0)  # after EOS: only EOS (fail closed), never an error
    assert bitmask_to_ids(bitmask[0], backend.vocab_size) == [data.eos_token_id]
    assert not grammar.accept_token(yes[0])


@pytest.mark.parametrize("name", BACKENDS)
def test_rejects_a_disallowed_token(backends, smollm2_tokenizer, name: str) -> None:
    backend = backends[name]
    grammar = backend.new_grammar(backend.compile(GuidedConstraint("regex", r"[0-9]+")))
    letter = smollm2_tokenizer.encode("x", add_special_tokens=False)[0]
    assert not grammar.accept_token(letter)


def test_manager_with_the_real_backends(smollm2_tokenizer) -> None:
    from tessera.core.engine.structured_output import StructuredOutputManager
    from tessera.core.worker.sampler import apply_token_bitmask_

    vocab_size = len(smollm2_tokenizer) + PADDING
    manager = StructuredOutputManager(REGISTRY, smollm2_tokenizer, vocab_size)
    try:
        assert manager.validate(GuidedConstraint("json", json.dumps(SCHEMA))) == "xgrammar"
        # xgrammar has no whitespace pattern: auto moves on to the next fastest
        assert manager.validate(GuidedConstraint("json", "{}", whitespace_pattern=" ?")) == "llguidance"
        # anchors: outlines and lm-format-enforcer cannot, xgrammar can
        assert manager.validate(GuidedConstraint("regex", "^ab+$")) == "xgrammar"
        with pytest.raises(InvalidRequestError):
            manager.validate(GuidedConstraint("regex", "^ab+$", backend="outlines"))
        with pytest.raises(InvalidRequestError) as info:
            manager.validate(GuidedConstraint("grammar", GRAMMAR, backend="outlines"))
        assert info.value.param == "guided_decoding_backend" and "xgrammar or llguidance" in info.value.message

        # a seeded random-logits "model" through the sampler's masking path
        manager.submit("r", GuidedConstraint("choice", json.dumps(CHOICES)))
        manager._requests["r"].future.result(timeout=60)
        generator = torch.Generator().manual_seed(0)
        eos = smollm2_tokenizer.eos_token_id
        tokens: list[int] = []
        for _ in range(20):
            bitmask, rows = manager.grammar_bitmask(["r"])
            assert rows == {"r": 0}
            logits = torch.randn(1, vocab_size, generator=generator)
            apply_token_bitmask_(logits, bitmask, [0])
            token = int(logits.argmax())
            assert manager.accept_token("r", token)
            if token == eos:
                break
            tokens.append(token)
        assert manager.is_terminated("r")
        assert smollm2_tokenizer.decode(tokens) in CHOICES
    finally:
        manager.shutdown()
