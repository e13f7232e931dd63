"""Tool-call parsers: turn model text into OpenAI `tool_calls`, whole or as streaming deltas."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str | None = None  # the serving layer assigns one when the parser does not


@dataclass
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: str | None  # text outside the calls (None when there is none)

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass
class DeltaToolCall:
    index: int  # position of the call in this choice's tool_calls
    id: str | None = None  # sent once, with the first delta of the call
    name: str | None = None  # sent once, with the first delta of the call
    arguments: str = ""  # the next fragment of the JSON arguments


@dataclass
class ToolParserDelta:
    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.content and not self.tool_calls


class ToolParser(ABC):
    """Registered under a `--tool-call-parser` name.

    The chat serving layer creates one instance per choice of a request with
    `(tokenizer, tools)`. Non-streaming: it calls `extract_tool_calls` once on the whole text.
    Streaming: it calls `parse_delta` with each new text fragment in order, then `finish` once.
    The deltas of a stream, concatenated, equal the non-streaming result. Malformed model output
    must not raise: it is returned as content.
    """

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools or []

    @abstractmethod
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """Called once with the whole output text of a non-streaming choice."""

    @abstractmethod
    def parse_delta(self, delta_text: str) -> ToolParserDelta:
        """Called for every new fragment of a streamed choice."""

    @abstractmethod
    def finish(self) -> ToolParserDelta:
        """Called once when a streamed choice ends: flush whatever is held back."""

    def adjust_request(self, request: Any) -> Any:
        """Called before generation, e.g. to keep special tokens the parser needs."""
        return request
