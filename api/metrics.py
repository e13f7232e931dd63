"""Prometheus metrics under vLLM's names, so existing dashboards work; one registry per app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tessera.core.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)


class _EngineStatsCollector(Collector):
    """Gauges read from `engine.stats()` at scrape time, so they are never stale."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Any]:
        stats = self.engine.stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, number: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(value, number)
            return family

        def counter(name: str, doc: str, number: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(value, number)
            return family

        yield gauge("vllm:num_requests_running", "Requests being computed.", stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (1 = full).", stats.kv_cache_usage)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", stats.kv_cache_usage)
        yield gauge("tessera:kv_cache_used_blocks", "KV blocks held by live requests.", stats.num_used_blocks)
        yield gauge("tessera:kv_cache_total_blocks", "KV blocks in the pool.", stats.num_blocks)
        yield gauge("tessera:engine_steps", "Engine steps completed.", stats.num_steps)
        yield counter("vllm:num_preemptions", "Preemptions.", stats.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)


class ServerMetrics:
    """Request-level counters and histograms, recorded by the serving layer."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(engine, model_name))
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=self.registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=self.registry
        ).labels(model_name)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels,
            buckets=_TTFT_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Time per output token after the first.", labels,
            buckets=_TPOT_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency from arrival to the last token.",
            labels, buckets=_E2E_BUCKETS, registry=self.registry,
        ).labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Timing of one engine request, fed with each delta it yields."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_generated = 0
        self.num_prompt_tokens = 0
        self.finish_reasons: dict[int, str] = {}
        self.is_recorded = False

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        self.num_prompt_tokens = len(output.prompt_token_ids)
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if new_tokens:
            self.num_generated += new_tokens
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        for c in output.outputs:
            if c.finish_reason is not None:
                self.finish_reasons[c.index] = c.finish_reason
        if output.finished:
            self.record()

    def record(self, aborted: bool = False) -> None:
        """Count the request once, when it finishes (or is aborted)."""
        if self.is_recorded:
            return
        self.is_recorded = True
        m = self.metrics
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.generation_tokens.inc(self.num_generated)
        reasons = ["abort"] if aborted else (list(self.finish_reasons.values()) or ["abort"])
        for reason in reasons:
            m.request_success.labels(m.model_name, reason).inc()
        if self.first_token_at is not None:
            m.ttft.observe(self.first_token_at - self.arrival)
            choices = max(1, len(self.finish_reasons))
            per_choice = self.num_generated / choices
            if per_choice > 1 and self.last_token_at is not None:
                m.tpot.observe((self.last_token_at - self.first_token_at) / (per_choice - 1))
        m.e2e.observe(time.monotonic() - self.arrival)


class StatsLogger:
    """The periodic one-line engine summary vLLM prints (turned off by --disable-log-stats)."""

    def __init__(self, engine: Any, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._last: tuple[float, float, float] | None = None

    def _totals(self) -> tuple[float, float]:
        labels = {"model_name": self.metrics.model_name}
        get = self.metrics.registry.get_sample_value
        return (get("vllm:prompt_tokens_total", labels) or 0.0, get("vllm:generation_tokens_total", labels) or 0.0)

    def line(self, now: float) -> str | None:
        """The summary since the previous call (None on the first call, which sets the baseline)."""
        prompt, generated = self._totals()
        last, self._last = self._last, (now, prompt, generated)
        if last is None or now <= last[0]:
            return None
        elapsed = now - last[0]
        stats = self.engine.stats()
        return (
            f"prompt throughput: {(prompt - last[1]) / elapsed:.1f} tokens/s, "
            f"generation throughput: {(generated - last[2]) / elapsed:.1f} tokens/s, "
            f"running: {stats.num_running} reqs, waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%, "
            f"prefix cache hit rate: {100 * stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1):.1f}%"
        )
