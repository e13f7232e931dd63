"""End to end: `tessera serve` in a subprocess with the real engine and the embedded SmolLM2 GGUF,
driven by the official openai client over 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NAMES = ("smol", "smol-alias")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, timeout: float = 300.0) -> tuple[subprocess.Popen, str, Path]:
    """`python -m tessera.api.cli serve` on a free port; returns once /health answers 200."""
    port = _free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-serve-{port}.log"
    cmd = [sys.executable, "-m", "tessera.api.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url, _ = start_server("--served-model-name", *NAMES, "--max-logprobs", "5")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _used_blocks(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("tessera:kv_cache_used_blocks"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("tessera:kv_cache_used_blocks missing")


def test_models_lists_every_served_name(client):
    assert [m.id for m in client.models.list().data] == list(NAMES)


def test_chat_whole_and_streamed_agree(client):
    whole = client.chat.completions.create(model="smol-alias", messages=CHAT, temperature=0, max_tokens=24)
    assert whole.model == "smol"
    text = whole.choices[0].message.content
    assert "Paris" in text
    stream = client.chat.completions.create(model="smol", messages=CHAT, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_usage_is_exact(client, server):
    prompt = "The quick brown fox"
    ids = httpx.post(f"{server}/tokenize", json={"prompt": prompt}).json()["tokens"]
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == len(ids) + 7
    chat_ids = httpx.post(f"{server}/tokenize", json={"messages": CHAT}).json()["tokens"]
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(chat_ids)


def test_n_seeds_echo_logprobs(client):
    kwargs = dict(model="smol", prompt="Once upon a time", n=2, max_tokens=8, seed=42, temperature=0.9)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1]
    r = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=4, temperature=0,
                                  echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Once upon a time")
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 3 for top in lp.top_logprobs[1:])


def test_stop_strings_and_ids(client, server):
    base = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "," in text
    r = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","])
    assert r.choices[0].text == text.split(",")[0] and r.choices[0].finish_reason == "stop"
    comma = httpx.post(f"{server}/tokenize", json={"prompt": ",", "add_special_tokens": False}).json()["tokens"]
    r = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                  extra_body={"stop_token_ids": comma[-1:]})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == comma[-1]


def test_tokenize_round_trip(server):
    ids = httpx.post(f"{server}/tokenize", json={"model": "smol", "prompt": "Hello, world!"}).json()["tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello, world!"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/completions", {"prompt": "x", "top_p": 0}),
    ("/v1/completions", {"prompt": "x", "n": 0}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 3}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 9000}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": [49152]}),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 9, "logprobs": True}),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ 1 }}"}),
])
def test_bad_inputs_are_4xx_and_the_server_keeps_serving(server, path, body):
    r = httpx.post(f"{server}{path}", json={"model": "smol", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(f"{server}{path}", json={"model": "nope", **body}).status_code in (400, 404)
    assert httpx.get(f"{server}/health").status_code == 200


def test_malformed_json_and_unknown_model(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    assert r.status_code == 404


def test_guided_request_is_never_an_unconstrained_200(client):
    try:
        r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=5,
                                           extra_body={"guided_choice": ["yes", "no"]})
    except openai.BadRequestError as exc:
        assert exc.body["param"] == "guided_choice"
    else:
        assert r.choices[0].message.content in ("yes", "no")


def test_32_concurrent_streams_complete(client):
    def one(i: int) -> str:
        stream = client.completions.create(model="smol", prompt=f"Item {i}:", max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, range(32)))
    assert all(texts)


def test_cut_off_streams_leave_no_kv_blocks(server):
    body = {"model": "smol", "prompt": "Write a long story:", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server, timeout=120) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(20)]
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]
        for it in lines:
            assert next(it).startswith("data: ")
        assert _used_blocks(server) > 0
        for s in streams:
            s.__exit__(None, None, None)
    deadline = time.monotonic() + 60
    while _used_blocks(server) != 0:
        assert time.monotonic() < deadline, "KV blocks still in use after the clients left"
        time.sleep(0.1)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'finished_reason="abort"' in metrics


def test_api_key_and_in_process_engine():
    proc, url, _ = start_server("--api-key", "k3y", "--disable-frontend-multiprocessing")
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=CHAT, max_tokens=4, temperature=0)
        assert r.choices[0].message.content
        assert json.loads(httpx.get(f"{url}/version", headers={"Authorization": "Bearer k3y"}).text)["version"]
    finally:
        assert stop_server(proc) == 0
