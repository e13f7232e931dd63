"""benchmarks/guided_throughput.py: its output checks, on a server ignoring constraints and on tessera."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fake_http import JsonHandler, serving

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))

import guided_throughput as gt  # noqa: E402
from _servers import Server, free_port  # noqa: E402

PROSE = "1. Preheat the oven. 2. Mix the flour"
PREFIX = '{\n  "steps": [\n    "Preheat the oven", "Mix'


def test_valid_prefix_accepts_prefixes_of_the_schema_language_only() -> None:
    for text in ["{", ' \n{"st', '{"steps": [', PREFIX, '{"steps": ["a\\', '{"steps": ["a", "b"]}']:
        assert gt.is_valid_prefix(text), text
    for text in [PROSE, '{"stops"', '{"steps": [1', '{"steps": ["a"]} and more', '{"steps": ["a\nb"']:
        assert not gt.is_valid_prefix(text), text


def test_check_output() -> None:
    assert gt.check_output(PREFIX, "length", 8, 8, is_constrained=True) is None
    assert gt.check_output(PROSE, "length", 8, 8, is_constrained=False) is None
    assert "not a prefix" in (gt.check_output(PROSE, "length", 8, 8, is_constrained=True) or "")
    assert "not a prefix" in (gt.check_output("", "length", 8, 8, is_constrained=True) or "")
    # a grammar that completed under ignore_eos ends the request early (tessera: "abort")
    assert "ended early" in (gt.check_output('{"steps": []}', "abort", 5, 8, is_constrained=True) or "")
    assert "ended early" in (gt.check_output(PROSE, "stop", 8, 8, is_constrained=False) or "")


class _IgnoresConstraints(JsonHandler):
    """A chat server that answers every request with the same prose, constrained or not."""

    def do_POST(self) -> None:  # noqa: N802
        body = self.read_body()
        self.send_json({"choices": [{"index": 0, "message": {"role": "assistant", "content": PROSE},
                                     "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": body["max_tokens"]}})


@pytest.fixture
def ignoring_server() -> Iterator[str]:
    with serving(_IgnoresConstraints) as url:
        yield url


def test_unconstrained_text_under_a_constraint_is_reported(ignoring_server: str) -> None:
    result = gt.measure(ignoring_server, ["xgrammar"], concurrency=2, max_tokens=8, repeats=1,
                        log=lambda _: None)
    errors = result["errors"]
    assert len(errors) == 2 and all(e.startswith("xgrammar: not a prefix") for e in errors)
    assert result["rows"]["unconstrained"]["tokens"] == 16 and result["rows"]["xgrammar"]["tokens"] == 16
    timed = _IgnoresConstraints.bodies[-4:]  # after the warm-up: two unconstrained, two constrained
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 8 and b["temperature"] == 0 for b in timed)
    assert [b.get("guided_decoding_backend") for b in timed] == [None, None, "xgrammar", "xgrammar"]
    assert timed[2]["response_format"]["json_schema"]["schema"] == gt.schema(8)
    prompts = [b["messages"][0]["content"] for b in timed]
    assert sorted(prompts[:2]) == sorted(prompts[2:]) and len(set(prompts)) == 2


@pytest.mark.slow
def test_guided_throughput_against_tessera_serve(tmp_path: Any) -> None:
    port = free_port()
    command = [sys.executable, "-m", "tessera.api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = Server("tessera", command, port, log_path=str(tmp_path / "serve.log"))
    server.start(timeout_s=300)
    try:
        result = gt.measure(server.base_url, ["xgrammar"], concurrency=2, max_tokens=8, repeats=1)
    finally:
        server.stop()
    assert result["errors"] == []
    rows, texts = result["rows"], result["texts"]
    assert rows["unconstrained"]["tokens"] == 16 and rows["xgrammar"]["tokens"] == 16
    assert rows["xgrammar"]["tokens_per_s"] > 0 and rows["unconstrained"]["ratio"] == 1.0
    # the check that passed the constrained outputs fails the same prompts' unconstrained ones
    assert all(text.lstrip().startswith("{") and gt.is_valid_prefix(text) for text in texts["xgrammar"])
    assert not any(gt.is_valid_prefix(text) for text in texts["unconstrained"])
    masks = gt.mask_times(["xgrammar", "auto"], texts, max_tokens=8, repeats=1)
    assert masks["xgrammar"]["mask_ms_mean"] > 0 and masks["xgrammar"]["num_tokens"] >= 1
    assert masks["auto"]["resolves_to"] == "xgrammar"
