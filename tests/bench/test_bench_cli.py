"""`tessera bench`: metric formulas, arrival schedules, exact prompt lengths, and each command end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fake_http import JsonHandler, serving

from tessera.api.bench import main as bench_main
from tessera.api.bench.datasets import random_requests, sample_lengths, sharegpt_requests
from tessera.api.bench.metrics import RequestResult, compute_metrics, peak_concurrency, tpot
from tessera.api.bench.serve import _sse_events, arrival_intervals

# ---- metrics on synthetic timings ---------------------------------------------------------------


def _results() -> list[RequestResult]:
    a = RequestResult(prompt_len=10, is_success=True, output_tokens=5, ttft=0.1, latency=0.3,
                      itl=[0.02, 0.03, 0.05, 0.1], start_time=0.0)
    b = RequestResult(prompt_len=20, is_success=True, output_tokens=1, ttft=0.2, latency=0.2,
                      start_time=0.1)
    failed = RequestResult(prompt_len=99, error="HTTP 500", start_time=0.0)
    return [a, b, failed]


def test_metrics_match_vllm_definitions() -> None:
    m = compute_metrics(_results(), duration_s=2.0, selected=("ttft", "tpot", "itl", "e2el"),
                        percentiles=(50, 99))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 6  # failed ones excluded
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["p99_ttft_ms"] == pytest.approx(199.0)  # linear interpolation between 100 and 200
    # TPOT excludes the first token and skips one-token requests: (0.3 - 0.1) / (5 - 1)
    assert m["mean_tpot_ms"] == pytest.approx(50.0) and m["median_tpot_ms"] == pytest.approx(50.0)
    # ITL pools every gap of every request
    assert m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p50_itl_ms"] == pytest.approx(40.0)
    assert m["mean_e2el_ms"] == pytest.approx(250.0)
    assert m["max_concurrent_requests"] == 2


def test_tpot_and_peak_concurrency_edges() -> None:
    assert tpot(RequestResult(prompt_len=1, output_tokens=1, ttft=0.1, latency=0.1)) is None
    assert tpot(RequestResult(prompt_len=1, output_tokens=3, ttft=0.1, latency=0.5)) == pytest.approx(0.2)
    back_to_back = [RequestResult(prompt_len=1, start_time=0.0, latency=1.0),
                    RequestResult(prompt_len=1, start_time=1.0, latency=1.0)]
    assert peak_concurrency(back_to_back) == 1
    with pytest.raises(ValueError):
        compute_metrics(_results(), duration_s=0.0)


# ---- arrivals -----------------------------------------------------------------------------------


def test_arrivals_infinite_rate_sends_all_at_once() -> None:
    assert arrival_intervals(5, float("inf")) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [1.0, 4.0, 0.25])
def test_arrivals_are_gamma_with_the_asked_rate(burstiness: float) -> None:
    gaps = np.array(arrival_intervals(40_000, request_rate=10.0, burstiness=burstiness, seed=3))
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)  # mean interval 1/rate whatever the shape
    # gamma(k): coefficient of variation 1/sqrt(k); 1 for a Poisson process
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert arrival_intervals(10, 10.0, burstiness, seed=3) == list(gaps[:10])
    assert arrival_intervals(10, 10.0, burstiness, seed=4) != list(gaps[:10])


# ---- prompts ------------------------------------------------------------------------------------


def test_sample_lengths_range() -> None:
    rng = np.random.default_rng(0)
    lens = sample_lengths(100, 0.5, 2000, rng)
    assert min(lens) == 50 and max(lens) == 150
    assert sample_lengths(7, 0.0, 3, rng) == [7, 7, 7]


def test_random_prompts_have_exact_token_lengths(smollm2_tokenizer: Any) -> None:
    reqs = random_requests(smollm2_tokenizer, 12, input_len=40, output_len=16, range_ratio=0.5,
                           prefix_len=30, seed=1)
    for req in reqs:
        assert len(smollm2_tokenizer.encode(req.prompt, add_special_tokens=False)) == req.prompt_len
        assert 30 + 20 <= req.prompt_len <= 30 + 60 and 8 <= req.output_len <= 24
    prefix = smollm2_tokenizer.decode(smollm2_tokenizer.encode(reqs[0].prompt)[:30])
    assert all(r.prompt.startswith(prefix) for r in reqs)
    assert len({r.prompt for r in reqs}) == 12
    again = random_requests(smollm2_tokenizer, 12, 40, 16, 0.5, 30, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]


def test_sharegpt_prompts(tmp_path: Any, smollm2_tokenizer: Any) -> None:
    conv = [{"conversations": [{"from": "human", "value": f"Question number {i} about cats and dogs?"},
                               {"from": "gpt", "value": "An answer that is long enough to count."}]}
            for i in range(5)] + [{"conversations": [{"from": "human", "value": "hi"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conv))
    reqs = sharegpt_requests(smollm2_tokenizer, str(path), 4, output_len=32)
    assert len(reqs) == 4 and all(r.output_len == 32 and "cats" in r.prompt for r in reqs)


# ---- bench serve against a small real HTTP server -----------------------------------------------


class _FakeCompletions(JsonHandler):
    """Streams `max_tokens` tokens, two per chunk, and the usage when asked (like vLLM)."""

    def do_POST(self) -> None:  # noqa: N802
        body = self.read_body()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        remaining = body["max_tokens"]
        while remaining > 0:
            self._event({"choices": [{"index": 0, "text": " ab" * min(2, remaining)}], "usage": None})
            remaining -= 2
            time.sleep(0.002)
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": body["max_tokens"]}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def fake_server() -> Iterator[str]:
    with serving(_FakeCompletions) as url:
        yield url


def test_bench_serve_end_to_end(fake_server: str, smollm2_path: str, tmp_path: Any,
                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_main([
        "serve", "--base-url", fake_server, "--tokenizer", smollm2_path, "--num-prompts", "6",
        "--random-input-len", "24", "--random-output-len", "9", "--max-concurrency", "2",
        "--request-rate", "200", "--ignore-eos", "--num-warmups", "1", "--save-result",
        "--result-dir", str(tmp_path), "--result-filename", "r.json", "--metric-percentiles", "50,99",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Successful requests:" in out and "P99 TPOT (ms):" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 6 and result["model_id"] == "fake-model"
    # the usage chunk counts 9 tokens though only 5 chunks carried text
    assert result["total_output_tokens"] == 54 and result["output_lens"] == [9] * 6
    assert result["total_input_tokens"] == 6 * 24
    assert all(len(itl) == 4 for itl in result["itls"])
    assert result["max_concurrent_requests"] <= 2
    bodies = _FakeCompletions.bodies
    assert len(bodies) == 7  # one warm-up
    assert all(b["ignore_eos"] is True and b["stream"] is True and b["max_tokens"] == 9 for b in bodies)


def test_bench_serve_names_a_server_it_cannot_reach(smollm2_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc = bench_main(["serve", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", smollm2_path,
                     "--num-prompts", "1", "--random-input-len", "8", "--random-output-len", "4"])
    assert rc == 2
    assert f"cannot reach http://127.0.0.1:{port}/v1/models" in capsys.readouterr().err


def test_bench_serve_counts_chunks_without_usage(fake_server: str, smollm2_path: str, tmp_path: Any) -> None:
    rc = bench_main([
        "serve", "--base-url", fake_server, "--tokenizer", smollm2_path, "--num-prompts", "2",
        "--random-input-len", "8", "--random-output-len", "6", "--extra-body", '{"stream_options": null}',
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
    ])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["output_lens"] == [3, 3]  # one per chunk
    assert "ignore_eos" not in _FakeCompletions.bodies[0]


class _ChunkedBody:
    """A response whose body arrives in the given pieces (aiohttp's `content.iter_any()`)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.content = self
        self._pieces = pieces

    async def iter_any(self) -> Any:
        for piece in self._pieces:
            yield piece


def test_sse_events_split_anywhere_and_of_any_length() -> None:
    import asyncio

    long_text = "x" * 200_000  # longer than aiohttp's line-reader limit (64 KiB)
    stream = (b": keep-alive comment\n\n"
              + b'data: {"n": 1}\n\n'
              + f'data: {{"n": 2, "text": "{long_text}"}}\n\n'.encode()
              + b'data:{"n": 3}\r\n\r\n'
              + b"data: [DONE]\n\n"
              + b'data: {"n": 4}\n\n')  # after [DONE]: not read
    for size in (1, 7, 4096, len(stream)):
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]

        async def collect(pieces: list[bytes] = pieces) -> list[dict[str, Any]]:
            return [event async for event in _sse_events(_ChunkedBody(pieces))]

        events = asyncio.run(collect())
        assert [e["n"] for e in events] == [1, 2, 3], size
        assert events[1]["text"] == long_text


