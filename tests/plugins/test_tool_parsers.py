"""Tool-call parsers: recorded model outputs per parser, the conformance kit over every registered
parser, --tool-parser-plugin files, and the example tool chat templates."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tessera.core.errors import ConfigError, PluginLoadError
from tessera.core.interfaces import ExtractedToolCalls, ToolCall, ToolParser, ToolParserDelta
from tessera.core.plugins import load_plugins
from tessera.core.registry import Registry
from tessera.core.testing import check_tool_parser, conformance_samples
from tessera.core.tool_parser_loading import load_tool_parser_file
from tessera.plugins.tool_parsers.hermes import HermesToolParser
from tessera.plugins.tool_parsers.llama3_json import Llama3JsonToolParser
from tessera.plugins.tool_parsers.mistral import MistralToolParser
from tessera.plugins.tool_parsers.pythonic import PythonicToolParser
from tessera.plugins.tool_parsers.qwen import QwenToolParser

REPO = Path(__file__).resolve().parents[2]
REGISTRY = load_plugins().tool_parsers
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    for name in ("get_weather", "get_time", "search")
]


def calls_of(result: ExtractedToolCalls) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in result.tool_calls]


def stream(parser: ToolParser, chunks: list[str]) -> list[ToolParserDelta]:
    return [parser.parse_delta(chunk) for chunk in chunks] + [parser.finish()]


# -- recorded outputs ----------------------------------------------------------------------
HERMES_CASES = [
    pytest.param(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')], None, id="normal",
    ),
    pytest.param(
        'I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris"}')],
        "I will look both up.", id="parallel-with-text-before",
    ),
    pytest.param(
        '<tool_call>{"name":"search","arguments":{"q":"caf\\u00e9","n":1e2,"tags":["a",true,null]}}</tool_call>\nDone.',
        [("search", '{"q": "café", "n": 100.0, "tags": ["a", true, null]}')], "\nDone.", id="compact-text-after",
    ),
    pytest.param(
        '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}\n</tool_call>',
        [("search", '{"q": "x"}')], None, id="arguments-as-string",
    ),
    pytest.param(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "São Paulo 🌧", "note": "line\\nbreak"}}\n</tool_call>',
        [("get_weather", '{"city": "São Paulo 🌧", "note": "line\\nbreak"}')], None, id="unicode",
    ),
    pytest.param(
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"\n</tool_call>",
        [("get_weather", '{"city": "Paris"}')], "</tool_call>", id="damaged-after-name",
    ),
    pytest.param(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', [("get_weather", '{"city": "Par"}')],
        None, id="truncated-after-name",
    ),
]
MALFORMED = {
    HermesToolParser: [
        "<tool_call>\n{name: get_weather}\n</tool_call>",
        '<tool_call>\n{"arguments": {"city": "Paris"}',
        "Use the <tool_call> tag? No.",
        '<tool_call>{"name": ""}</tool_call>',
    ],
    MistralToolParser: ["[TOOL_CALLS] sorry", "[TOOL_CALLS][]", '[TOOL_CALLS][{"nam', "[TOOL_CALLS]f[ARG"],
    Llama3JsonToolParser: ['{"name": "not_a_tool", "parameters": {}}', '{"answer": 1}', 'text {"name": "get_time"}'],
    PythonicToolParser: ["[1, 2, 3]", "[f(1)]", "[f(a=g())]", "[f(a=1)", "x [f(a=1)]", "[Note] text"],
}


@pytest.mark.parametrize("text, calls, content", HERMES_CASES)
@pytest.mark.parametrize("parser_cls", [HermesToolParser, QwenToolParser])
def test_hermes_and_qwen_recorded_outputs(parser_cls, text, calls, content):
    result = parser_cls(None, TOOLS).extract_tool_calls(text)
    assert calls_of(result) == calls
    assert result.content == content
    check_tool_parser(parser_cls, [text], TOOLS)


@pytest.mark.parametrize("parser_cls", sorted(MALFORMED, key=lambda cls: cls.__name__))
def test_malformed_output_is_content(parser_cls):
    for text in MALFORMED[parser_cls]:
        result = parser_cls(None, TOOLS).extract_tool_calls(text)
        assert result.tool_calls == [] and result.content == text, text
    check_tool_parser(parser_cls, [], TOOLS, malformed=MALFORMED[parser_cls])


def test_mistral_formats_and_ids():
    parser = MistralToolParser(None, TOOLS)
    result = parser.extract_tool_calls(
        'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    assert calls_of(result) == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    assert result.content == "Checking."
    for call in result.tool_calls:
        assert call.id is not None and len(call.id) == 9 and call.id.isalnum()
    assert len({call.id for call in result.tool_calls}) == 2

    newer = parser.extract_tool_calls('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{}')
    assert calls_of(newer) == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    with_id = parser.extract_tool_calls('[TOOL_CALLS]search[CALL_ID]a1B2c3D4e[ARGS]{"q": 1}')
    assert [(c.name, c.arguments, c.id) for c in with_id.tool_calls] == [("search", '{"q": 1}', "a1B2c3D4e")]


def test_llama3_json_needs_known_names_only_for_bare_json():
    parser = Llama3JsonToolParser(None, TOOLS)
    bare = parser.extract_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert calls_of(bare) == [("get_weather", '{"city": "Rome"}')] and bare.content is None
    tagged = parser.extract_tool_calls(
        '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "search", "parameters": {"q": "x"}}'
    )
    assert calls_of(tagged) == [("get_time", "{}"), ("search", '{"q": "x"}')]
    plain_json = '{"name": "Ada", "parameters": {"age": 36}}'
    assert Llama3JsonToolParser(None, TOOLS).extract_tool_calls(plain_json).content == plain_json
    assert calls_of(Llama3JsonToolParser(None, []).extract_tool_calls(plain_json)) == [("Ada", '{"age": 36}')]


def test_pythonic_literals_and_wrapping():
    parser = PythonicToolParser(None, TOOLS)
    result = parser.extract_tool_calls(
        "<|python_start|>[get_weather(city='Lyon', days=[1, 2], opts={'metric': True}), get_time()]<|python_end|>"
    )
    assert calls_of(result) == [
        ("get_weather", '{"city": "Lyon", "days": [1, 2], "opts": {"metric": true}}'),
        ("get_time", "{}"),
    ]
    assert result.content is None
    text_after = parser.extract_tool_calls('[search(q="a ] b")]\nanything else')
    assert calls_of(text_after) == [("search", '{"q": "a ] b"}')] and text_after.content == "\nanything else"


# -- streaming -----------------------------------------------------------------------------
def test_streaming_sends_name_once_then_argument_fragments():
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "a long query string"}}\n</tool_call>'
    deltas = stream(HermesToolParser(None, TOOLS), list(text))
    call_deltas = [call for delta in deltas for call in delta.tool_calls]
    assert call_deltas[0].name == "search" and call_deltas[0].id and call_deltas[0].index == 0
    assert all(call.name is None and call.id is None for call in call_deltas[1:])
    assert len(call_deltas) > 10  # the string value streams as it is generated
    assert "".join(call.arguments for call in call_deltas) == '{"query": "a long query string"}'
    assert "".join(delta.content for delta in deltas) == ""


def test_streaming_holds_back_a_possible_tag_only():
    parser = HermesToolParser(None, TOOLS)
    assert parser.parse_delta("Hello <tool").content == "Hello"
    assert parser.parse_delta("box> world").content == " <toolbox> world"
    assert parser.finish().content == ""


def test_partial_arguments_stream_before_the_call_is_complete():
    parser = MistralToolParser(None, TOOLS)
    first = parser.parse_delta('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Ber')
    assert [(c.index, c.name, c.arguments) for c in first.tool_calls] == [(0, "get_weather", '{"city": "Ber')]
    rest = parser.parse_delta('lin"}}]')
    assert "".join(c.arguments for c in rest.tool_calls) == 'lin"}'
    assert parser.finish().is_empty()


# -- the contract, for every registered parser ---------------------------------------------
@pytest.mark.parametrize("name", REGISTRY.names())
def test_registered_tool_parser_conforms(name):
    parser_cls = REGISTRY.get(name)
    assert issubclass(parser_cls, ToolParser)
    check_tool_parser(parser_cls, conformance_samples(parser_cls))
    check_tool_parser(parser_cls, conformance_samples(parser_cls), TOOLS, num_random_chunkings=1)


def test_builtin_parsers_are_registered_with_samples():
    for name in ("hermes", "mistral", "llama3_json", "pythonic", "qwen"):
        assert name in REGISTRY
        assert len(conformance_samples(REGISTRY.get(name))) >= 3


@pytest.mark.parametrize("name", REGISTRY.names())
def test_registered_tool_parser_survives_random_text(name):
    pieces = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "{", "}", "[", "]",
              '"name"', '"arguments"', ":", ",", ";", " ", "\n", '"f"', "1", "true", "\\", '"', "é😀", "f(", ")", "a="]
    rng = random.Random(name)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 20))) for _ in range(25)]
    check_tool_parser(REGISTRY.get(name), texts, num_random_chunkings=1)


def test_adjust_request_keeps_special_tokens():
    request = SimpleNamespace(tools=TOOLS, tool_choice="auto", skip_special_tokens=True)
    assert MistralToolParser(None, TOOLS).adjust_request(request).skip_special_tokens is False
    untouched = SimpleNamespace(tools=TOOLS, tool_choice="none", skip_special_tokens=True)
    assert HermesToolParser(None, TOOLS).adjust_request(untouched).skip_special_tokens is True


# -- the kit itself ------------------------------------------------------------------------
class _LeakyParser(HermesToolParser):
    """Streams tag text as content: the kit must catch it."""

    def parse_delta(self, delta_text: str) -> ToolParserDelta:
        return ToolParserDelta(content=delta_text)

    def finish(self) -> ToolParserDelta:
        return ToolParserDelta()


class _RaisingParser(HermesToolParser):
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        json.loads(text)
        return ExtractedToolCalls([], text)


class _BadArgumentsParser(HermesToolParser):
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        return ExtractedToolCalls([ToolCall("f", "[1]")], None)


@pytest.mark.parametrize(
    "parser_cls, message",
    [(_LeakyParser, "streamed content"), (_RaisingParser, "raised"), (_BadArgumentsParser, "not a JSON object")],
)
def test_kit_reports_broken_parsers(parser_cls, message):
    with pytest.raises(AssertionError, match=message):
        check_tool_parser(parser_cls, ['<tool_call>{"name": "f", "arguments": {}}</tool_call>', "not json"])


def test_kit_checks_expected_results():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    check_tool_parser(HermesToolParser, [(text, ExtractedToolCalls([ToolCall("f", '{"a":1}')], None))])
    with pytest.raises(AssertionError, match="expected"):
        check_tool_parser(HermesToolParser, [(text, ExtractedToolCalls([ToolCall("g", "{}")], None))])


def test_example_third_party_parser_conforms(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "tessera-example-plugin"))
    from tessera_example_plugin.tool_parser import ExampleJsonToolParser

    check_tool_parser(
        ExampleJsonToolParser,
        ['Hi <call>{"name": "f", "arguments": {"a": [1]}}</call> bye', '<call>{"name": "g"}</call>'],
        malformed=["<call>{oops}</call>", "<call>unterminated"],
    )
    sys.modules.pop("tessera_example_plugin.tool_parser", None)


# -- --tool-parser-plugin FILE -------------------------------------------------------------
PLUGIN_FILE = '''
from tessera.plugins.tool_parsers.hermes import HermesToolParser

class AngleToolParser(HermesToolParser):
    name = "angle"
    start_tags = ("<<call>>",)
    end_tag = "<</call>>"
    CONFORMANCE_SAMPLES = ('say <<call>>{"name": "f", "arguments": {"x": 1}}<</call>>',)
'''


def test_load_tool_parser_file_registers_named_subclasses(tmp_path):
    path = tmp_path / "my_parser.py"
    path.write_text(PLUGIN_FILE)
    registry = Registry("tool_parser")
    assert load_tool_parser_file(str(path), registry) == ["angle"]
    parser_cls = registry.get("angle")
    assert "hermes" not in registry.names()  # imported classes are not registered
    result = parser_cls(None, None).extract_tool_calls(conformance_samples(parser_cls)[0])
    assert calls_of(result) == [("f", '{"x": 1}')] and result.content == "say"
    check_tool_parser(parser_cls, conformance_samples(parser_cls))


def test_load_tool_parser_file_with_register_function(tmp_path):
    path = tmp_path / "hooked.py"
    path.write_text(
        "from tessera.plugins.tool_parsers.qwen import QwenToolParser\n"
        "def register_tool_parsers(register):\n    register('qwen_alias', QwenToolParser)\n"
    )
    registry = Registry("tool_parser")
    assert load_tool_parser_file(str(path), registry) == ["qwen_alias"]
    assert registry.entry("qwen_alias").plugin == f"file:{path}"


@pytest.mark.parametrize(
    "source, error, message",
    [
        (None, ConfigError, "no such file"),
        ("x = 1\n", ConfigError, "registers no tool parser"),
        ("raise RuntimeError('boom')\n", PluginLoadError, "boom"),
        ("def register_tool_parsers(register):\n    register('bad', 42)\n", PluginLoadError, "not a ToolParser"),
    ],
)
def test_load_tool_parser_file_errors(tmp_path, source, error, message):
    path = tmp_path / f"plugin_{abs(hash(message))}.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(error, match=message):
        load_tool_parser_file(str(path), Registry("tool_parser"))


# -- example chat templates ----------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_0123456789abcdefXYZ", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "chatcmpl-tool-987654321", "type": "function",
             "function": {"name": "get_time", "arguments": {"tz": "CET"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_0123456789abcdefXYZ", "content": "22 °C"},
    {"role": "tool", "tool_call_id": "chatcmpl-tool-987654321", "name": "get_time", "content": "noon"},
    {"role": "assistant", "content": "22 °C at noon."},
    {"role": "user", "content": "Thanks <3"},
]


def _render(template: str, *, plain_tojson: bool) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    if plain_tojson:  # what transformers and tessera's server use: no HTML escaping
        env.filters["tojson"] = lambda value, **kwargs: json.dumps(value, ensure_ascii=False, **kwargs)
    source = (REPO / "examples" / template).read_text()
    return env.from_string(source).render(
        messages=CONVERSATION, tools=TOOLS, bos_token="<s>", eos_token="</s>", add_generation_prompt=True
    )


@pytest.mark.parametrize("plain_tojson", [True, False])
@pytest.mark.parametrize(
    "template", ["tool_chat_template_mistral.jinja", "tool_chat_template_mistral_parallel.jinja"]
)
def test_mistral_templates_render_tool_turns(template, plain_tojson):
    text = _render(template, plain_tojson=plain_tojson)
    assert text.startswith("<s>[INST] Weather in Paris")
    assert '"id": "abcdefXYZ"' in text and '"call_id": "987654321"' in text  # ids cut to 9 characters
    assert "call_0123" not in text
    assert text.index("[AVAILABLE_TOOLS]") > text.index("22 °C at noon.")  # tools before the last user turn
    calls_part = text[text.index("[TOOL_CALLS]") : text.index("</s>")]
    parsed = MistralToolParser(None, TOOLS).extract_tool_calls(calls_part)
    assert calls_of(parsed) == [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')]
    assert ("parallel" in template) == ("single [TOOL_CALLS] list" in text)


@pytest.mark.parametrize("plain_tojson", [True, False])
def test_hermes_template_renders_tool_turns(plain_tojson):
    text = _render("tool_chat_template_hermes.jinja", plain_tojson=plain_tojson)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert text.count("<|im_start|>system") == 1 and "<tools>\n" in text
    assistant = text.split("<|im_start|>assistant")[1]
    parsed = HermesToolParser(None, TOOLS).extract_tool_calls(assistant.split("<|im_end|>")[0])
    assert calls_of(parsed) == [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')]
    assert text.count("<|im_start|>tool\n<tool_response>") == 1 and text.count("</tool_response>") == 2
    assert text.endswith("<|im_start|>assistant\n")
