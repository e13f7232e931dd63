"""`tessera bench serve`: load-test any OpenAI-compatible completions server (vLLM's semantics)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from tessera.api import event_loop
from tessera.api.bench.datasets import (
    BenchRequest,
    load_tokenizer,
    random_requests,
    sharegpt_requests,
)
from tessera.api.bench.metrics import METRIC_TITLES, RequestResult, compute_metrics, format_table
from tessera.core.errors import TesseraError


def arrival_intervals(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Seconds to wait before each request: gamma-distributed with mean 1/rate (shape
    `burstiness`; 1.0 is a Poisson process); all zeros when the rate is infinite."""
    if burstiness <= 0:
        raise TesseraError(f"--burstiness={burstiness} must be > 0")
    if request_rate <= 0:
        raise TesseraError(f"--request-rate={request_rate} must be > 0 (or inf)")
    if np.isinf(request_rate):
        return [0.0] * num_requests
    theta = 1.0 / (request_rate * burstiness)
    rng = np.random.default_rng(seed)
    return [float(x) for x in rng.gamma(shape=burstiness, scale=theta, size=num_requests)]


async def _sse_events(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream, up to `[DONE]`. Lines are split here, from
    the body's chunks as they arrive, so an event of any length is read (aiohttp's own line
    reader refuses lines over its buffer limit)."""
    pending = b""
    async for chunk in response.content.iter_any():
        if b"\n" not in chunk:
            pending += chunk
            continue
        *lines, rest = chunk.split(b"\n")
        lines[0] = pending + lines[0]
        pending = rest
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[len(b"data:"):].strip()
            if payload == b"[DONE]":
                return
            yield json.loads(payload)


async def send_request(
    client: Any, url: str, body: dict[str, Any], prompt_len: int, headers: dict[str, str]
) -> RequestResult:
    """Stream one completion and time it; output tokens come from the final usage chunk when
    the server sends one, otherwise each text chunk counts as one token."""
    result = RequestResult(prompt_len=prompt_len)
    start = result.start_time = time.perf_counter()
    last = start
    num_chunks, usage_tokens = 0, None
    texts: list[str] = []
    try:
        async with client.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:300]!r}"
                return result
            async for event in _sse_events(response):
                now = time.perf_counter()
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                text = "".join(c.get("text") or "" for c in event.get("choices") or [])
                if not text:
                    continue
                if num_chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                num_chunks += 1
                texts.append(text)
    except Exception as exc:  # a failed request is recorded, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = last - start
    result.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    result.generated_text = "".join(texts)
    result.is_success = num_chunks > 0
    if not result.is_success:
        result.error = "no text in the stream"
    return result


def request_body(req: BenchRequest, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra parameter; llama-server reads the same name
    if args.top_k is not None:
        body["top_k"] = args.top_k
    body.update(args.extra_body)
    return body


async def run_benchmark(requests: Sequence[BenchRequest], args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, send every request on its arrival schedule, and return the metrics.

    The client is aiohttp, as in vLLM's benchmark_serving: it costs about a third of httpx's CPU
    per streamed chunk, which matters when the client shares the server's cores."""
    import aiohttp

    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(requests) or 1
    gate = asyncio.Semaphore(limit)
    timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=30.0)
    connector = aiohttp.TCPConnector(limit=limit + 8)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
        if args.model is None:
            args.model = await _first_model(client, args.base_url.rstrip("/"), headers)

        async def limited(req: BenchRequest) -> RequestResult:
            async with gate:
                return await send_request(client, url, request_body(req, args), req.prompt_len, headers)

        if args.num_warmups:
            warm = [requests[i % len(requests)] for i in range(args.num_warmups)]
            warm_results = await asyncio.gather(*(limited(r) for r in warm))
            failed = [r.error for r in warm_results if not r.is_success]
            if failed:
                raise TesseraError(f"warm-up request failed: {failed[0]}")
        intervals = arrival_intervals(len(requests), args.request_rate, args.burstiness, args.seed)
        tasks = []
        start = time.perf_counter()
        for req, wait in zip(requests, intervals):
            tasks.append(asyncio.create_task(limited(req)))
            if wait:
                await asyncio.sleep(wait)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    metrics = compute_metrics(results, duration, args.percentile_metrics, args.metric_percentiles)
    metrics["input_lens"] = [r.prompt_len for r in results]
    metrics["output_lens"] = [r.output_tokens for r in results]
    metrics["ttfts"] = [r.ttft for r in results]
    metrics["itls"] = [r.itl for r in results]
    metrics["generated_texts"] = [r.generated_text for r in results]
    metrics["errors"] = [r.error for r in results]
    return metrics


