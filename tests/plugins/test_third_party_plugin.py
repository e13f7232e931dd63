"""A third-party plugin package, installed with pip, is found, used, listed and can be disabled."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.core.errors import PluginLoadError
from tessera.core.plugins import load_plugins

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "plugins" / "tessera-example-plugin"
DIST_NAME = "tessera-example-plugin"
ENTRY_POINT = "example"


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True
    )


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory):
    # Build from a copy so the source tree gets no build/ or *.egg-info.
    source = tmp_path_factory.mktemp("example-plugin") / "src"
    shutil.copytree(EXAMPLE, source)
    _pip("install", "--no-deps", "--no-build-isolation", str(source))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        _pip("uninstall", "-y", DIST_NAME)
        importlib.invalidate_caches()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TESSERA_PLUGINS", "TESSERA_DISABLE_PLUGINS")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tessera.api.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def _listed(env: dict[str, str] | None = None) -> dict:
    result = _cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_lists_the_installed_plugin(example_plugin):
    listing = _listed()
    [entry] = [e for e in listing["entries"] if e["name"] == "example_json"]
    assert entry["kind"] == "tool_parser"
    assert entry["distribution"] == DIST_NAME
    assert entry["version"] == "0.1.0"
    assert entry["target"] == "tessera_example_plugin.tool_parser:ExampleJsonToolParser"
    table = _cli("plugins").stdout
    assert "example_json" in table and DIST_NAME in table


def test_registry_serves_the_parser(example_plugin):
    plugins = load_plugins()
    parser_cls = plugins.tool_parsers.get("example_json")
    result = parser_cls().extract_tool_calls(
        'Sure. <call>{"name": "f", "arguments": {"x": 1}}</call>'
    )
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("f", {"x": 1})]
    assert result.content == "Sure. "


def test_disable_removes_it(example_plugin):
    listing = _listed({"TESSERA_DISABLE_PLUGINS": ENTRY_POINT})
    assert "example_json" not in [e["name"] for e in listing["entries"]]
    assert ENTRY_POINT not in [p["plugin"] for p in listing["plugins"]]
    assert "cpu" in [p["plugin"] for p in listing["plugins"]]  # only that one is disabled


def test_allow_list_keeps_only_it(example_plugin):
    listing = _listed({"TESSERA_PLUGINS": ENTRY_POINT})
    assert [p["plugin"] for p in listing["plugins"]] == [ENTRY_POINT]
    assert [e["name"] for e in listing["entries"]] == ["example_json"]


def test_serve_accepts_the_plugin_parser_and_rejects_unknown(example_plugin):
    from tessera.api.args import check_supported, parse_serve_args
    from tessera.core.errors import NotImplementedFeatureError

    plugins = load_plugins()
    check_supported(
        parse_serve_args(["--enable-auto-tool-choice", "--tool-call-parser", "example_json"]),
        plugins,
    )
    with pytest.raises(NotImplementedFeatureError, match="--tool-call-parser.*example_json"):
        check_supported(parse_serve_args(["--tool-call-parser", "nope"]), plugins)


# --plugin: unpackaged modules -------------------------------------------------------------------


def test_broken_plugin_module_is_a_clear_error(tmp_path):
    (tmp_path / "broken_tessera_plugin.py").write_text('raise RuntimeError("boom at import")\n')
    env = {"PYTHONPATH": str(tmp_path)}
    for command in (["serve"], ["plugins"]):
        result = _cli(*command, "--plugin", "broken_tessera_plugin", env=env)
        assert result.returncode == 2
        assert "broken_tessera_plugin" in result.stderr and "boom at import" in result.stderr
        assert "Traceback" not in result.stderr


def test_plugin_module_from_the_command_line(tmp_path):
    (tmp_path / "local_tessera_plugin.py").write_text(
        "from tessera.core.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def tessera_register_tool_parsers(register):\n"
        "    register('local_parser', 'tessera_example_plugin.tool_parser:ExampleJsonToolParser')\n"
    )
    result = _cli(
        "plugins", "--json", "--plugin", "local_tessera_plugin", env={"PYTHONPATH": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr
    entries = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    assert entries["local_parser"]["plugin"].startswith("local_tessera_plugin")


def test_broken_hook_names_the_plugin(tmp_path, monkeypatch):
    (tmp_path / "bad_hook_tessera_plugin.py").write_text(
        "from tessera.core.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def tessera_register_platforms(register):\n"
        "    raise ValueError('no device here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError, match="bad_hook_tessera_plugin.*no device here"):
        load_plugins(allow="none", extra_modules=["bad_hook_tessera_plugin"])


# the example parser itself ----------------------------------------------------------------------

SAMPLES = [
    'Let me check. <call>{"name": "get_weather", "arguments": {"city": "Paris"}}</call>',
    '<call>{"name": "a", "arguments": {}}</call>\n<call>{"name": "b", "arguments": "{\\"k\\": [1, 2]}"}</call> done',
    "no calls at all, but a < sign and <cal",
    '<call>{"name": "a", "arguments": {"x": 1}</call> broken json stays content',
    '<call>{"arguments": {}}</call> a call without a name is content',
    '<call>{"name": "unclosed", "arguments": {}}',
    "",
]


@pytest.fixture
def parser_cls(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from tessera_example_plugin.tool_parser import ExampleJsonToolParser

    return ExampleJsonToolParser


def _stream(parser, pieces):
    content, calls = "", []
    for delta in [*(parser.parse_delta(p) for p in pieces), parser.finish()]:
        content += delta.content
        for call in delta.tool_calls:
            assert call.index == len(calls)
            calls.append((call.name, call.arguments))
    return content, calls


def test_example_parser_whole_text(parser_cls):
    first = parser_cls().extract_tool_calls(SAMPLES[1])
    assert [(c.name, json.loads(c.arguments)) for c in first.tool_calls] == [
        ("a", {}),
        ("b", {"k": [1, 2]}),
    ]
    assert first.content == "\n done"
    for malformed in SAMPLES[2:6]:
        result = parser_cls().extract_tool_calls(malformed)
        assert result.tool_calls == [] and result.content == malformed
    assert parser_cls().extract_tool_calls("").content is None


@pytest.mark.parametrize("text", SAMPLES)
def test_example_parser_stream_equals_whole_for_every_split(parser_cls, text):
    whole = parser_cls().extract_tool_calls(text)
    expected = (whole.content or "", [(c.name, c.arguments) for c in whole.tool_calls])
    assert _stream(parser_cls(), list(text)) == expected  # one character at a time
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 7):
            assert _stream(parser_cls(), [text[:i], text[i:j], text[j:]]) == expected
