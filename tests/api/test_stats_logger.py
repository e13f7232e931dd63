"""The periodic stats line (what --disable-log-stats turns off) reports throughput since the last line."""

from __future__ import annotations

from fake_engine import FakeEngine

from tessera.api.metrics import ServerMetrics, StatsLogger


def test_stats_line_reports_throughput_since_the_previous_line():
    engine = FakeEngine()
    metrics = ServerMetrics(engine, "m")
    stats_logger = StatsLogger(engine, metrics)
    assert stats_logger.line(100.0) is None  # the first call only sets the baseline
    metrics.prompt_tokens.inc(50)
    metrics.generation_tokens.inc(200)
    line = stats_logger.line(110.0)
    assert "prompt throughput: 5.0 tokens/s" in line
    assert "generation throughput: 20.0 tokens/s" in line
    assert "running: " in line and "KV cache usage: " in line
    assert "generation throughput: 0.0 tokens/s" in stats_logger.line(120.0)