async def _first_model(client: Any, base_url: str, headers: dict[str, str]) -> str:
    import aiohttp

    try:
        async with client.get(base_url + "/v1/models", headers=headers) as response:
            if response.status != 200:
                raise TesseraError(f"{base_url}/v1/models answered HTTP {response.status}; pass --model")
            models = (await response.json()).get("data") or []
    except aiohttp.ClientError as exc:
        raise TesseraError(f"cannot reach {base_url}/v1/models: {exc}") from exc
    if not models:
        raise TesseraError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    tokenizer = load_tokenizer(args.tokenizer)
    total = args.num_prompts
    if args.dataset_name == "sharegpt" or args.dataset_path:
        if not args.dataset_path:
            raise TesseraError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return sharegpt_requests(tokenizer, args.dataset_path, total, args.sharegpt_output_len, args.seed)
    return random_requests(
        tokenizer, total, args.random_input_len, args.random_output_len,
        args.random_range_ratio, args.random_prefix_len, args.seed,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--base-url", default=None, help="Server root, e.g. http://127.0.0.1:8000 (default: from --host/--port).")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--endpoint", default="/v1/completions", help="Completions path on the server.")
    add("--model", default=None, help="Model name to send (default: the first from /v1/models).")
    add("--tokenizer", default=None, help="Tokenizer folder or .gguf file (default: the embedded SmolLM2).")
    add("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer token (default: $OPENAI_API_KEY).")
    add("--dataset-name", choices=["random", "sharegpt"], default="random")
    add("--dataset-path", default=None, help="ShareGPT-format JSON file (implies --dataset-name sharegpt).")
    add("--sharegpt-output-len", type=int, default=None, help="Override each ShareGPT reply's length.")
    add("--num-prompts", type=int, default=100)
    add("--random-input-len", type=int, default=1024)
    add("--random-output-len", type=int, default=128)
    add("--random-range-ratio", type=float, default=0.0, help="Lengths uniform in [L*(1-r), L*(1+r)].")
    add("--random-prefix-len", type=int, default=0, help="Tokens of a prefix shared by every prompt.")
    add("--request-rate", type=float, default=float("inf"), help="Requests/s (Poisson); inf sends all at once.")
    add("--burstiness", type=float, default=1.0, help="Gamma shape of the arrivals (1 = Poisson).")
    add("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    add("--ignore-eos", action="store_true", help="Send ignore_eos so each request yields its full output.")
    add("--temperature", type=float, default=0.0)
    add("--top-k", type=int, default=None)
    add("--extra-body", type=json.loads, default={}, help="JSON object merged into every request body.")
    add("--num-warmups", type=int, default=0, help="Requests sent (and not measured) before the run.")
    add("--seed", type=int, default=0)
    add("--timeout", type=float, default=6 * 3600, help="Seconds one request may take.")
    add("--percentile-metrics", default="ttft,tpot,itl",
        help=f"Comma-separated metrics to report, of {','.join(METRIC_TITLES)}.")
    add("--metric-percentiles", default="99", help="Comma-separated percentiles, e.g. 50,90,99.")
    add("--save-result", action="store_true", help="Write the result as JSON under --result-dir.")
    add("--result-dir", default=".")
    add("--result-filename", default=None)
    add("--label", default="tessera", help="Name of the server, for the result file.")
    add("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="Extra fields for the JSON.")


def normalize_args(args: argparse.Namespace) -> None:
    args.base_url = args.base_url or f"http://{args.host}:{args.port}"
    args.percentile_metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    unknown = [m for m in args.percentile_metrics if m not in METRIC_TITLES]
    if unknown:
        raise TesseraError(f"--percentile-metrics: unknown {unknown}; choose from {list(METRIC_TITLES)}")
    args.metric_percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    if any(not 0 < p < 100 for p in args.metric_percentiles):
        raise TesseraError("--metric-percentiles must lie strictly between 0 and 100")
    if args.num_prompts < 1:
        raise TesseraError(f"--num-prompts={args.num_prompts} must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise TesseraError(f"--max-concurrency={args.max_concurrency} must be >= 1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `tessera bench serve` with parsed flags: print the table, save the JSON if asked."""
    normalize_args(args)
    requests = build_requests(args)
    metrics = event_loop.run(run_benchmark(requests, args))
    print(format_table(metrics, args.percentile_metrics, args.metric_percentiles))
    failed = [e for e in metrics["errors"] if e]
    if failed:
        print(f"{len(failed)} requests failed; first error: {failed[0]}", file=sys.stderr)
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "label": args.label,
        "model_id": args.model,
        "base_url": args.base_url,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if np.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        **dict(item.split("=", 1) for item in args.metadata),
        **metrics,
    }
    if args.save_result:
        name = args.result_filename or (
            f"{args.label}-{args.request_rate}qps-concurrency{args.max_concurrency}-{result['date']}.json"
        )
        os.makedirs(args.result_dir, exist_ok=True)
        with open(os.path.join(args.result_dir, name), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera bench serve", description=__doc__)
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except TesseraError as exc:
        print(f"tessera bench serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
