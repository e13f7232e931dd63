"""tools / tool_choice in chat: validate the choice, force it with guided decoding, format tool_calls.

The integration point for tool-call parsers (`--tool-call-parser`, a ToolParser plugin): with
tool_choice "auto" each choice gets a parser instance; its result becomes `tool_calls`.
"none" leaves text as content; "required" and a named function are forced through a JSON-schema
constraint, so their arguments always parse.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from tessera.api.protocol import ChatCompletionRequest, NamedToolChoice, ToolCallOut
from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.tool_parser import ToolParser


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """How one request treats tools."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] | None = None  # as the chat template receives them
    function_name: str | None = None  # mode "named"
    guided: tuple[str, str, str] | None = None  # (param, kind, spec) for guided_constraint
    parser_cls: type[ToolParser] | None = None  # mode "auto"

    def formatter(self, tokenizer: Any) -> ToolCallFormatter:
        parser = None
        if self.mode == "auto" and self.parser_cls is not None:
            parser = self.parser_cls(tokenizer, self.tools)
        return ToolCallFormatter(self, parser)


def _schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters or {"type": "object", "properties": {}}


def plan_tools(
    request: ChatCompletionRequest, *, enable_auto_tool_choice: bool, tool_parser: str | None
) -> ToolPlan:
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools and enable_auto_tool_choice else "none"
    if choice == "none":
        return ToolPlan("none")
    if not tools:
        raise InvalidRequestError("tool_choice needs tools: pass the functions in `tools`", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        by_name = {t["function"]["name"]: t["function"] for t in tools}
        if name not in by_name:
            raise InvalidRequestError(
                f"tool_choice names function {name!r}, which is not in tools ({sorted(by_name)})",
                param="tool_choice",
            )
        spec = json.dumps(_schema(by_name[name].get("parameters")))
        return ToolPlan("named", tools, name, ("tool_choice", "json", spec))
    if choice == "required":
        variants = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "parameters": _schema(t["function"].get("parameters")),
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
        return ToolPlan("required", tools, guided=("tool_choice", "json", json.dumps(schema)))
    # "auto"
    if not enable_auto_tool_choice or not tool_parser:
        raise InvalidRequestError(
            '"auto" tool choice requires the server to be started with --enable-auto-tool-choice '
            "and --tool-call-parser",
            param="tool_choice",
        )
    from tessera.core.plugins import get_plugins

    return ToolPlan("auto", tools, parser_cls=get_plugins().tool_parsers.get(tool_parser))


@dataclass
class ToolCallFormatter:
    """Per choice: turns model text into content and tool_calls, whole or as stream deltas."""

    plan: ToolPlan
    parser: ToolParser | None
    buffer: str = ""
    call_id: str = field(default_factory=tool_call_id)
    has_called: bool = False
    is_started: bool = False

    @property
    def is_passthrough(self) -> bool:
        return self.plan.mode == "none" or (self.plan.mode == "auto" and self.parser is None)

    def whole(self, text: str) -> tuple[str | None, list[ToolCallOut]]:
        mode = self.plan.mode
        if mode == "named":
            call = ToolCallOut(id=self.call_id, function={"name": self.plan.function_name, "arguments": text})
            return None, [call]
        if mode == "required":
            calls = _parse_required(text)
            return (text, []) if calls is None else (None, calls)
        if self.parser is not None:
            extracted = self.parser.extract_tool_calls(text)
            calls = [
                ToolCallOut(id=c.id or tool_call_id(), function={"name": c.name, "arguments": c.arguments})
                for c in extracted.tool_calls
            ]
            return extracted.content, calls
        return text, []

    def finish_reason(self, reason: str | None, has_calls: bool) -> str | None:
        if reason == "stop" and has_calls and self.plan.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    def delta(self, text: str) -> dict[str, Any]:
        """The delta message fields for a new fragment of model text."""
        mode = self.plan.mode
        if self.is_passthrough:
            return {"content": text} if text else {}
        if mode == "named":
            if not text and self.is_started:
                return {}
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if not self.is_started:
                call.update(id=self.call_id, type="function")
                call["function"]["name"] = self.plan.function_name
                self.is_started = True
            self.has_called = True
            return {"tool_calls": [call]}
        if mode == "required":
            self.buffer += text  # sent whole at the end: partial JSON arrays are not valid calls
            return {}
        assert self.parser is not None
        return self._from_parser(self.parser.parse_delta(text))

    def flush(self) -> dict[str, Any]:
        """The last delta fields, once the choice has finished."""
        if self.plan.mode == "required":
            calls = _parse_required(self.buffer)
            if calls is None:
                return {"content": self.buffer} if self.buffer else {}
            self.has_called = True
            return {"tool_calls": [
                {"index": i, "id": c.id, "type": "function", "function": c.function.model_dump()}
                for i, c in enumerate(calls)
            ]}
        if self.parser is not None and self.plan.mode == "auto":
            return self._from_parser(self.parser.finish())
        return {}

    def _from_parser(self, delta: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            self.has_called = True
            calls = []
            for c in delta.tool_calls:
                call: dict[str, Any] = {"index": c.index, "function": {"arguments": c.arguments}}
                if c.id is not None or c.name is not None:
                    call.update(id=c.id or tool_call_id(), type="function")
                    call["function"]["name"] = c.name
                calls.append(call)
            out["tool_calls"] = calls
        return out


def _parse_required(text: str) -> list[ToolCallOut] | None:
    """The calls of a tool_choice="required" output ([{"name", "parameters"}, ...]), or None."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        return None
    return [
        ToolCallOut(id=tool_call_id(), function={
            "name": str(i["name"]), "arguments": json.dumps(i.get("parameters", {}), ensure_ascii=False)
        })
        for i in items
    ]
