"""The conformance kit for tool-call parsers: streamed deltas must add up to the whole-text result.

Usage in a plugin's tests::

    from tessera.core.testing import check_tool_parser

    def test_my_parser_conforms():
        check_tool_parser(MyToolParser, ['<call>{"name": "f", "arguments": {}}</call>', "plain text"],
                          malformed=["<call>{not json</call>"])

Every failure is an AssertionError naming the parser, the sample and the chunking that broke it.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tessera.core.interfaces.tool_parser import (
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    ToolParserDelta,
)

Sample = str | tuple[str, ExtractedToolCalls | None]

# Prose every parser must leave alone: no calls, the text back unchanged as content.
PLAIN_TEXT_SAMPLES: tuple[str, ...] = (
    "",
    "Hello! How can I help you today?",
    "  leading and trailing whitespace \n",
    "Unicode: café, 日本語, emoji 🧩, math ∑ ≤ ∞.",
)
NUM_RANDOM_CHUNKINGS = 5
_MAX_SHOWN = 120


def conformance_samples(parser_cls: type[ToolParser]) -> tuple[str, ...]:
    """The model texts a parser ships for the contract test: `CONFORMANCE_SAMPLES` on the
    class, else a module-level `CONFORMANCE_SAMPLES` in the parser's module, else none."""
    samples = getattr(parser_cls, "CONFORMANCE_SAMPLES", None)
    if samples is None:
        module = sys.modules.get(parser_cls.__module__) or inspect.getmodule(parser_cls)
        samples = getattr(module, "CONFORMANCE_SAMPLES", None)
    return tuple(samples or ())


def check_tool_parser(
    parser_cls: type[ToolParser],
    samples: Iterable[Sample],
    tools: list[dict[str, Any]] | None = None,
    *,
    malformed: Iterable[str] = (),
    tokenizer: Any = None,
    num_random_chunkings: int = NUM_RANDOM_CHUNKINGS,
    seed: int = 0,
) -> None:
    """Check `parser_cls` on every sample; raise AssertionError at the first violation.

    `samples`: model output texts, each optionally paired with the ExtractedToolCalls it must
    give (names, arguments compared as JSON, content; ids are not compared). `malformed`: texts
    that must give no calls and come back unchanged as content. PLAIN_TEXT_SAMPLES are always
    checked as malformed. Each text is streamed one character at a time, split in two at every
    boundary, whole, and in `num_random_chunkings` random chunkings.
    """
    rng = random.Random(seed)
    cases: list[tuple[str, ExtractedToolCalls | None, bool]] = []
    for sample in samples:
        text, expected = (sample, None) if isinstance(sample, str) else sample
        cases.append((text, expected, False))
    cases += [(text, None, True) for text in (*malformed, *PLAIN_TEXT_SAMPLES)]
    for text, expected, is_malformed in cases:
        where = f"{parser_cls.__name__} on {_show(text)}"
        result = _extract(parser_cls, tokenizer, tools, text, where)
        _check_result(result, where)
        if is_malformed and (result.tool_calls or (result.content or "") != text):
            raise AssertionError(
                f"{where}: text that is not a tool call must come back unchanged as content; got "
                f"{len(result.tool_calls)} call(s) and content {_show(result.content)}"
            )
        if expected is not None:
            _check_expected(result, expected, where)
        for chunks, how in _chunkings(text, rng, num_random_chunkings):
            streamed = _stream(parser_cls, tokenizer, tools, chunks, f"{where}, {how}")
            _check_same(streamed, result, f"{where}, {how}")


def _show(text: str | None) -> str:
    if text is None:
        return "None"
    return repr(text) if len(text) <= _MAX_SHOWN else repr(text[:_MAX_SHOWN]) + f"... ({len(text)} chars)"


def _extract(
    parser_cls: type[ToolParser], tokenizer: Any, tools: Any, text: str, where: str
) -> ExtractedToolCalls:
    try:
        result = parser_cls(tokenizer, tools).extract_tool_calls(text)
    except Exception as exc:
        raise AssertionError(f"{where}: extract_tool_calls raised {exc!r}; malformed output must come back as content") from exc
    if not isinstance(result, ExtractedToolCalls):
        raise AssertionError(f"{where}: extract_tool_calls returned {type(result).__name__}, not ExtractedToolCalls")
    return result


