"""The streaming engine every built-in tool parser shares: content, tags, calls, deltas."""

from __future__ import annotations

import json
import secrets
import string
from collections import deque
from collections.abc import Generator
from typing import Any, ClassVar

from tessera.core.interfaces import (
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    ToolParserDelta,
)
from tessera.plugins.tool_parsers._json_stream import (
    EOF,
    WHITESPACE,
    ArgsWriter,
    Chars,
    Malformed,
    NullWriter,
    next_non_ws,
    read_plain_string,
    read_value,
    skip_ws,
)

ARGUMENT_KEYS = ("arguments", "parameters")
_ALPHANUMERIC = string.ascii_letters + string.digits


def random_id(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    """The function names of an OpenAI `tools` list."""
    names = set()
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


class CallStream:
    """One choice's parse state. Text is fed one character at a time into `parser.scan()`.

    The outcome depends only on the text, never on how it was split into fragments, which is
    what makes streamed deltas add up to the non-streaming result. A call is committed once its
    name is read: damage before that point turns the call's text back into content; damage after
    it closes the arguments (still valid JSON) and the rest is read as text again.
    """

    def __init__(self, parser: StreamingToolParser) -> None:
        self.parser = parser
        self._queue: deque[str] = deque()
        self._content: list[str] = []
        self._calls: list[DeltaToolCall] = []
        self._held_ws = ""  # whitespace whose fate depends on what follows it
        self._is_at_start = True  # nothing but whitespace seen yet
        self._num_calls = 0
        self._is_call_open = False
        self._has_args = False
        self._writer: ArgsWriter | None = None
        self._is_region_committed = False
        self._raw: list[str] | None = None  # text read since the current region's tag
        self._last_char = EOF
        self._is_done = False
        self._gen = self._read_text()
        next(self._gen)

    # -- driving ---------------------------------------------------------------------------
    def feed(self, text: str) -> ToolParserDelta:
        self._queue.extend(text)
        self._pump(at_eof=False)
        return self._take_delta()

    def finish(self) -> ToolParserDelta:
        self._pump(at_eof=True)
        return self._take_delta()

    def unread(self, text: str) -> None:
        """Put characters back: they are read again, before anything not yet read."""
        self._queue.extendleft(reversed(text))

    def _pump(self, *, at_eof: bool) -> None:
        while not self._is_done and (self._queue or at_eof):
            c = self._queue.popleft() if self._queue else EOF
            self._last_char = c
            if self._raw is not None and c:
                self._raw.append(c)
            try:
                self._gen.send(c)
            except StopIteration:
                self._is_done = True

    def _take_delta(self) -> ToolParserDelta:
        delta = ToolParserDelta(content="".join(self._content), tool_calls=self._calls)
        self._content, self._calls = [], []
        return delta

    # -- text ------------------------------------------------------------------------------
    def _emit_text(self, text: str) -> None:
        self._content.append(self._held_ws + text)
        self._held_ws = ""
        self._is_at_start = False

    def _read_text(self) -> Generator[None, str, None]:
        while True:
            c = yield
            if c == EOF:
                if not self._num_calls:  # whitespace around calls is dropped, else kept
                    self._content.append(self._held_ws)
                return
            if c in WHITESPACE:
                self._held_ws += c
                continue
            tags = self.parser.start_tags + (self.parser.leading_tags if self._is_at_start else ())
            matched = c
            while any(tag.startswith(matched) and tag != matched for tag in tags):
                c = yield
                if c == EOF:
                    break
                matched += c
            if matched in tags:
                yield from self._read_region(matched)
            else:
                self._emit_text(matched[0])
                self.unread(matched[1:])

    def _read_region(self, tag: str) -> Generator[None, str, None]:
        prefix, self._held_ws = self._held_ws + tag, ""
        self._raw, self._is_region_committed = [], False
        leftover, is_complete = "", True
        try:
            leftover = yield from self.parser.read_region(self, tag)
        except Malformed:
            is_complete = False
        raw, self._raw = "".join(self._raw), None
        if not self._is_region_committed:  # not a call after all: it is text
            self._emit_text(prefix)
            self.unread(raw)
            return
        self._is_at_start = False
        if not is_complete:
            self._abort_call()
            leftover = self._last_char
        self.unread(leftover)

    # -- calls -----------------------------------------------------------------------------
    def commit(self, name: str, call_id: str | None = None) -> None:
        """Start call number `num_calls`: its id and name go out now, once."""
        self._is_region_committed = True
        self._calls.append(
            DeltaToolCall(self._num_calls, call_id or self.parser.make_tool_call_id(), name, "")
        )
        self._num_calls += 1
        self._is_call_open, self._has_args, self._writer = True, False, None

    def emit_args(self, fragment: str) -> None:
        if not fragment:
            return
        self._has_args = True
        last = self._calls[-1] if self._calls else None
        if last is not None and last.index == self._num_calls - 1:
            last.arguments += fragment
        else:
            self._calls.append(DeltaToolCall(self._num_calls - 1, arguments=fragment))

    def end_call(self) -> None:
        if not self._has_args:
            self.emit_args("{}")
        self._is_call_open, self._writer = False, None

    def _abort_call(self) -> None:
        if self._is_call_open:
            if self._writer is not None:
                self.emit_args(self._writer.closing_suffix())
            self.end_call()

    def read_arguments(self, c: str, *, is_committed: bool, buffer: list[str]) -> Chars:
        """Read an arguments value starting at `c`, streamed once the call is committed."""
        out = self.emit_args if is_committed else buffer.append
        if c == "{":
            writer = ArgsWriter(out)
            if is_committed:
                self._writer = writer
            c = yield from read_value(c, writer)
            self._writer = None
            return c
        if c == '"':  # arguments written as a JSON string holding the object
            text = yield from read_plain_string()
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            out(json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else "{}")
            return (yield)
        c = yield from read_value(c, NullWriter())
        out("{}")
        return c

    def read_call_object(self, *, require_known_name: bool = False) -> Chars:
        """Read `{"name": ..., "arguments"|"parameters": {...}}` (the `{` already read)."""
        name: str | None = None
        buffer: list[str] = []
        has_args = False
        c = yield from next_non_ws()
        while c != "}":
            if c != '"':
                raise Malformed(f"expected a key, got {c!r}")
            key = yield from read_plain_string()
            c = yield from next_non_ws()
            if c != ":":
                raise Malformed(f"expected ':', got {c!r}")
            c = yield from next_non_ws()
            if key == "name" and name is None:
                if c != '"':
                    raise Malformed("the call's name is not a string")
                name = yield from read_plain_string()
                names = tool_names(self.parser.tools)
                if not name or (require_known_name and names and name not in names):
                    raise Malformed(f"not a tool call name: {name!r}")
                self.commit(name)
                for fragment in buffer:
                    self.emit_args(fragment)
                c = yield
            elif key in ARGUMENT_KEYS and not has_args:
                has_args = True
                c = yield from self.read_arguments(c, is_committed=name is not None, buffer=buffer)
            else:
                c = yield from read_value(c, NullWriter())
            c = yield from skip_ws(c)
            if c == ",":
                c = yield from next_non_ws()
            elif c != "}":
                raise Malformed(f"expected ',' or '}}', got {c!r}")
        if name is None:
            raise Malformed("a call without a name")
        self.end_call()
        return (yield)


class StreamingToolParser(ToolParser):
    """Base of the built-in parsers: subclasses say where calls start and how a region reads.

    `start_tags` open a call region anywhere in the text, `leading_tags` only at the start of
    the output (after whitespace). `read_region(stream, tag)` is a generator that reads the
    region after the tag character by character and returns any text it read past its end.
    """

    start_tags: ClassVar[tuple[str, ...]] = ()
    leading_tags: ClassVar[tuple[str, ...]] = ()
    CONFORMANCE_SAMPLES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._stream = CallStream(self)

    def read_region(self, stream: CallStream, tag: str) -> Chars:
        raise NotImplementedError
        yield  # a generator

    def make_tool_call_id(self) -> str:
        return f"call_{random_id(24)}"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        stream = CallStream(self)
        first, last = stream.feed(text), stream.finish()
        content = first.content + last.content
        calls: list[ToolCall] = []
        for delta in first.tool_calls + last.tool_calls:
            if delta.name is not None:
                calls.append(ToolCall(delta.name, delta.arguments, delta.id))
            else:
                calls[delta.index].arguments += delta.arguments
        return ExtractedToolCalls(tool_calls=calls, content=content or None)

    def parse_delta(self, delta_text: str) -> ToolParserDelta:
        return self._stream.feed(delta_text)

    def finish(self) -> ToolParserDelta:
        return self._stream.finish()

    def adjust_request(self, request: Any) -> Any:
        """Keep special tokens in the output text: several formats start calls with one."""
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none":
            try:
                request.skip_special_tokens = False
            except (AttributeError, TypeError, ValueError):
                pass
        return request


class TaggedJsonToolParser(StreamingToolParser):
    """Calls written as a JSON object between an opening and an (optional) closing tag."""

    end_tag: ClassVar[str] = ""

    def read_region(self, stream: CallStream, tag: str) -> Chars:
        c = yield from next_non_ws()
        if c != "{":
            raise Malformed(f"expected '{{' after {tag}, got {c!r}")
        c = yield from stream.read_call_object()
        whitespace = ""
        while c in WHITESPACE:
            whitespace += c
            c = yield
        is_matched, rest = yield from read_optional(c, self.end_tag)
        return "" if is_matched else whitespace + rest


def read_optional(c: str, literal: str) -> Generator[None, str, tuple[bool, str]]:
    """Match `literal` starting at `c`: (True, "") or (False, the text read, to put back)."""
    got = ""
    while literal:
        if c == EOF or not literal.startswith(got + c):
            return False, got + c
        got += c
        if got == literal:
            return True, ""
        c = yield
    return False, c
