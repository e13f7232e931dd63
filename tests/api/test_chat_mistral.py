"""Chat and /tokenize when the model's tokenizer is mistral-common's (--tokenizer-mode mistral), over
the fake engine: the prompt ids are mistral-common's encode_chat_completion, no template runs."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from fixtures_models import save_mistral_tokenizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

from tessera.api.server import build_app
from tessera.api.server_config import ServerConfig
from tessera.core.errors import ConfigError
from tessera.plugins.loaders.mistral_tokenizer import MistralTokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_5f2a9c0e1b7d4a3c8e6f0a1b", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_5f2a9c0e1b7d4a3c8e6f0a1b", "content": "21 degrees"},
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    return save_mistral_tokenizer(str(tmp_path_factory.mktemp("mistral-v3")), "v3")


@pytest.fixture
def mistral_engine(tokenizer_file) -> FakeEngine:
    engine = FakeEngine()
    tokenizer = MistralTokenizer(tokenizer_file)
    engine.model_info = dataclasses.replace(
        engine.model_info, tokenizer=tokenizer, vocab_size=len(tokenizer), chat_template=None, max_model_len=4096
    )
    return engine


@pytest.fixture
def server(serve, mistral_engine) -> str:
    return serve(engine=mistral_engine, enable_auto_tool_choice=True, tool_call_parser="mistral")[0].url


def _reference(tokenizer_file: str, messages, tools=None) -> list[int]:
    reference = MistralCommonTokenizer.from_file(tokenizer_file)
    return reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


def test_tokenize_messages_is_encode_chat_completion(server, tokenizer_file):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = httpx.post(f"{server}/tokenize", json={"messages": messages, "return_token_strs": True}).json()
    assert body["tokens"] == _reference(tokenizer_file, messages)
    assert body["token_strs"][:3] == ["<s>", "[INST]", "▁Be"]
    with_tools = httpx.post(f"{server}/tokenize", json={"messages": HISTORY, "tools": TOOLS}).json()["tokens"]
    # OpenAI-style ids reach the model as their last 9 characters, in the call and in its result
    nine = [
        HISTORY[0],
        {**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "id": "c8e6f0a1b"}]},
        {**HISTORY[2], "tool_call_id": "c8e6f0a1b"},
    ]
    assert with_tools == _reference(tokenizer_file, nine, TOOLS)
    text = httpx.post(f"{server}/tokenize", json={"prompt": "Hello, wörld"}).json()["tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": text}).json()["prompt"] == "Hello, wörld"


def test_chat_request_sends_mistral_common_ids(server, mistral_engine, tokenizer_file):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="fake-model", messages=HISTORY, tools=TOOLS, tool_choice="none",
                                       max_tokens=3)
    prompt_ids = mistral_engine.requests[-1][0]
    assert r.usage.prompt_tokens == len(prompt_ids)
    # tool_choice "none": the tools are not shown to the model, as with a template
    assert prompt_ids == httpx.post(f"{server}/tokenize", json={"messages": HISTORY}).json()["tokens"]
    client.chat.completions.create(model="fake-model", messages=HISTORY, tools=TOOLS, max_tokens=3)  # auto
    with_tools = httpx.post(f"{server}/tokenize", json={"messages": HISTORY, "tools": TOOLS}).json()["tokens"]
    assert mistral_engine.requests[-1][0] == with_tools != prompt_ids


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "Hi"}], "chat_template": "{{ 1 }}"}, "chat_template"),
    ({"messages": [{"role": "user", "content": "Hi"}], "documents": [{"title": "t", "text": "x"}]}, "documents"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
      "continue_final_message": True}, "continue_final_message"),  # add_generation_prompt is on by default
])
def test_what_mistral_common_cannot_encode_is_a_400(server, body, param):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "fake-model", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_continue_final_message(server, tokenizer_file):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    ids = httpx.post(f"{server}/tokenize", json=body).json()["tokens"]
    reference = MistralCommonTokenizer.from_file(tokenizer_file)
    request = ChatCompletionRequest.from_openai(messages, continue_final_message=True)
    assert ids == reference.encode_chat_completion(request).tokens


def test_chat_template_flag_is_refused_at_startup(mistral_engine):
    with pytest.raises(ConfigError, match="--chat-template cannot be used with --tokenizer-mode mistral"):
        build_app(mistral_engine, ServerConfig(chat_template="{{ messages }}"))
