"""The `example_json` tool parser: `<call>{"name": ..., "arguments": {...}}</call>` -> tool_calls."""

from __future__ import annotations

import json
from typing import Any

from tessera.core.interfaces import (
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    ToolParserDelta,
)

OPEN = "<call>"
CLOSE = "</call>"


def parse_call(body: str) -> ToolCall | None:
    """The call written between the tags, or None when it is not a well-formed call."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def _held_back(text: str) -> int:
    """Length of the longest suffix of `text` that may be the start of an opening tag."""
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-length:]):
            return length
    return 0


class _Scanner:
    """Splits text fed in any fragments into content and complete calls."""

    def __init__(self) -> None:
        self.pending = ""  # text not yet classified
        self.in_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.pending += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self.in_call:
                start = self.pending.find(OPEN)
                if start < 0:
                    keep = _held_back(self.pending)
                    cut = len(self.pending) - keep
                    content.append(self.pending[:cut])
                    self.pending = self.pending[cut:]
                    break
                content.append(self.pending[:start])
                self.pending = self.pending[start + len(OPEN) :]
                self.in_call = True
            else:
                end = self.pending.find(CLOSE)
                if end < 0:
                    break
                body = self.pending[:end]
                self.pending = self.pending[end + len(CLOSE) :]
                self.in_call = False
                call = parse_call(body)
                if call is None:  # malformed: the model's text goes back as content
                    content.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
        return "".join(content), calls

    def flush(self) -> str:
        """Whatever is left (a partial tag, an unclosed call) is content."""
        rest = (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return rest


class ExampleJsonToolParser(ToolParser):
    """Tool calls as JSON objects between <call> and </call>; everything else is content."""

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._stream = _Scanner()
        self._num_calls = 0

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        scanner = _Scanner()
        content, calls = scanner.feed(text)
        content += scanner.flush()
        return ExtractedToolCalls(tool_calls=calls, content=content or None)

    def parse_delta(self, delta_text: str) -> ToolParserDelta:
        content, calls = self._stream.feed(delta_text)
        return ToolParserDelta(content=content, tool_calls=self._deltas(calls))

    def finish(self) -> ToolParserDelta:
        return ToolParserDelta(content=self._stream.flush())

    def _deltas(self, calls: list[ToolCall]) -> list[DeltaToolCall]:
        deltas = []
        for call in calls:
            deltas.append(
                DeltaToolCall(index=self._num_calls, name=call.name, arguments=call.arguments)
            )
            self._num_calls += 1
        return deltas
