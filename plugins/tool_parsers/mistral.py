"""The `mistral` tool parser: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` and `[TOOL_CALLS]name[ARGS]{...}`."""

from __future__ import annotations

from collections.abc import Generator

from tessera.plugins.tool_parsers._common import CallStream, StreamingToolParser, random_id
from tessera.plugins.tool_parsers._json_stream import EOF, Chars, Malformed, next_non_ws, skip_ws

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_MAX_NAME_CHARS = 256
ARGS_TAG = "[ARGS]"
CALL_ID_TAG = "[CALL_ID]"


def is_mistral_tool_call_id(value: str) -> bool:
    return len(value) == 9 and value.isascii() and value.isalnum()


class MistralToolParser(StreamingToolParser):
    """Mistral / Mixtral instruct models (v3 JSON list, and the v11+ `[ARGS]` form).

    `[TOOL_CALLS]` is a control token: the request must keep special tokens (`adjust_request`
    does). Ids are 9 alphanumeric characters, the only ids Mistral's templates accept.
    """

    start_tags = ("[TOOL_CALLS]",)
    CONFORMANCE_SAMPLES = (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"n": -1.5e3}}]',
        'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"s": "x"}}, garbage',
        "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Zürich\"}[TOOL_CALLS]get_time[ARGS]{}",
        "[TOOL_CALLS]lookup[CALL_ID]abc123XYZ[ARGS]{\"id\": 7}",
        "[TOOL_CALLS] no calls here, [TOOL_CALLS][] and [TOOL_CALLS]bad name[ARGS]{}",
        '[TOOL_CALLS]{"name": "single", "arguments": {"deep": [[{"a": "]"}]]}}',
        '[TOOL_CALLS][{"name": "trunc", "arguments": {"a": [1, 2',
    )

    def make_tool_call_id(self) -> str:
        return random_id(9)

    def read_region(self, stream: CallStream, tag: str) -> Chars:
        c = yield from next_non_ws()
        if c == "{":  # a single call without the list
            return (yield from stream.read_call_object())
        if c == "[":
            return (yield from self._read_list(stream))
        if c in _NAME_CHARS:
            return (yield from self._read_named_call(stream, c))
        raise Malformed(f"unexpected {c!r} after {tag}")

    def _read_list(self, stream: CallStream) -> Chars:
        c = yield from next_non_ws()
        if c == "]":
            return ""  # an empty list is no call: the region reads as text
        while True:
            if c != "{":
                raise Malformed(f"expected a call object, got {c!r}")
            c = yield from stream.read_call_object()
            c = yield from skip_ws(c)
            if c == "]":
                return ""
            if c != ",":
                raise Malformed(f"expected ',' or ']', got {c!r}")
            c = yield from next_non_ws()

    def _read_named_call(self, stream: CallStream, c: str) -> Chars:
        name = ""
        while c != EOF and c in _NAME_CHARS and len(name) < _MAX_NAME_CHARS:
            name += c
            c = yield
        call_id = None
        tag = yield from _read_one_of(c, (CALL_ID_TAG, ARGS_TAG))
        if tag == CALL_ID_TAG:
            call_id = ""
            c = yield
            while c != EOF and c.isascii() and c.isalnum() and len(call_id) < 64:
                call_id += c
                c = yield
            if not is_mistral_tool_call_id(call_id):
                call_id = None  # the model's own id is kept only when Mistral accepts it
            yield from _read_one_of(c, (ARGS_TAG,))
        stream.commit(name, call_id)
        c = yield from next_non_ws()
        c = yield from stream.read_arguments(c, is_committed=True, buffer=[])
        stream.end_call()
        return c


def _read_one_of(c: str, tags: tuple[str, ...]) -> Generator[None, str, str]:
    """Read one of `tags` starting at `c` (the last character is the tag's own)."""
    got = ""
    while True:
        if c == EOF:
            raise Malformed(f"text ended inside {got!r}")
        got += c
        if got in tags:
            return got
        if not any(tag.startswith(got) for tag in tags):
            raise Malformed(f"expected one of {tags}, got {got!r}")
        c = yield