def _check_result(result: ExtractedToolCalls, where: str) -> None:
    if result.content is not None and not isinstance(result.content, str):
        raise AssertionError(f"{where}: content is {type(result.content).__name__}, not str | None")
    ids = [call.id for call in result.tool_calls if call.id is not None]
    if len(ids) != len(set(ids)):
        raise AssertionError(f"{where}: tool call ids repeat: {ids}")
    for i, call in enumerate(result.tool_calls):
        if not isinstance(call, ToolCall) or not isinstance(call.name, str) or not call.name:
            raise AssertionError(f"{where}: call {i} has no name: {call!r}")
        try:
            arguments = json.loads(call.arguments)
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"{where}: call {i} ({call.name}) arguments are not JSON: {_show(call.arguments)} ({exc})") from None
        if not isinstance(arguments, dict):
            raise AssertionError(f"{where}: call {i} ({call.name}) arguments are not a JSON object: {_show(call.arguments)}")


def _check_expected(result: ExtractedToolCalls, expected: ExtractedToolCalls, where: str) -> None:
    got = [(call.name, json.loads(call.arguments)) for call in result.tool_calls]
    want = [(call.name, json.loads(call.arguments)) for call in expected.tool_calls]
    if got != want:
        raise AssertionError(f"{where}: calls {got} != expected {want}")
    if (result.content or "") != (expected.content or ""):
        raise AssertionError(f"{where}: content {_show(result.content)} != expected {_show(expected.content)}")


def _chunkings(text: str, rng: random.Random, num_random: int) -> Iterator[tuple[list[str], str]]:
    yield [text], "fed whole"
    yield list(text), "fed one character at a time"
    for i in range(1, len(text)):
        yield [text[:i], text[i:]], f"split at character {i}"
    for _ in range(num_random if len(text) > 2 else 0):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(8, len(text) - 1))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        yield chunks, f"fed in chunks of {[len(chunk) for chunk in chunks]}"


def _stream(
    parser_cls: type[ToolParser], tokenizer: Any, tools: Any, chunks: Sequence[str], where: str
) -> ExtractedToolCalls:
    parser = parser_cls(tokenizer, tools)
    content: list[str] = []
    calls: list[ToolCall] = []
    for step, chunk in enumerate([*chunks, None]):
        try:
            delta = parser.finish() if chunk is None else parser.parse_delta(chunk)
        except Exception as exc:
            what = "finish()" if chunk is None else f"parse_delta on chunk {step}"
            raise AssertionError(f"{where}: {what} raised {exc!r}") from exc
        if not isinstance(delta, ToolParserDelta) or not isinstance(delta.content, str):
            raise AssertionError(f"{where}: step {step} returned {delta!r}, not a ToolParserDelta with str content")
        content.append(delta.content)
        for call_delta in delta.tool_calls:
            _add_call_delta(calls, call_delta, f"{where}, step {step}")
    return ExtractedToolCalls(tool_calls=calls, content="".join(content) or None)


def _add_call_delta(calls: list[ToolCall], delta: DeltaToolCall, where: str) -> None:
    if not isinstance(delta.arguments, str):
        raise AssertionError(f"{where}: call {delta.index} arguments fragment is {type(delta.arguments).__name__}, not str")
    if delta.index == len(calls):  # the first delta of a new call
        if not delta.name:
            raise AssertionError(f"{where}: the first delta of call {delta.index} has no name: {delta!r}")
        calls.append(ToolCall(delta.name, delta.arguments, delta.id))
        return
    if delta.index != len(calls) - 1:
        raise AssertionError(
            f"{where}: delta for call index {delta.index} after {len(calls)} call(s) started; "
            f"indexes must run 0, 1, 2, ... and a call's deltas must come before the next call's"
        )
    if delta.name is not None or delta.id is not None:
        raise AssertionError(f"{where}: call {delta.index} got its name/id again: {delta!r}; they are sent once, in the first delta")
    calls[-1].arguments += delta.arguments


def _check_same(streamed: ExtractedToolCalls, whole: ExtractedToolCalls, where: str) -> None:
    if (streamed.content or "") != (whole.content or ""):
        raise AssertionError(f"{where}: streamed content {_show(streamed.content)} != non-streaming content {_show(whole.content)}")
    if len(streamed.tool_calls) != len(whole.tool_calls):
        raise AssertionError(
            f"{where}: {len(streamed.tool_calls)} streamed call(s) != {len(whole.tool_calls)} non-streaming: "
            f"{[c.name for c in streamed.tool_calls]} vs {[c.name for c in whole.tool_calls]}"
        )
    for i, (got, want) in enumerate(zip(streamed.tool_calls, whole.tool_calls)):
        if got.name != want.name:
            raise AssertionError(f"{where}: call {i} streamed name {got.name!r} != non-streaming {want.name!r}")
        if got.arguments != want.arguments:
            raise AssertionError(
                f"{where}: call {i} ({got.name}) streamed arguments {_show(got.arguments)} != "
                f"non-streaming {_show(want.arguments)}"
            )
    _check_result(streamed, where)
