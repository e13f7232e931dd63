"""StructuredOutputManager (backend resolution, compile cache, readiness, masks) and bitmask application."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import torch

from tessera.core.engine.structured_output import StructuredOutputManager
from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.guided import Grammar, GuidedConstraint, GuidedDecodingBackend
from tessera.core.registry import Registry
from tessera.core.worker.sampler import apply_token_bitmask_

VOCAB = 70  # not a multiple of 32 on purpose
EOS = 2


class FakeTokenizer:
    eos_token_id = EOS


class FakeGrammar(Grammar):
    """Allows exactly the ids in `allowed`; terminates on EOS."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed
        self.accepted: list[int] = []

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        bitmask[row].zero_()
        for t in self.allowed:
            bitmask[row, t // 32] |= (1 << (t % 32)) if t % 32 != 31 else -(1 << 31)

    def accept_token(self, token_id: int) -> bool:
        if token_id not in self.allowed:
            return False
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return EOS in self.accepted


SLOW_CHECK = threading.Event()  # holds the check of the constraint whose spec is "SLOW_CHECK"


def fake_backend(name: str, unsupported: set[str], gate: threading.Event | None = None) -> type:
    class Backend(GuidedDecodingBackend):
        compiled: list[GuidedConstraint] = []  # noqa: RUF012 - per-class log of compile calls
        started = threading.Event()

        def unsupported_reason(self, constraint: GuidedConstraint) -> str | None:
            if constraint.spec == "INVALID":
                raise InvalidRequestError("bad regex", param="guided_regex")
            if constraint.spec == "SLOW_CHECK":
                assert SLOW_CHECK.wait(timeout=30)
            return f"{name} cannot do {constraint.kind}" if constraint.kind in unsupported else None

        def compile(self, constraint: GuidedConstraint) -> Any:
            type(self).started.set()
            if gate is not None:
                assert gate.wait(timeout=30)
            if constraint.spec == "BROKEN":
                raise ValueError("compile exploded")
            type(self).compiled.append(constraint)
            return [EOS, 40, 69]

        def new_grammar(self, compiled: Any) -> Grammar:
            return FakeGrammar(compiled)

    Backend.name = name
    Backend.compiled = []
    return Backend


def make_manager(default: str = "auto", gate: threading.Event | None = None) -> tuple[StructuredOutputManager, dict]:
    registry = Registry("guided_decoding_backend")
    backends = {
        "xgrammar": fake_backend("xgrammar", {"regex"}, gate),
        "llguidance": fake_backend("llguidance", {"regex"}, gate),
        "outlines": fake_backend("outlines", {"grammar"}, gate),
        "lm-format-enforcer": fake_backend("lm-format-enforcer", {"grammar"}, gate),
    }
    for name, cls in backends.items():
        registry.register(name, cls)
    return StructuredOutputManager(registry, FakeTokenizer(), VOCAB, default_backend=default), backends


def wait_compiled(manager: StructuredOutputManager, request_id: str) -> None:
    manager._requests[request_id].future.result(timeout=30)  # the test's only synchronization


def test_auto_takes_the_fastest_backend_that_can(caplog) -> None:
    manager, _ = make_manager()
    assert manager.auto_order() == ["xgrammar", "llguidance", "outlines", "lm-format-enforcer"]
    assert manager.validate(GuidedConstraint("json", "{}")) == "xgrammar"
    caplog.set_level(logging.INFO)
    assert manager.validate(GuidedConstraint("regex", "a+")) == "outlines"
    assert "skipping xgrammar" in caplog.text and "xgrammar cannot do regex" in caplog.text
    assert "skipping llguidance" in caplog.text


def test_auto_with_no_capable_backend_is_a_400_with_every_reason() -> None:
    manager, _ = make_manager()
    manager._registry.register("xgrammar", fake_backend("xgrammar", {"grammar"}))
    manager._registry.register("llguidance", fake_backend("llguidance", {"grammar"}))
    with pytest.raises(InvalidRequestError) as info:
        manager.validate(GuidedConstraint("grammar", "root ::= x"))
    assert info.value.param == "guided_grammar"
    assert "xgrammar cannot do grammar" in info.value.message and "outlines cannot do grammar" in info.value.message


def test_explicit_backend_that_cannot_is_a_400_with_its_reason() -> None:
    manager, _ = make_manager()
    with pytest.raises(InvalidRequestError) as info:
        manager.validate(GuidedConstraint("regex", "a+", backend="llguidance"))
    assert info.value.param == "guided_decoding_backend"
    assert "llguidance cannot do regex" in info.value.message
    assert manager.validate(GuidedConstraint("regex", "a+", backend="outlines")) == "outlines"
    assert manager.validate(GuidedConstraint("json", "{}", backend="guidance")) == "llguidance"  # vLLM's name


def test_server_default_backend_is_preferred_but_not_forced() -> None:
    manager, _ = make_manager(default="outlines")
    assert manager.validate(GuidedConstraint("json", "{}")) == "outlines"
    assert manager.validate(GuidedConstraint("json", "{}", backend="auto")) == "xgrammar"
    # the default cannot do it and the request did not insist: the fastest capable one serves it
    assert manager.validate(GuidedConstraint("grammar", "root ::= x")) == "xgrammar"


def test_unknown_backend_lists_the_registered_names() -> None:
    manager, _ = make_manager()
    with pytest.raises(InvalidRequestError) as info:
        manager.validate(GuidedConstraint("json", "{}", backend="nope"))
    assert info.value.param == "guided_decoding_backend"
    for name in ("auto", "xgrammar", "llguidance", "outlines", "lm-format-enforcer"):
        assert name in info.value.message
    with pytest.raises(InvalidRequestError):
        make_manager(default="nope")


def test_invalid_spec_is_a_400_naming_the_parameter() -> None:
    manager, _ = make_manager()
    with pytest.raises(InvalidRequestError) as info:
        manager.validate(GuidedConstraint("regex", "INVALID"))
    assert info.value.param == "guided_regex"


def test_compile_is_cached_by_backend_and_constraint() -> None:
    manager, backends = make_manager()
    json_c = GuidedConstraint("json", '{"type": "object"}')
    manager.submit("a", json_c)
    manager.submit("b", GuidedConstraint("json", '{"type": "object"}', backend="auto"))  # same compile
    manager.submit("c", GuidedConstraint("json", '{"type": "object"}', backend="outlines"))  # another backend
    for request_id in "abc":
        wait_compiled(manager, request_id)
    assert len(backends["xgrammar"].compiled) == 1
    assert len(backends["outlines"].compiled) == 1
    assert manager.num_cache_hits == 1


def test_request_is_ready_only_after_its_grammar_compiled() -> None:
    gate = threading.Event()
    manager, backends = make_manager(gate=gate)
    manager.submit("r", GuidedConstraint("json", "{}"))
    assert backends["xgrammar"].started.wait(timeout=30)
    assert not manager.is_ready("r")  # compiling in the worker; the caller did not block
    bitmask, rows = manager.grammar_bitmask(["r"])
    assert bitmask is None and rows == {}
    gate.set()
    wait_compiled(manager, "r")
    assert manager.is_ready("r") and manager.compile_error("r") is None


def test_submit_leaves_even_the_backend_check_to_the_compile_thread() -> None:
    # a 3,000-property JSON schema took ~5 s to check; on the engine's loop every running request
    # waited that long for its next token
    manager, _ = make_manager()
    SLOW_CHECK.clear()
    try:
        manager.submit("r", GuidedConstraint("json", "SLOW_CHECK"))  # returns while the check waits
        assert not manager.is_ready("r")
    finally:
        SLOW_CHECK.set()
    wait_compiled(manager, "r")
    assert manager.compile_error("r") is None


def test_grammar_bitmask_rows_accept_and_terminate() -> None:
    manager, _ = make_manager()
    manager.submit("r1", GuidedConstraint("json", "{}"))
    manager.submit("r2", GuidedConstraint("regex", "x"))
    for request_id in ("r1", "r2"):
        wait_compiled(manager, request_id)
    bitmask, rows = manager.grammar_bitmask(["plain", "r2", "r1"])  # "plain" is not guided
    assert rows == {"r2": 0, "r1": 1}
    assert bitmask is not None and bitmask.shape == (2, 3) and bitmask.dtype == torch.int32
    allowed = [t for t in range(VOCAB) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
    assert allowed == [EOS, 40, 69]
    assert not manager.accept_token("r1", 5)
    assert manager.accept_token("r1", 40) and not manager.is_terminated("r1")
    assert manager.accept_token("r1", EOS) and manager.is_terminated("r1")
    manager.remove("r1")
    assert not manager.has_request("r1")
    assert manager.grammar_bitmask(["r1", "r2"])[1] == {"r2": 0}


def test_failed_compile_is_reported_and_masks_to_eos_only() -> None:
    manager, _ = make_manager()
    manager.submit("r", GuidedConstraint("json", "BROKEN"))
    with pytest.raises(ValueError):
        wait_compiled(manager, "r")
    assert manager.is_ready("r")
    assert "compile exploded" in (manager.compile_error("r") or "")
    bitmask, rows = manager.grammar_bitmask(["r"])
    assert rows == {"r": 0} and bitmask is not None
    assert bitmask[0].tolist() == [1 << EOS, 0, 0]


def _naive_apply(logits: torch.Tensor, bitmask: torch.Tensor, row_indices: list[int]) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(row_indices):
        for t in range(logits.shape[1]):
            word = t // 32
            is_allowed = word < bitmask.shape[1] and (int(bitmask[i, word]) >> (t % 32)) & 1
            if not is_allowed:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("words", [3, 4])  # mask narrower than the vocab (96 < 100), and wider
def test_apply_token_bitmask_matches_a_naive_loop(words: int) -> None:
    generator = torch.Generator().manual_seed(words)
    logits = torch.randn(6, 100, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    row_indices = [4, 0, 2]
    expected = _naive_apply(logits, bitmask, row_indices)
    apply_token_bitmask_(logits, bitmask, row_indices)
    assert torch.equal(logits, expected)
    untouched = torch.randn(3, 100, generator=generator)
    full = untouched.clone()
    apply_token_bitmask_(full, bitmask)
    assert torch.equal(full, _naive_apply(untouched, bitmask, [0, 1, 2]))
