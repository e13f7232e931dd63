"""End to end: `tessera serve --tokenizer-mode mistral` in a subprocess on a tiny random Mistral model
with mistral-common's v3 tokenizer, driven by the openai client over 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest
from fixtures_models import save_mistral_model
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer
from test_e2e_real import REPO, start_server, stop_server

pytestmark = pytest.mark.slow

MODEL = "tiny-mistral"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [
    *CHAT,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "21 degrees"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_mistral_model(str(tmp_path_factory.mktemp("tiny-mistral-v3")), "v3")


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[str]:
    proc, url, _ = start_server(model_dir, "--served-model-name", MODEL, "--tokenizer-mode", "mistral",
                                "--enable-auto-tool-choice", "--tool-call-parser", "mistral",
                                "--dtype", "float32", "--max-model-len", "1024")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def reference(model_dir) -> MistralCommonTokenizer:
    return MistralCommonTokenizer.from_file(os.path.join(model_dir, "tokenizer.model.v3"))


def _encode_chat(reference: MistralCommonTokenizer, messages, tools=None) -> list[int]:
    return reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


def test_tokenize_chat_is_mistral_common(server, reference):
    for messages, tools in ((CHAT, None), (CHAT, TOOLS), (HISTORY, TOOLS)):
        body = {"model": MODEL, "messages": messages, **({"tools": tools} if tools else {})}
        assert httpx.post(f"{server}/tokenize", json=body).json()["tokens"] == _encode_chat(reference, messages, tools)
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "Hello, wörld"}).json()["tokens"]
    assert ids == reference.instruct_tokenizer.tokenizer.encode("Hello, wörld", bos=True, eos=False)


def test_chat_with_tools_whole_and_streamed(server, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model=MODEL, messages=HISTORY, tools=TOOLS, temperature=0, max_tokens=8)
    whole = client.chat.completions.create(**kwargs)
    assert whole.usage.prompt_tokens == len(_encode_chat(reference, HISTORY, TOOLS))
    assert whole.usage.completion_tokens == 8 or whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (whole.choices[0].message.content or "")
    r = httpx.post(f"{server}/v1/chat/completions", json={**kwargs, "chat_template": "{{ 1 }}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"


def _serve_fails(*flags: str) -> str:
    cmd = [sys.executable, "-m", "tessera.api.cli", "serve", "--port", "0", *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    return done.stdout + done.stderr


def test_startup_errors_name_the_flag(model_dir, tmp_path):
    out = _serve_fails(model_dir, "--tokenizer-mode", "mistral", "--chat-template", "{{ messages }}")
    assert "--chat-template cannot be used with --tokenizer-mode mistral" in out
    for name in ("config.json", "model.safetensors"):  # the model without its tokenizer file
        os.symlink(os.path.join(model_dir, name), tmp_path / name)
    out = _serve_fails(str(tmp_path), "--tokenizer-mode", "mistral")
    assert "--tokenizer-mode mistral" in out and "no mistral-common tokenizer file" in out
