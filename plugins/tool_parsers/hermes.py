"""The `hermes` tool parser: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number."""

from __future__ import annotations

from tessera.plugins.tool_parsers._common import TaggedJsonToolParser


class HermesToolParser(TaggedJsonToolParser):
    """Hermes 2 Pro / Hermes 3 (and Qwen2.5) tool calls, with text before, between and after.

    `<tool_call>` is an added token in these vocabularies; `adjust_request` keeps special tokens
    so it reaches the parser on tokenizers that mark it special.
    """

    start_tags = ("<tool_call>",)
    end_tag = "</tool_call>"
    CONFORMANCE_SAMPLES = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"y": [1, 2.5, true, null]}}\n</tool_call>',
        '<tool_call>{"arguments": {"q": "caf\\u00e9 \\"quoted\\""}, "name": "search"}</tool_call> done',
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"text": "unclosed',
        "<tool_call>not json</tool_call> and <tool_call>{\"name\": 5}</tool_call>",
        "plain answer with a < sign and <tool_ and <tool_call",
        '<tool_call>{"name": "ünï", "arguments": {"emoji": "😀\\ud83d\\ude00", "nested": {"k": []}}}'
        "</tool_call>\n\nThat is all.",
    )
