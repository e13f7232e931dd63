"""`tessera serve` flags: every spec flag, --config precedence, clear errors, unsupported values."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.api.args import (
    REGISTRY_FLAGS,
    UNSUPPORTED,
    build_parser,
    check_supported,
    engine_config_from_args,
    long_options,
    parse_serve_args,
)
from tessera.api.serve_flags import bool_value, json_object, key_value_ints
from tessera.core.errors import ConfigError, NotImplementedFeatureError

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO.parent / "shared" / "spec" / "openai_compatible_server.zh.md"
USAGE_COPY = Path(__file__).parent / "data" / "vllm_serve_usage.txt"

# Deliberate differences from vLLM's defaults (documented in docs/cli.md).
DEFAULT_DIFFERENCES = {
    "--model": None,  # vLLM: facebook/opt-125m; tessera: the embedded SmolLM2 model
    "--enable-prefix-caching": True,  # vLLM: off; tessera: on
    "--guided-decoding-backend": "auto",  # vLLM: outlines; tessera: the fastest that fits
}


def _spec_usage() -> str:
    """The usage block of the spec; the stored copy must match it when the spec is at hand."""
    copy = USAGE_COPY.read_text()
    if SPEC.exists():
        text = SPEC.read_text()
        start = text.index("```plain\n", text.index("## 服务器的命令行参数")) + len("```plain\n")
        assert text[start : text.index("```", start)] == copy, (
            "tests/unit/data/vllm_serve_usage.txt is stale"
        )
    return copy


def _spec_flags() -> dict[str, tuple[str, ...] | None]:
    """flag -> its choices in the usage block (None when it lists none)."""
    flags: dict[str, tuple[str, ...] | None] = {}
    for flag, choices in re.findall(r"\[(--?[\w-]+)(?: \{([^}]*)\})?", _spec_usage()):
        if flag != "-h":
            flags[flag] = tuple(choices.split(",")) if choices else None
    return flags


def test_every_spec_flag_is_accepted_with_its_choices():
    options = long_options(build_parser())
    flags = _spec_flags()
    assert len(flags) > 100
    for flag, choices in flags.items():
        assert flag in options, f"{flag} from the spec is missing"
        if choices is None:
            continue
        action = options[flag]
        if flag in REGISTRY_FLAGS:  # open to plugins; vLLM's names are documented in --help
            assert set(choices) <= set(REGISTRY_FLAGS[flag].vllm_names), flag
            if action.choices is None:
                assert ", ".join(REGISTRY_FLAGS[flag].vllm_names) in (action.help or ""), flag
        if action.choices is not None or flag not in REGISTRY_FLAGS:
            assert [str(c) for c in action.choices or ()] == list(choices), flag
    assert {"auto", "cpu", "cuda", "rocm"} <= set(REGISTRY_FLAGS["--device"].vllm_names)


def _spec_defaults() -> dict[str, object]:
    text = SPEC.read_text()
    section = text[text.index("### 命名参数") :]
    defaults: dict[str, object] = {}
    for block in re.split(r"\n`(?=-)", section)[1:]:
        flag = block.split("`", 1)[0].split(",")[0].strip()
        found = re.search(r"默认值\s*[：:]\s*(.+)", block)
        if found:
            defaults[flag] = found.group(1).strip()
    return defaults


def _spec_value(raw: str) -> object:
    raw = raw.strip("「」")
    if raw == "Unlimited":
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


@pytest.mark.skipif(not SPEC.exists(), reason="the spec is not next to this checkout")
def test_defaults_match_the_spec():
    parser = build_parser()
    options = long_options(parser)
    defaults = _spec_defaults()
    assert len(defaults) > 50
    for flag, raw in defaults.items():
        expected = DEFAULT_DIFFERENCES.get(flag, _spec_value(raw))
        assert parser.get_default(options[flag].dest) == expected, flag


def test_short_aliases_and_positional_model():
    ns = parse_serve_args(
        ["/models/x", "-tp", "1", "-pp", "1", "-q", "gguf", "-spec-draft-tp", "1"]
    )
    assert ns.model == "/models/x"
    assert (ns.tensor_parallel_size, ns.pipeline_parallel_size, ns.quantization) == (1, 1, "gguf")
    assert parse_serve_args(["--model", "/m"]).model == "/m"
    assert parse_serve_args([]).model is None


def test_value_forms():
    ns = parse_serve_args(
        [
            "--allowed-origins",
            '["http://a"]',
            "--served-model-name",
            "a",
            "b",
            "--middleware",
            "m1",
            "--middleware",
            "m2",
            "--rope-scaling",
            '{"type": "dynamic", "factor": 2.0}',
            "--limit-mm-per-prompt",
            "image=16,video=2",
            "--no-enable-prefix-caching",
        ]
    )
    assert ns.allowed_origins == ["http://a"]
    assert ns.served_model_name == ["a", "b"]
    assert ns.middleware == ["m1", "m2"]
    assert ns.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert ns.limit_mm_per_prompt == {"image": 16, "video": 2}
    assert ns.enable_prefix_caching is False
    assert parse_serve_args([]).enable_prefix_caching is True
    assert parse_serve_args(["--enable-chunked-prefill"]).enable_chunked_prefill is True
    assert parse_serve_args(["--enable-chunked-prefill", "false"]).enable_chunked_prefill is False
    assert parse_serve_args([]).enable_chunked_prefill is None


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--block-size", "7"], "argument --block-size: invalid choice: 7"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--port", "-1"], "argument --port: -1 is not a port number (0..65535)"),
        (["--port", "65536"], "argument --port: 65536 is not a port number (0..65535)"),
        (["--allowed-origins", "*"], "argument --allowed-origins: not valid JSON"),
        (
            ["--enable-chunked-prefill", "maybe"],
            "argument --enable-chunked-prefill: expected true or false",
        ),
        (["m1", "--model", "m2"], "the model is given twice"),
    ],
)
def test_bad_command_line_is_a_clear_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_serve_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


# --config -----------------------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_config_precedence_cli_over_file_over_defaults(tmp_path):
    config = _yaml(
        tmp_path,
        "port: 7000\nhost: 127.0.0.1\ndtype: float32\nmax_num_seqs: 8\nmiddleware: [from.file]\n"
        "uvicorn-log-level: debug\nenable-prefix-caching: false\nallowed-origins: ['http://x']\n"
        'rope-scaling: \'{"type": "linear", "factor": 2}\'\nenable-chunked-prefill: false\n'
        "served-model-name: solo\nmodel: /from/file\n",
    )
    ns = parse_serve_args(["--config", config, "--port", "9000", "--middleware", "from.cli"])
    assert ns.port == 9000  # command line beats the file
    assert ns.middleware == ["from.cli"]  # ... also for repeatable flags (not appended)
    assert (ns.host, ns.dtype, ns.max_num_seqs, ns.uvicorn_log_level) == (
        "127.0.0.1",
        "float32",
        8,
        "debug",
    )
    assert ns.enable_prefix_caching is False and ns.enable_chunked_prefill is False
    assert ns.allowed_origins == ["http://x"]
    assert ns.rope_scaling == {"type": "linear", "factor": 2}
    assert ns.served_model_name == ["solo"]
    assert ns.model == "/from/file"
    assert ns.max_num_batched_tokens is None and ns.swap_space == 4  # defaults stay
    assert parse_serve_args(["/from/cli", "--config", config]).model == "/from/cli"


def test_config_negated_boolean_key(tmp_path):
    ns = parse_serve_args(["--config", _yaml(tmp_path, "no-enable-prefix-caching: true\n")])
    assert ns.enable_prefix_caching is False


@pytest.mark.parametrize(
    "text, needle",
    [
        ("prot: 8000\n", "unknown key 'prot'"),
        ("dtype: float8\n", "dtype: invalid choice 'float8'"),
        ("port: http\n", "port: invalid int value: 'http'"),
        ("port: 70000\n", "port: 70000 is not a port number"),
        ("port: 8000.0\n", None),  # a whole float is an int
        ("max-num-seqs: 2.5\n", "max-num-seqs: expected an integer"),
        ("host: [a]\n", "host: expected a string"),
        ("trust-remote-code: 'yes'\n", "trust-remote-code: expected true or false"),
        ("allowed-origins: {a: 1}\n", "allowed-origins: expected a JSON list"),
        ("- port\n", "must hold a mapping"),
        ("port: [\n", "not valid YAML"),
        ("config: other.yaml\n", "unknown key 'config'"),
    ],
)
def test_bad_config_file_is_a_clear_error(tmp_path, capsys, text, needle):
    config = _yaml(tmp_path, text)
    if needle is None:
        assert parse_serve_args(["--config", config]).port == 8000
        return
    with pytest.raises(SystemExit) as exc:
        parse_serve_args(["--config", config])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "--config" in err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(tmp_path / "nope.yaml")])
    assert "cannot read" in capsys.readouterr().err


# unsupported values ----------------------------------------------------------------------------


def _candidates(action: argparse.Action) -> list[list[str]]:
    """Command-line forms setting `action` to non-default values."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [[flag]]
    if action.choices:
        return [[flag, str(c)] for c in action.choices]
    by_type = {
        int: ["2"],
        float: ["2.5"],
        json_object: ['{"a": 1}'],
        key_value_ints: ["image=2"],
        bool_value: ["true", "false"],
    }
    return [[flag, value] for value in by_type.get(action.type, ["swap", "x"])]  # type: ignore[arg-type]


