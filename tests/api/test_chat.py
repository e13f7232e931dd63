"""/v1/chat/completions over the fake engine, through the official openai client."""

from __future__ import annotations

import openai
import pytest
from fake_engine import GREEDY_TEXT, FakeEngine

USER = [{"role": "user", "content": "Hi"}]


def test_chat_greedy(client, engine):
    r = client.chat.completions.create(model="fake-model", messages=USER, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == GREEDY_TEXT
    assert r.choices[0].finish_reason == "stop"
    prompt_ids = engine.requests[-1][0]
    assert engine.tokenizer.decode(prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(GREEDY_TEXT) + 1


def test_content_parts_and_system_messages(client, engine):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    client.chat.completions.create(model="fake-model", messages=messages, max_tokens=1)
    text = engine.tokenizer.decode(engine.requests[-1][0])
    assert "system\nBe brief.<|im_end|>" in text and "user\na\nb<|im_end|>" in text


def test_max_completion_tokens_and_n(client):
    r = client.chat.completions.create(model="fake-model", messages=USER, n=3, max_completion_tokens=4, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 12


def test_default_max_tokens_fills_the_context(client, engine):
    client.chat.completions.create(model="fake-model", messages=USER, temperature=0)
    ids, params = engine.requests[-1]
    assert params.max_tokens == engine.model_info.max_model_len - len(ids)


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="fake-model", messages=USER, temperature=0, max_tokens=3,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == list(GREEDY_TEXT[:3])
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert content[0].bytes == list(b"H")


def test_stream_first_chunk_has_the_role_and_text_matches(client):
    kwargs = dict(model="fake-model", messages=USER, n=2, max_tokens=10, seed=3, stop=["o"])
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    first_by_index: dict[int, object] = {}
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            first_by_index.setdefault(c.index, c)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert all(c.delta.role == "assistant" for c in first_by_index.values())
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_echo_prepends_the_last_message_of_the_same_role(client):
    messages = USER + [{"role": "assistant", "content": "Sure: "}]
    r = client.chat.completions.create(model="fake-model", messages=messages, temperature=0, max_tokens=2,
                                       extra_body={"echo": True, "add_generation_prompt": False})
    assert r.choices[0].message.content == "Sure: " + GREEDY_TEXT[:2]


def test_continue_final_message(client, engine):
    messages = USER + [{"role": "assistant", "content": "Sure"}]
    client.chat.completions.create(model="fake-model", messages=messages, max_tokens=1, extra_body={
        "continue_final_message": True, "add_generation_prompt": False})
    assert engine.tokenizer.decode(engine.requests[-1][0]).endswith("<|im_start|>assistant\nSure")


def test_response_role_flag(serve):
    server, _ = serve(response_role="model")
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    assert c.chat.completions.create(model="fake-model", messages=USER, max_tokens=1).choices[0].message.role == "model"


def test_template_kwargs_and_documents_reach_the_template(serve):
    template = "{{ greeting }}|{% for d in documents %}{{ d.title }};{% endfor %}|{{ messages[0].content }}"
    server, engine = serve(chat_template=template)
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="fake-model", messages=USER, max_tokens=1, extra_body={
        "chat_template_kwargs": {"greeting": "hey"}, "documents": [{"title": "T1", "text": "x"}]})
    assert engine.tokenizer.decode(engine.requests[-1][0]) == "hey|T1;|Hi"


def test_model_without_template_gets_a_400_saying_what_to_do(serve):
    server, _ = serve(engine=FakeEngine(chat_template=None))
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="fake-model", messages=USER)
    assert "--chat-template" in info.value.body["message"]
    assert len(c.completions.create(model="fake-model", prompt="Hi", max_tokens=1).choices[0].text) == 1


def test_request_chat_template_needs_the_trust_flag(serve):
    server, _ = serve()
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="fake-model", messages=USER, extra_body={"chat_template": "{{ 'x' }}"})
    assert info.value.body["param"] == "chat_template"
    assert "--trust-request-chat-template" in info.value.body["message"]
    server2, engine2 = serve(trust_request_chat_template=True)
    c2 = openai.OpenAI(base_url=f"{server2.url}/v1", api_key="x", max_retries=0)
    c2.chat.completions.create(model="fake-model", messages=USER, max_tokens=1,
                               extra_body={"chat_template": "T:{{ messages[0].content }}"})
    assert engine2.tokenizer.decode(engine2.requests[-1][0]) == "T:Hi"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"messages": USER, "temperature": -0.5}, "temperature"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": USER, "tool_choice": "auto", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tool_choice"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"messages": USER, "guided_choice": ["yes", "no"]}, "guided_choice"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ({"messages": USER, "structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
    ({"messages": USER, "structured_outputs": {"bogus": 1}}, "structured_outputs"),
])
def test_bad_chat_requests_are_400(http, body, param):
    r = http.post("/v1/chat/completions", json={"model": "fake-model", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_template_errors_are_400_not_500(serve):
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    server, _ = serve(chat_template=template)
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="fake-model", messages=USER)
    assert "first message must be system" in info.value.body["message"]
