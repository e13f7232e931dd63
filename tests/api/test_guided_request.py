"""Parsing guided_* / response_format / structured_outputs / tool_choice into one GuidedConstraint."""

from __future__ import annotations

import json

import pytest

from tessera.api.chat_tools import plan_tools
from tessera.api.guided_request import guided_constraint
from tessera.api.protocol import ChatCompletionRequest, CompletionRequest
from tessera.core.errors import InvalidRequestError

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _req(**kwargs):
    return CompletionRequest(prompt="x", **kwargs)


@pytest.mark.parametrize("kwargs, kind, spec", [
    ({"guided_json": SCHEMA}, "json", json.dumps(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, "json", json.dumps(SCHEMA)),
    ({"guided_regex": "a+"}, "regex", "a+"),
    ({"guided_choice": ["x", "y"]}, "choice", '["x", "y"]'),
    ({"guided_grammar": "root ::= 'a'"}, "grammar", "root ::= 'a'"),
    ({"response_format": {"type": "json_object"}}, "json_object", ""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}}, "json",
     json.dumps(SCHEMA)),
    ({"structured_outputs": {"choice": ["x"]}}, "choice", '["x"]'),
    ({"structured_outputs": {"json": SCHEMA}}, "json", json.dumps(SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, "json_object", ""),
])
def test_each_form(kwargs, kind, spec):
    constraint = guided_constraint(_req(**kwargs))
    assert (constraint.kind, constraint.spec) == (kind, spec)


def test_no_constraint_and_text_format():
    assert guided_constraint(_req()) is None
    assert guided_constraint(_req(response_format={"type": "text"})) is None


def test_backend_and_whitespace_are_carried():
    c = guided_constraint(_req(guided_regex="a", guided_decoding_backend="xgrammar", guided_whitespace_pattern=" "))
    assert (c.backend, c.whitespace_pattern) == ("xgrammar", " ")
    assert guided_constraint(_req(structured_outputs={"regex": "a", "backend": "outlines"})).backend == "outlines"


@pytest.mark.parametrize("kwargs, param", [
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "[1"}, "guided_json"),
    ({"guided_json": "3"}, "guided_json"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"choice": "x"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "json_object": True}}, "structured_outputs.json_object"),
])
def test_invalid_forms_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        guided_constraint(_req(**kwargs))
    assert info.value.param == param


def test_named_tool_choice_becomes_a_schema_constraint():
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
    )
    plan = plan_tools(request, enable_auto_tool_choice=False, tool_parser=None)
    constraint = guided_constraint(request, plan.guided)
    assert (plan.mode, constraint.kind, json.loads(constraint.spec)) == ("named", "json", SCHEMA)
    content, calls = plan.formatter(None).whole('{"a": 1}')
    assert content is None and calls[0].function.name == "f" and calls[0].function.arguments == '{"a": 1}'


def test_required_tool_choice_parses_calls():
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], tool_choice="required",
        tools=[{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}],
    )
    plan = plan_tools(request, enable_auto_tool_choice=False, tool_parser=None)
    assert json.loads(guided_constraint(request, plan.guided).spec)["type"] == "array"
    fmt = plan.formatter(None)
    content, calls = fmt.whole('[{"name": "f", "parameters": {"a": 2}}]')
    assert content is None and json.loads(calls[0].function.arguments) == {"a": 2}
    assert fmt.finish_reason("stop", True) == "tool_calls"
    assert fmt.delta('[{"name": "f", ') == {} and fmt.delta('"parameters": {}}]') == {}
    assert fmt.flush()["tool_calls"][0]["function"]["name"] == "f"
