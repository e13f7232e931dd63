"""The `qwen` tool parser: Qwen2.5's `<tool_call>` JSON calls (the hermes format)."""

from __future__ import annotations

from tessera.plugins.tool_parsers.hermes import HermesToolParser


class QwenToolParser(HermesToolParser):
    """Qwen2.5 writes each call as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`."""

    CONFORMANCE_SAMPLES = (
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": '
        '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n</tool_call>',
        "我来查一下天气。\n<tool_call>\n{\"name\": \"天气\", \"arguments\": {\"城市\": \"北京\"}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1,}\n</tool_call>",
    )