@pytest.mark.parametrize("row", UNSUPPORTED, ids=lambda row: row.flag)
def test_unsupported_value_is_rejected_naming_the_flag(row):
    parser = build_parser()
    action = long_options(parser)[row.flag]
    default = parser.get_default(action.dest)
    check_supported(parse_serve_args([]))  # the default is fine
    rejected = 0
    for argv in _candidates(action):
        ns = parse_serve_args(argv)
        value = getattr(ns, action.dest)
        if value == default or not row.when(value):
            check_supported(ns)
            continue
        with pytest.raises(NotImplementedFeatureError) as exc:
            check_supported(ns)
        assert str(exc.value).startswith(row.flag) and row.reason in str(exc.value)
        rejected += 1
    assert rejected, f"no sample value of {row.flag} is rejected"


def test_unsupported_table_names_real_flags_once():
    options = long_options(build_parser())
    flags = [row.flag for row in UNSUPPORTED]
    assert len(flags) == len(set(flags))
    assert set(flags) <= set(options)
    assert set(REGISTRY_FLAGS) <= set(options)


def test_auto_tool_choice_needs_a_parser():
    with pytest.raises(ConfigError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        check_supported(parse_serve_args(["--enable-auto-tool-choice"]))


def test_registry_flags_need_a_registered_plugin():
    from tessera.core.plugins import load_plugins

    plugins = load_plugins(allow="cpu")
    check_supported(parse_serve_args(["--device", "auto", "--quantization", "None"]), plugins)
    for argv, flag in (
        (["--device", "neuron"], "--device neuron"),
        (["-q", "awq"], "--quantization awq"),
        (["--guided-decoding-backend", "xgrammar"], "--guided-decoding-backend xgrammar"),
        (["--tool-call-parser", "hermes"], "--tool-call-parser hermes"),
    ):
        with pytest.raises(NotImplementedFeatureError) as exc:
            check_supported(parse_serve_args(argv), plugins)
        assert str(exc.value).startswith(flag) and "registered:" in str(exc.value)


# EngineConfig ------------------------------------------------------------------------------------


def test_engine_config_mapping(monkeypatch):
    monkeypatch.delenv("TESSERA_CPU_KVCACHE_SPACE", raising=False)
    ns = parse_serve_args(
        [
            "/m",
            "--num-gpu-blocks-override",
            "64",
            "--swap-space",
            "1",
            "--block-size",
            "32",
            "--max-num-seqs",
            "4",
            "--rope-scaling",
            '{"type": "linear", "factor": 2}',
            "--seed",
            "7",
            "--served-model-name",
            "a",
            "b",
            "--kv-cache-space",
            "1.5",
            "--dtype",
            "float32",
            "--max-waiting-requests",
            "3",
            "--no-enable-prefix-caching",
            "--plugin",
            "mod",
            "--quantization",
            "None",
        ]
    )
    config = engine_config_from_args(ns)
    assert config.model.model == "/m" and config.model.seed == 7 and config.model.dtype == "float32"
    assert config.model.rope_scaling == {"type": "linear", "factor": 2}
    assert config.model.served_model_name == ("a", "b")
    assert config.model.quantization == "none"  # explicit None: no method, not even the GGUF default
    assert config.cache.num_blocks_override == 64 and config.cache.swap_space_gib == 1
    assert config.cache.block_size == 32 and config.cache.enable_prefix_caching is False
    assert config.cache.kv_cache_space_gib == 1.5
    assert config.scheduler.max_num_seqs == 4 and config.scheduler.max_waiting_requests == 3
    # not given: None, the device platform's default (EngineCore resolves it)
    assert config.scheduler.max_num_batched_tokens is None and config.scheduler.enable_chunked_prefill
    assert config.plugin_modules == ("mod",)


def test_kv_cache_space_from_env_unless_given(monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_KVCACHE_SPACE", "3")
    assert engine_config_from_args(parse_serve_args([])).cache.kv_cache_space_gib == 3
    assert (
        engine_config_from_args(
            parse_serve_args(["--kv-cache-space", "2"])
        ).cache.kv_cache_space_gib
        == 2
    )


def test_batched_tokens_without_chunked_prefill():
    ns = parse_serve_args(["--enable-chunked-prefill", "false", "--max-model-len", "4096"])
    assert engine_config_from_args(ns).scheduler.max_num_batched_tokens is None  # the engine makes it 4096
    ns = parse_serve_args(
        [
            "--enable-chunked-prefill",
            "false",
            "--max-model-len",
            "4096",
            "--max-num-batched-tokens",
            "1024",
        ]
    )
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        engine_config_from_args(ns)


# the CLI -------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.api.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_help_is_fast_and_lists_every_flag():
    code = (
        "import sys\nfrom tessera.api.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.rstrip().endswith("NO-TORCH")
    for flag in _spec_flags():
        assert flag in result.stdout, flag
    for group in (
        "HTTP server:",
        "model and tokenizer:",
        "KV cache and memory:",
        "LoRA and prompt adapters:",
    ):
        assert group in result.stdout


def test_cli_errors_exit_cleanly():
    result = _cli("serve", "--max-num-seqs", "0")
    assert result.returncode == 2
    assert "tessera serve: error: max_num_seqs=0 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("serve", "--enable-lora")
    assert result.returncode == 2
    assert "--enable-lora: LoRA adapters are not built yet" in result.stderr


def test_version_and_unknown_command():
    from tessera import __version__

    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tessera {__version__}"
    result = _cli("bogus")
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr


def test_plugins_command_lists_the_builtins():
    result = _cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert "cpu" in {p["plugin"] for p in listing["plugins"]}
    assert all(p["distribution"] for p in listing["plugins"])
