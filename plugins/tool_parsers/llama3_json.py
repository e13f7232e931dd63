"""The `llama3_json` tool parser: Llama 3.x `{"name": ..., "parameters": {...}}` calls, `;`-separated."""

from __future__ import annotations

from tessera.plugins.tool_parsers._common import CallStream, StreamingToolParser
from tessera.plugins.tool_parsers._json_stream import WHITESPACE, Chars, Malformed, next_non_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(StreamingToolParser):
    """Llama 3.1/3.2/3.3 JSON tool calls: at the start of the output, or after `<|python_tag|>`.

    A bare JSON object at the start of the output is a call only when its name is one of the
    request's tools (when tools are given), so a plain JSON answer stays content.
    `<|python_tag|>` is a special token: `adjust_request` keeps special tokens.
    """

    start_tags = (PYTHON_TAG,)
    leading_tags = ("{",)
    CONFORMANCE_SAMPLES = (
        '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "fahrenheit"}}',
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": "z"}}',
        '{"type": "function", "name": "search", "parameters": {"query": "tessera 🧩"}}',
        '{"answer": 42, "note": "plain JSON, no call"}',
        'I will call a tool. <|python_tag|>{"name": "f", "parameters": {}}',
        '{"name": "f", "parameters": {"a": 1}}; nonsense',
        '<|python_tag|>{"name": "broken" "parameters": {}}',
        '  {"name": "trunc", "parameters": {"list": [1, {"k": "v',
    )

    def read_region(self, stream: CallStream, tag: str) -> Chars:
        is_bare = tag == "{"
        c = "{" if is_bare else (yield from next_non_ws())
        while True:
            if c != "{":
                raise Malformed(f"expected a call object, got {c!r}")
            c = yield from stream.read_call_object(require_known_name=is_bare)
            whitespace = ""
            while c in WHITESPACE:
                whitespace += c
                c = yield
            if c != ";":
                return whitespace + c
            c = yield from next_non_ws()
