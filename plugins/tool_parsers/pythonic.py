"""The `pythonic` tool parser: `[func(a=1, b="x"), other()]` read with `ast`, literal arguments only."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from tessera.plugins.tool_parsers._common import CallStream, StreamingToolParser
from tessera.plugins.tool_parsers._json_stream import EOF, WHITESPACE, Chars, Malformed, next_non_ws

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
_MAX_CHARS = 200_000
# what a call list can start with: text that stops matching is content without waiting for `]`
_CALL_LIST_START = re.compile(r"\[\s*([A-Za-z_]\w*\s*(\(|$)|$)")
# JSON spellings models mix into Python calls
_JSON_NAMES: dict[str, Any] = {"true": True, "false": False, "null": None}


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise ValueError("** in a dict")
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


def parse_call_list(source: str) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] when `source` is a list of calls with literal keyword arguments."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
        if not isinstance(tree.body, ast.List):
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            if any(keyword.arg is None for keyword in node.keywords):
                return None
            arguments = {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
            calls.append((node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)))
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class PythonicToolParser(StreamingToolParser):
    """Llama 3.2 / Llama 4 style: the whole output starts with a Python list of calls.

    The list is held back until its closing bracket (calls arrive whole, one delta each); a list
    that is not calls with literal keyword arguments is content. Llama 4 wraps it in
    `<|python_start|>`/`<|python_end|>` special tokens: `adjust_request` keeps special tokens.
    """

    leading_tags = ("[", PYTHON_START)
    CONFORMANCE_SAMPLES = (
        '[get_weather(city="San Francisco", metric=True)]',
        "[a(x=1, y=[1, 2, {'k': None}]), b()]",
        '<|python_start|>[search(query="tessera ] bracket", limit=3)]<|python_end|>',
        "[1] is a footnote, not a call.",
        "[f(1, 2)]",
        '[f(a="unclosed)',
        "[f(flag=true, nothing=null, t=(1, 2))]\nDone.",
        'Answer first. [f(a=1)]',
        '[f(x=float("nan"))]',
    )

    def read_region(self, stream: CallStream, tag: str) -> Chars:
        source = "["
        if tag == PYTHON_START:
            c = yield from next_non_ws()
            if c != "[":
                raise Malformed(f"expected '[' after {PYTHON_START}, got {c!r}")
        calls = None
        while calls is None:
            c = yield
            if c == EOF or len(source) > _MAX_CHARS:
                raise Malformed("the call list is not closed")
            source += c
            if not _CALL_LIST_START.match(source):
                raise Malformed("not a list of calls")
            if c == "]":
                calls = parse_call_list(source)
            if calls is None and c == "]" and _is_complete_list(source):
                raise Malformed("a list, but not of calls")
        if not calls:
            raise Malformed("an empty list")
        for name, arguments in calls:
            stream.commit(name)
            stream.emit_args(arguments)
            stream.end_call()
        c = yield
        whitespace = ""
        while c in WHITESPACE:
            whitespace += c
            c = yield
        if tag != PYTHON_START:
            return whitespace + c
        got = ""
        while PYTHON_END.startswith(got + c) and c != EOF:
            got += c
            if got == PYTHON_END:
                return ""
            c = yield
        return whitespace + got + c


def _is_complete_list(source: str) -> bool:
    try:
        return isinstance(ast.parse(source.strip(), mode="eval").body, ast.List)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