# ---- offline commands and a real tessera server -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from fixtures_models import save_model

    return save_model(str(tmp_path_factory.mktemp("tiny-bench")))


def test_bench_throughput_and_latency(tiny_model: str, tmp_path: Any) -> None:
    out = tmp_path / "t.json"
    assert bench_main(["throughput", "--model", tiny_model, "--input-len", "8", "--output-len", "5",
                       "--num-prompts", "3", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_output_tokens"] == 15 and result["total_num_tokens"] == 15 + 24
    assert result["output_tokens_per_second"] > 0
    out = tmp_path / "l.json"
    assert bench_main(["latency", "--model", tiny_model, "--input-len", "8", "--output-len", "4",
                       "--batch-size", "2", "--num-iters", "2", "--num-iters-warmup", "1",
                       "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["latencies"]) == 2 and result["avg_latency"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_bench_serve_against_tessera_serve(smollm2_path: str, tmp_path: Any) -> None:
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "tessera")
    proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "tessera serve did not become healthy"
            time.sleep(0.5)  # polling a subprocess's readiness, not synchronizing threads
        rc = bench_main(["serve", "--port", str(port), "--tokenizer", smollm2_path, "--num-prompts", "4",
                         "--random-input-len", "16", "--random-output-len", "8", "--ignore-eos",
                         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"])
        assert rc == 0
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["completed"] == 4 and result["output_lens"] == [8] * 4
        assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
