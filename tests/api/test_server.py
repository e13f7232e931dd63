"""Server-level behaviour over the fake engine: auth, CORS, root path, middleware, health, metrics,
tokenize, load shedding and client disconnects."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fake_engine import GREEDY_TEXT, FakeEngine


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_until(condition, timeout: float = 10.0) -> None:
    """Poll a condition the server reaches asynchronously (an abort after a disconnect)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_api_key_protects_everything_but_health(serve):
    server, _ = serve(api_key="sekret")
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize"),
                             ("POST", "/v1/completions"), ("GET", "/version"), ("POST", "/detokenize")):
            r = http.request(method, path, json={})
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "AuthenticationError"
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer sekreT"})
        assert wrong.status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
    assert ok.completions.create(model="fake-model", prompt="Hi", max_tokens=2, temperature=0).choices[0].text == "He"


def test_api_key_from_the_environment(monkeypatch):
    from tessera.api.args import parse_serve_args
    from tessera.api.server_config import ServerConfig

    monkeypatch.setenv("TESSERA_API_KEY", "from-env")
    assert ServerConfig.from_args(parse_serve_args([])).api_key == "from-env"
    assert ServerConfig.from_args(parse_serve_args(["--api-key", "flag"])).api_key == "flag"


def test_health_fails_when_the_engine_is_dead(http, engine):
    assert http.get("/health").status_code == 200
    engine.healthy = False
    r = http.get("/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    engine.running = False
    r = http.post("/v1/completions", json={"model": "fake-model", "prompt": "Hi"})
    assert r.status_code == 503


def test_version_and_models_with_two_names(serve):
    server, engine = serve(served_model_names=("first", "second"))
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/version").json()["version"]
        data = http.get("/v1/models").json()["data"]
        assert [m["id"] for m in data] == ["first", "second"]
        assert data[0]["max_model_len"] == engine.model_info.max_model_len
        assert http.get("/v1/models/second").json()["id"] == "second"
        assert http.get("/v1/models/third").status_code == 404
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    r = c.completions.create(model="second", prompt="Hi", max_tokens=1)
    assert r.model == "first"


def test_cors(serve):
    server, _ = serve(allowed_origins=("http://good.example",), allow_credentials=True,
                      allowed_methods=("GET", "POST"), api_key="k")
    with httpx.Client(base_url=server.url) as http:
        pre = http.options("/v1/models", headers={"Origin": "http://good.example",
                                                  "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://good.example"
        assert pre.headers["access-control-allow-credentials"] == "true"
        bad = http.options("/v1/models", headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in bad.headers
        r = http.get("/v1/models", headers={"Origin": "http://good.example", "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "http://good.example"


def test_root_path(serve):
    server, _ = serve(root_path="/llm", api_key="k")
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k"}) as http:
        assert http.get("/llm/v1/models").status_code == 200
        assert http.get("/v1/models").status_code == 200  # a proxy that strips the prefix
        assert http.get("/llm/health", headers={}).status_code == 200
        assert 'const ROOT = "/llm"' in http.get("/llm/").text


def test_user_middleware_function_and_class(serve):
    server, _ = serve(middleware=("middleware_fixtures.add_function_header", "middleware_fixtures:AddClassHeader"))
    r = httpx.get(f"{server.url}/v1/models")
    assert r.headers["x-function-middleware"] == "yes" and r.headers["x-class-middleware"] == "yes"


def test_bad_middleware_is_a_config_error():
    from tessera.api.server import build_app
    from tessera.api.server_config import ServerConfig
    from tessera.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no_such_module"):
        build_app(FakeEngine(), ServerConfig(middleware=("no_such_module.thing",)))


def test_metrics(http):
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert http.post("/v1/completions", json={**body, "max_tokens": 100}).status_code == 200
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "tessera:kv_cache_used_blocks", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:time_per_output_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    assert _metric(http, "vllm:prompt_tokens_total") == 4
    assert _metric(http, "vllm:generation_tokens_total") == 4 + len(GREEDY_TEXT) + 1
    assert 'vllm:request_success_total{finished_reason="length",model_name="fake-model"} 1.0' in text
    assert 'vllm:request_success_total{finished_reason="stop",model_name="fake-model"} 1.0' in text
    assert _metric(http, "vllm:e2e_request_latency_seconds_count") == 2


def test_tokenize_detokenize_round_trip(http, engine):
    r = http.post("/tokenize", json={"model": "fake-model", "prompt": "Hello", "return_token_strs": True})
    body = r.json()
    assert body["count"] == 5 and body["token_strs"] == list("Hello")
    assert body["max_model_len"] == engine.model_info.max_model_len
    assert http.post("/detokenize", json={"model": "fake-model", "tokens": body["tokens"]}).json() == {"prompt": "Hello"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": 5}).status_code == 400


def test_queue_full_is_429_with_retry_after(serve):
    server, _ = serve(engine=FakeEngine(max_waiting=0))
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "fake-model", "prompt": "Hi", "stream": True})
    assert r.status_code == 429
    assert r.headers["retry-after"].isdigit()
    assert r.json()["error"]["type"] == "RateLimitError"


def test_playground_page(http):
    r = http.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/chat/completions" in r.text and "/v1/models" in r.text and "getReader" in r.text


def test_cut_off_streams_abort_and_free_their_blocks(serve):
    server, engine = serve(engine=FakeEngine(token_delay=0.01))
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 400, "stream": True, "temperature": 1.0}
    with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=50)) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(20)]
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]
        for r, it in zip(responses, lines, strict=True):
            assert r.status_code == 200
            assert next(it).startswith("data: ")
        assert _metric(http, "tessera:kv_cache_used_blocks") > 0
        for s in streams:
            s.__exit__(None, None, None)
        _wait_until(lambda: _metric(http, "tessera:kv_cache_used_blocks") == 0)
        assert len(engine.aborted) == 20
        assert 'finished_reason="abort"' in http.get("/metrics").text


def test_disconnect_while_waiting_aborts_a_non_streaming_request(serve):
    import asyncio

    server, engine = serve()
    engine.hold = asyncio.Event()  # never set: the request waits until the client goes away
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=0.5,
                   json={"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]})
    _wait_until(lambda: not engine.live)
    assert len(engine.aborted) == 1


def test_32_concurrent_streams_complete(serve):
    server, _ = serve(engine=FakeEngine(token_delay=0.001))
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)

    def one(i: int) -> str:
        stream = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": str(i)}],
                                           temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(one, range(32))) == [GREEDY_TEXT] * 32
