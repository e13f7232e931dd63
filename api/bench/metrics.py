"""Serving-benchmark metrics with vLLM benchmark_serving's definitions, and their table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# metric key -> (table title, its line label)
METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass
class RequestResult:
    """What one streamed request measured; times in seconds since the request was sent."""

    prompt_len: int
    is_success: bool = False
    output_tokens: int = 0  # from the server's usage when it sent one, else one per chunk
    ttft: float = 0.0  # until the first chunk that carries text
    latency: float = 0.0  # until the last chunk that carries text
    itl: list[float] = field(default_factory=list)  # gaps between text chunks
    generated_text: str = ""
    error: str = ""
    start_time: float = 0.0  # perf_counter at send, to find the peak concurrency


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first: (latency - ttft) / (output_tokens - 1)."""
    if result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std and the given percentiles, in milliseconds (zeros when empty)."""
    values_ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if values_ms.size == 0:
        values_ms = np.zeros(1)
    out = {
        "mean": float(values_ms.mean()),
        "median": float(np.median(values_ms)),
        "std": float(values_ms.std()),
    }
    for p in percentiles:
        out[f"p{_p_name(p)}"] = float(np.percentile(values_ms, p))
    return out


def _p_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def compute_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    selected: Sequence[str] = ("ttft", "tpot", "itl"),
    percentiles: Sequence[float] = (99,),
) -> dict[str, Any]:
    """Aggregate per-request results over a run of `duration_s` seconds (vLLM's formulas)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s={duration_s} must be > 0")
    done = [r for r in results if r.is_success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    series: dict[str, list[float]] = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for r in done if (t := tpot(r)) is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    metrics: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_concurrent_requests": peak_concurrency(done),
    }
    for key in selected:
        for stat, value in summarize(series[key], percentiles).items():
            metrics[f"{stat}_{key}_ms"] = value
    return metrics


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once, from their start times and latencies."""
    events = sorted(
        [(r.start_time, 1) for r in results] + [(r.start_time + r.latency, -1) for r in results],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def format_table(
    metrics: dict[str, Any],
    selected: Sequence[str] = ("ttft", "tpot", "itl"),
    percentiles: Sequence[float] = (99,),
    title: str = "Serving Benchmark Result",
) -> str:
    """The result as the familiar fixed-width text table."""
    width = 50
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: Any, fmt: str = "<10.2f") -> None:
        lines.append(f"{label:<40}{value:{fmt}}")

    row("Successful requests:", metrics["completed"], "<10")
    if metrics.get("failed"):
        row("Failed requests:", metrics["failed"], "<10")
    row("Benchmark duration (s):", metrics["duration"])
    row("Total input tokens:", metrics["total_input_tokens"], "<10")
    row("Total generated tokens:", metrics["total_output_tokens"], "<10")
    row("Request throughput (req/s):", metrics["request_throughput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"])
    row("Peak concurrent requests:", metrics["max_concurrent_requests"], "<10")
    for key in selected:
        heading, label = METRIC_TITLES[key]
        lines.append(heading.center(width, "-"))
        row(f"Mean {label} (ms):", metrics[f"mean_{key}_ms"])
        row(f"Median {label} (ms):", metrics[f"median_{key}_ms"])
        for p in percentiles:
            name = _p_name(p)
            row(f"P{name} {label} (ms):", metrics[f"p{name}_{key}_ms"])
    lines.append("=" * width)
    return "\n".join(lines)
