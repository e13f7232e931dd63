"""End to end: tool_choice none / auto / required / named through `tessera serve` on the embedded
SmolLM2 with the hermes template and parser, driven by the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from test_e2e_real import start_server, stop_server

pytestmark = pytest.mark.slow

MODEL = "smol"
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url, _ = start_server("--served-model-name", MODEL, "--enable-auto-tool-choice",
                                "--tool-call-parser", "hermes",
                                "--chat-template", "examples/tool_chat_template_hermes.jinja")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _create(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs = {"temperature": 0.8, "seed": 5, "max_tokens": 96, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, **kwargs)


def _assert_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(stream: Any) -> tuple[dict[int, dict[str, Any]], str | None, str]:
    """Tool calls assembled from stream deltas, checking that id/name/type come once per index."""
    calls: dict[int, dict[str, Any]] = {}
    finish, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                call = calls.get(tc.index)
                if call is None:
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name,
                                       "arguments": tc.function.arguments or ""}
                else:
                    assert tc.id is None and tc.function.name is None, tc
                    call["arguments"] += tc.function.arguments or ""
    return calls, finish, content


def test_named_function_whole(client):
    r = _create(client, tool_choice=NAMED)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI: a forced named function ends with "stop"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    _assert_call(call.function.name, call.function.arguments)


def test_named_function_streamed(client):
    calls, finish, content = _streamed_calls(_create(client, tool_choice=NAMED, stream=True))
    assert finish == "stop" and content == ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    _assert_call("get_weather", calls[0]["arguments"])


def test_required_whole_and_n2(client):
    r = _create(client, tool_choice="required", n=2)
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        ids = [c.id for c in choice.message.tool_calls]
        assert len(set(ids)) == len(ids)
        for call in choice.message.tool_calls:
            assert call.type == "function"
            _assert_call(call.function.name, call.function.arguments)


def test_required_streamed(client):
    calls, finish, content = _streamed_calls(_create(client, tool_choice="required", stream=True))
    assert finish == "tool_calls" and content == "" and calls
    assert sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        _assert_call(call["name"], call["arguments"])


def test_auto_response_is_well_formed(client):
    """The tiny model rarely calls a tool by itself: whatever it writes, the reply must be content or
    calls that parse, and the stream must say the same thing as the whole answer."""
    r = _create(client, tool_choice="auto", temperature=0, max_tokens=32)
    choice = r.choices[0]
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and call.id and call.function.name
        json.loads(call.function.arguments)
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    calls, _, content = _streamed_calls(_create(client, tool_choice="auto", temperature=0, max_tokens=32, stream=True))
    assert content == (choice.message.content or "")
    assert [c["name"] for c in calls.values()] == [c.function.name for c in choice.message.tool_calls or []]


def test_tools_are_rendered_into_the_prompt(server):
    body = {"model": MODEL, "messages": CHAT, "return_token_strs": True}
    without = httpx.post(f"{server}/tokenize", json=body).json()
    with_tools = httpx.post(f"{server}/tokenize", json={**body, "tools": TOOLS}).json()
    assert with_tools["count"] > without["count"]
    text = "".join(with_tools["token_strs"])
    assert "get_weather" in text and "<tools>" in text


def test_tool_history_is_rendered(client):
    messages = [
        *CHAT,
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.tool_calls in (None, [])
    assert r.usage.prompt_tokens > 0


@pytest.mark.parametrize("kwargs, words", [
    ({"tool_choice": "required"}, "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "nope"),
])
def test_bad_tool_choice_is_400(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **kwargs)
    assert info.value.body["param"] == "tool_choice" and words in info.value.body["message"]
