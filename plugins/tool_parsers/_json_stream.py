"""Character-driven JSON reading that re-serializes tool-call arguments canonically as it goes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator

# Readers are generators that are sent one character at a time; EOF ("") is sent at the end.
# Each reader takes the first character of its construct and returns the first character after
# it, so constructs chain without look-ahead buffers.
EOF = ""
WHITESPACE = frozenset(" \t\n\r")
Chars = Generator[None, str, str]

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# Lenient: models sometimes write Python's literals inside JSON.
_LITERALS = {"true": "true", "false": "false", "null": "null", "True": "true", "False": "false", "None": "null"}


class Malformed(Exception):
    """The text stops being what the reader expects (or ends too early)."""


def escape(text: str) -> str:
    """`text` as it appears inside a JSON string written by json.dumps(..., ensure_ascii=False)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class ArgsWriter:
    """Writes a JSON value canonically (json.dumps separators) while it is being read.

    Everything written so far, followed by `closing_suffix()`, is always valid JSON: keys,
    separators and unfinished scalars are held until the value after them has started.
    """

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._pending = ""
        self._closers: list[str] = []
        self._in_string = False

    def hold(self, text: str) -> None:
        self._pending += text

    def put(self, text: str) -> None:
        self._out(self._pending + text)
        self._pending = ""

    def open(self, opener: str, closer: str) -> None:
        self.put(opener)
        self._closers.append(closer)

    def close(self) -> None:
        self._pending = ""  # a trailing ", " the model wrote before the closer
        self.put(self._closers.pop())

    def begin_string(self) -> None:
        self.put('"')
        self._in_string = True

    def string_text(self, text: str) -> None:
        self.put(escape(text))

    def end_string(self) -> None:
        self.put('"')
        self._in_string = False

    def closing_suffix(self) -> str:
        """What turns the text written so far into a complete JSON value."""
        return ('"' if self._in_string else "") + "".join(reversed(self._closers))


class NullWriter(ArgsWriter):
    """Reads a value without writing it (keys the parser does not use)."""

    def __init__(self) -> None:
        super().__init__(lambda _text: None)


def next_non_ws() -> Chars:
    """Receive characters up to the first one that is not whitespace."""
    c = yield
    while c in WHITESPACE:
        c = yield
    return c


def skip_ws(c: str) -> Chars:
    while c in WHITESPACE:
        c = yield
    return c


def read_string_chars(on_text: Callable[[str], None]) -> Generator[None, str, None]:
    """Read a string's body (the opening quote already read) through its closing quote."""
    pushed: str | None = None
    while True:
        if pushed is not None:
            c, pushed = pushed, None
        else:
            c = yield
        if c == '"':
            return
        if c == EOF:
            raise Malformed("unterminated string")
        if c != "\\":
            on_text(c)  # raw control characters are accepted and escaped on output
            continue
        e = yield
        if e in _SIMPLE_ESCAPES:
            on_text(_SIMPLE_ESCAPES[e])
            continue
        if e != "u":
            raise Malformed(f"bad escape \\{e}")
        code = yield from _read_hex4()
        if 0xD800 <= code < 0xDC00:  # a high surrogate: combine with the low one after it
            c = yield
            if c == "\\":
                u = yield
                if u != "u":
                    raise Malformed(f"bad escape \\{u}")
                low = yield from _read_hex4()
                if 0xDC00 <= low < 0xE000:
                    on_text(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    continue
                on_text("\ufffd")
                code = low
            else:
                on_text("\ufffd")
                pushed = c
                continue
        on_text("\ufffd" if 0xD800 <= code < 0xE000 else chr(code))


def _read_hex4() -> Generator[None, str, int]:
    digits = ""
    for _ in range(4):
        c = yield
        if c not in _HEX or c == EOF:
            raise Malformed("bad \\u escape")
        digits += c
    return int(digits, 16)


def read_plain_string() -> Generator[None, str, str]:
    """Read a string's body (the opening quote already read) and return its decoded text."""
    parts: list[str] = []
    yield from read_string_chars(parts.append)
    return "".join(parts)


def _canonical_scalar(token: str) -> str:
    if token in _LITERALS:
        return _LITERALS[token]
    if not _NUMBER.fullmatch(token):
        raise Malformed(f"not a JSON value: {token!r}")
    try:
        if not any(ch in token for ch in ".eE"):
            return str(int(token))
        value = float(token)
    except ValueError:  # an integer too long to convert: keep the model's digits
        return token
    return repr(value) if math.isfinite(value) else token


def read_value(c: str, w: ArgsWriter) -> Chars:
    """Read one JSON value starting at `c`, writing it to `w`."""
    if c == "{":
        return (yield from _read_object(w))
    if c == "[":
        return (yield from _read_array(w))
    if c == '"':
        w.begin_string()
        yield from read_string_chars(w.string_text)
        w.end_string()
        return (yield)
    if c in _NUMBER_CHARS or c.isalpha():
        token = ""
        while c != EOF and (c in _NUMBER_CHARS or c.isalpha()):
            token += c
            c = yield
        w.put(_canonical_scalar(token))
        return c
    raise Malformed(f"unexpected {c!r}" if c else "unexpected end of text")


def _read_object(w: ArgsWriter) -> Chars:
    w.open("{", "}")
    c = yield from next_non_ws()
    while True:
        if c == "}":
            w.close()
            return (yield)
        if c != '"':
            raise Malformed(f"expected a key, got {c!r}")
        key = yield from read_plain_string()
        c = yield from next_non_ws()
        if c != ":":
            raise Malformed(f"expected ':', got {c!r}")
        w.hold(f'"{escape(key)}": ')
        c = yield from next_non_ws()
        c = yield from read_value(c, w)
        c = yield from skip_ws(c)
        if c == "}":
            continue
        if c != ",":
            raise Malformed(f"expected ',' or '}}', got {c!r}")
        w.hold(", ")
        c = yield from next_non_ws()


def _read_array(w: ArgsWriter) -> Chars:
    w.open("[", "]")
    c = yield from next_non_ws()
    while True:
        if c == "]":
            w.close()
            return (yield)
        c = yield from read_value(c, w)
        c = yield from skip_ws(c)
        if c == "]":
            continue
        if c != ",":
            raise Malformed(f"expected ',' or ']', got {c!r}")
        w.hold(", ")
        c = yield from next_non_ws()
