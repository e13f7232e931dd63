"""The `tessera serve` argument groups: every `vllm serve` flag with vLLM's name, choices and default.

`tessera.api.args` builds the parser from these groups and owns what happens after parsing.
Importing this module must not import torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from tessera.core.config import BLOCK_SIZE_CHOICES, DTYPE_CHOICES, LOAD_FORMAT_CHOICES

# vLLM's names for the registry-backed flags. These flags take any name a plugin registers (so a
# third-party plugin adds a choice); the names below are what `vllm serve` lists.
QUANTIZATION_NAMES = tuple(
    "aqlm awq deepspeedfp tpu_int8 fp8 fbgemm_fp8 modelopt marlin gguf "
    "gptq_marlin_24 gptq_marlin awq_marlin gptq compressed-tensors bitsandbytes qqq experts_int8 neuron_quant None".split()
)
TOOL_PARSER_NAMES = ("mistral", "hermes")
GUIDED_BACKEND_NAMES = ("outlines", "lm-format-enforcer")
DEVICE_NAMES = ("auto", "cuda", "neuron", "cpu", "openvino", "tpu", "xpu", "rocm")


@dataclass(frozen=True)
class RegistryFlag:
    """A flag whose value names an implementation in one plugin registry."""

    kind: str  # registry kind, as in tessera.core.hookspecs.PLUGIN_KINDS
    vllm_names: tuple[str, ...]  # the choices `vllm serve` lists (shown in --help)
    builtin: tuple[str, ...] = ()  # values that need no plugin ("auto")


REGISTRY_FLAGS: dict[str, RegistryFlag] = {
    "--tool-call-parser": RegistryFlag("tool_parser", TOOL_PARSER_NAMES),
    "--guided-decoding-backend": RegistryFlag("guided_decoding_backend", GUIDED_BACKEND_NAMES, ("auto",)),
    "--quantization": RegistryFlag("quantization_method", QUANTIZATION_NAMES, ("None",)),
    "--speculative-model-quantization": RegistryFlag(
        "quantization_method", QUANTIZATION_NAMES, ("None",)
    ),
    "--device": RegistryFlag("platform", DEVICE_NAMES, ("auto",)),
    "--load-format": RegistryFlag("weight_loader", LOAD_FORMAT_CHOICES, ("auto",)),
}


# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None


json_value.__name__ = "JSON"  # argparse names the type in "invalid JSON value" errors


def json_list(text: str) -> list[Any]:
    value = json_value(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list such as '[\"*\"]', got {text!r}")
    return value


json_list.__name__ = "JSON list"


def json_object(text: str) -> dict[str, Any]:
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"key\": 1}}', got {text!r}"
        )
    return value


json_object.__name__ = "JSON object"


def bool_value(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


bool_value.__name__ = "boolean"


def key_value_ints(text: str) -> dict[str, int]:
    """'image=16,video=2' -> {'image': 16, 'video': 2} (--limit-mm-per-prompt)."""
    result: dict[str, int] = {}
    for item in text.split(","):
        key, sep, number = item.partition("=")
        if not sep or not key.strip() or not number.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected KEY=INT[,KEY=INT...], got {text!r}")
        result[key.strip()] = int(number)
    return result


key_value_ints.__name__ = "KEY=INT list"


class HelpFormatter(argparse.HelpFormatter):
    """Wide columns; shows a default only where it says something (not None/False/[])."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=100)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        is_empty = (
            default is None or default is False or default == [] or default is argparse.SUPPRESS
        )
        if "%(default)" not in help_text and not is_empty and action.option_strings:
            help_text += " (default: %(default)s)"
        return help_text


def _registry_help(flag: str, what: str) -> str:
    spec = REGISTRY_FLAGS[flag]
    names = ", ".join(spec.vllm_names)
    return f"{what} Any name a plugin registers ({spec.kind}; see `tessera plugins`); vLLM lists: {names}."


def add_argument_groups(parser: argparse.ArgumentParser) -> None:
    """Add every flag of `tessera serve`, grouped as `--help` shows them."""
    _add_tessera_args(parser)
    _add_server_args(parser)
    _add_model_args(parser)
    _add_load_args(parser)
    _add_cache_args(parser)
    _add_scheduler_args(parser)
    _add_parallel_args(parser)
    _add_lora_args(parser)
    _add_speculative_args(parser)
    _add_logging_args(parser)


def _add_tessera_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tessera")
    group.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="Read flags from a YAML file (long flag names, dashes or underscores). "
        "Precedence: command line > config file > defaults.",
    )
    group.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="Import MODULE as a plugin (an unpackaged module implementing tessera hooks); repeatable.",
    )
    group.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="Bound of the waiting queue; beyond it requests get HTTP 429.",
    )
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="Allow requests to pass their own `chat_template` (rendered in a sandbox).",
    )
    group.add_argument(
        "--kv-cache-space",
        type=float,
        default=None,
        metavar="GIB",
        help="KV cache budget on CPU in GiB (else $TESSERA_CPU_KVCACHE_SPACE, else 0.5 GiB or one full-length sequence if more, at most a quarter of free RAM).",
    )


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535)")
    return port


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP server")
    group.add_argument(
        "--host", default=None, help="Host name to listen on (default: all interfaces)."
    )
    group.add_argument("--port", type=port_number, default=8000, help="Port number (0: any free port).")
    group.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical", "trace"],
        help="Uvicorn log level.",
    )
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials.")
    group.add_argument(
        "--allowed-origins",
        type=json_list,
        default=["*"],
        help="CORS: allowed origins (JSON list).",
    )
    group.add_argument(
        "--allowed-methods",
        type=json_list,
        default=["*"],
        help="CORS: allowed methods (JSON list).",
    )
    group.add_argument(
        "--allowed-headers",
        type=json_list,
        default=["*"],
        help="CORS: allowed headers (JSON list).",
    )
    group.add_argument(
        "--api-key",
        default=None,
        help="If given, requests must send it as `Authorization: Bearer KEY` (also $TESSERA_API_KEY / $VLLM_API_KEY).",
    )
    group.add_argument(
        "--chat-template", default=None, help="Chat template: a file path or the template inline."
    )
    group.add_argument(
        "--response-role",
        default="assistant",
        help="Role name returned when the request sets add_generation_prompt=true.",
    )
    group.add_argument("--ssl-keyfile", default=None, help="SSL key file.")
    group.add_argument("--ssl-certfile", default=None, help="SSL certificate file.")
    group.add_argument("--ssl-ca-certs", default=None, help="CA certificates file.")
    group.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=0,
        help="Whether a client certificate is required (see the stdlib ssl module).",
    )
    group.add_argument(
        "--root-path", default=None, help="FastAPI root_path behind a path-based proxy."
    )
    group.add_argument(
        "--middleware",
        action="append",
        default=[],
        help="Import path of an extra ASGI middleware (class: app.add_middleware; function: "
        "@app.middleware('http')); repeatable.",
    )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="With logprobs, represent tokens as 'token_id:{id}' strings.",
    )
    group.add_argument(
        "--disable-frontend-multiprocessing",
        action="store_true",
        help="Run the engine in the server's process instead of its own.",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="Model name(s) in the API; the first is reported in responses. Default: the model path.",
    )
    group = parser.add_argument_group("tool calling")
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="Let the model call tools on its own (tool_choice=auto); needs --tool-call-parser.",
    )
    group.add_argument(
        "--tool-call-parser",
        default=None,
        metavar="NAME",
        help=_registry_help("--tool-call-parser", "Parser turning model text into tool_calls."),
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and tokenizer")
    group.add_argument(
        "--model", default=None, help="Model to serve (same as the positional MODEL)."
    )
    group.add_argument(
        "--tokenizer", default=None, help="Tokenizer name or path (default: the model's)."
    )
    group.add_argument(
        "--skip-tokenizer-init", action="store_true", help="Skip tokenizer initialization."
    )
    group.add_argument(
        "--revision",
        default=None,
        help="Model revision (branch, tag or commit) to pick from the local Hugging Face cache.",
    )
    group.add_argument(
        "--code-revision", default=None, help="Revision of the model code on the hub."
    )
    group.add_argument("--tokenizer-revision", default=None, help="Tokenizer revision.")
    group.add_argument(
        "--tokenizer-mode",
        default="auto",
        choices=["auto", "slow", "mistral"],
        help="Tokenizer mode: auto (the model's Hugging Face tokenizer and chat template) or mistral "
        "(the model folder's mistral-common tokenizer file, tekken.json or tokenizer.model.vN, which "
        "also encodes chat requests; no --chat-template).",
    )
    group.add_argument(
        "--trust-remote-code", action="store_true", help="Trust remote code from Hugging Face."
    )
    group.add_argument(
        "--config-format",
        default="auto",
        choices=["auto", "hf", "mistral"],
        help="Format of the model config.",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPE_CHOICES),
        help="Weights and activations dtype.",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="Context length (default: from the model config).",
    )
    group.add_argument("--seed", type=int, default=0, help="Random seed.")
    group.add_argument(
        "--max-logprobs", type=int, default=20, help="Largest logprobs a request may ask for."
    )
    group.add_argument(
        "--rope-scaling",
        type=json_object,
        default=None,
        help='RoPE scaling as JSON, e.g. {"type":"dynamic","factor":2.0}.',
    )
    group.add_argument(
        "--rope-theta", type=float, default=None, help="RoPE theta (with --rope-scaling)."
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        help="Run the model eagerly: skip torch.compile at start-up (faster start, slower steps).",
    )
    group.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help=_registry_help(
            "--device", "Device platform; auto picks the best available (CPU is always available)."
        ),
    )
    group.add_argument(
        "--limit-mm-per-prompt",
        type=key_value_ints,
        default=None,
        help="Multimodal inputs per prompt, e.g. image=16,video=2.",
    )


def _add_load_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weights loading and quantization")
    group.add_argument(
        "--download-dir", default=None, help="Directory to download and load weights from."
    )
    group.add_argument(
        "--load-format",
        default="auto",
        choices=list(LOAD_FORMAT_CHOICES),
        help="Format of the weights; each needs a registered weight_loader plugin (auto picks one).",
    )
    group.add_argument(
        "--model-loader-extra-config",
        type=json_object,
        default=None,
        help="Extra loader config (JSON object).",
    )
    group.add_argument(
        "--ignore-patterns", action="append", default=[], help="Weight-file patterns to ignore."
    )
    group.add_argument(
        "-q",
        "--quantization",
        default=None,
        metavar="METHOD",
        help=_registry_help(
            "--quantization", "Weight quantization method (default: from the checkpoint)."
        ),
    )
    group.add_argument(
        "--quantization-param-path", default=None, help="JSON file of KV cache scaling factors."
    )
    group.add_argument(
        "--cpu-offload-gb", type=float, default=0, help="GiB of weights to offload to CPU memory."
    )
    group.add_argument(
        "--max-parallel-loading-workers",
        type=int,
        default=None,
        help="Load the model sequentially in this many batches.",
    )


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV cache and memory")
    group.add_argument(
        "--block-size",
        type=int,
        default=16,
        choices=list(BLOCK_SIZE_CHOICES),
        help="Tokens per KV cache block.",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Automatic prefix caching. ON by default in tessera (vLLM's default is off).",
    )
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e5m2", "fp8_e4m3"],
        help="KV cache dtype.",
    )
    group.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="Use exactly this many KV cache blocks (any device), ignoring the memory budget.",
    )
    group.add_argument(
        "--swap-space",
        type=float,
        default=4,
        help="CPU swap space per device in GiB (only used by swap preemption).",
    )
    group.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="Fraction of GPU memory to use."
    )
    group.add_argument(
        "--disable-sliding-window",
        action="store_true",
        help="Cap the context at the sliding window.",
    )
    group.add_argument(
        "--use-v2-block-manager",
        action="store_true",
        help="Accepted for compatibility: tessera has one block manager (paged, prefix-caching), "
        "which is what this asks for.",
    )
    group.add_argument(
        "--max-context-len-to-capture",
        type=int,
        default=None,
        help="Deprecated: use --max-seq-len-to-capture.",
    )
    group.add_argument(
        "--max-seq-len-to-capture",
        type=int,
        default=8192,
        help="Longest sequence covered by CUDA graphs.",
    )


def _add_scheduler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scheduler")
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="Tokens per step (default: the device platform's, 512 on CPUs and 2048 elsewhere; without "
        "chunked prefill at least --max-model-len).",
    )
    group.add_argument("--max-num-seqs", type=int, default=256, help="Sequences per step.")
    group.add_argument(
        "--enable-chunked-prefill",
        type=bool_value,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="Split long prefills across steps within --max-num-batched-tokens (default in tessera: on).",
    )
    group.add_argument(
        "--preemption-mode",
        default=None,
        help="How to preempt when blocks run out: 'recompute' (default) or 'swap'.",
    )
    group.add_argument(
        "--num-scheduler-steps", type=int, default=1, help="Forward steps per scheduler call."
    )
    group.add_argument(
        "--scheduler-delay-factor",
        type=float,
        default=0.0,
        help="Delay before scheduling the next prompt.",
    )
    group.add_argument(
        "--disable-async-output-proc", action="store_true", help="Disable async output processing."
    )
    group.add_argument(
        "--tokenizer-pool-size",
        type=int,
        default=0,
        help="Size of the async tokenizer pool (0: synchronous).",
    )
    group.add_argument(
        "--tokenizer-pool-type", default="ray", help="Type of the async tokenizer pool."
    )
    group.add_argument(
        "--tokenizer-pool-extra-config",
        type=json_object,
        default=None,
        help="Tokenizer pool config (JSON).",
    )
    group.add_argument(
        "--guided-decoding-backend",
        default="auto",
        metavar="NAME",
        help=_registry_help(
            "--guided-decoding-backend",
            "Default guided-decoding backend (requests may choose another). tessera's default is "
            "'auto': the fastest installed backend that can express the constraint (vLLM: outlines).",
        ),
    )


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument(
        "--distributed-executor-backend",
        default=None,
        choices=["ray", "mp"],
        help="Executor for several devices.",
    )
    group.add_argument(
        "--worker-use-ray",
        action="store_true",
        help="Deprecated: use --distributed-executor-backend=ray.",
    )
    group.add_argument(
        "-pp", "--pipeline-parallel-size", type=int, default=1, help="Pipeline stages."
    )
    group.add_argument(
        "-tp", "--tensor-parallel-size", type=int, default=1, help="Tensor-parallel replicas."
    )
    group.add_argument(
        "--ray-workers-use-nsight", action="store_true", help="Profile Ray workers with Nsight."
    )
    group.add_argument(
        "--disable-custom-all-reduce", action="store_true", help="Use NCCL all-reduce only."
    )
    group.add_argument(
        "--override-neuron-config",
        type=json_object,
        default=None,
        help="Neuron device config (JSON).",
    )


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA and prompt adapters")
    group.add_argument("--enable-lora", action="store_true", help="Serve LoRA adapters.")
    group.add_argument(
        "--lora-modules", nargs="+", default=None, help="LoRA adapters as name=path."
    )
    group.add_argument("--max-loras", type=int, default=1, help="LoRAs in one batch.")
    group.add_argument("--max-lora-rank", type=int, default=16, help="Largest LoRA rank.")
    group.add_argument(
        "--lora-extra-vocab-size", type=int, default=256, help="Extra vocabulary a LoRA may add."
    )
    group.add_argument(
        "--lora-dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="LoRA dtype.",
    )
    group.add_argument(
        "--long-lora-scaling-factors", default=None, help="Scaling factors of long LoRAs."
    )
    group.add_argument("--max-cpu-loras", type=int, default=None, help="LoRAs kept in CPU memory.")
    group.add_argument(
        "--fully-sharded-loras", action="store_true", help="Fully shard LoRA layers."
    )
    group.add_argument(
        "--qlora-adapter-name-or-path", default=None, help="QLoRA adapter name or path."
    )
    group.add_argument(
        "--enable-prompt-adapter", action="store_true", help="Serve prompt adapters."
    )
    group.add_argument(
        "--prompt-adapters", nargs="+", default=None, help="Prompt adapters as name=path."
    )
    group.add_argument(
        "--max-prompt-adapters", type=int, default=1, help="Prompt adapters in one batch."
    )
    group.add_argument(
        "--max-prompt-adapter-token",
        type=int,
        default=0,
        help="Largest prompt adapter token count.",
    )


def _add_speculative_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument("--speculative-model", default=None, help="Draft model.")
    group.add_argument(
        "--speculative-model-quantization",
        default=None,
        metavar="METHOD",
        help=_registry_help("--speculative-model-quantization", "Quantization of the draft model."),
    )
    group.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="Tokens drafted per step."
    )
    group.add_argument(
        "-spec-draft-tp",
        "--speculative-draft-tensor-parallel-size",
        type=int,
        default=None,
        help="Tensor-parallel replicas of the draft model.",
    )
    group.add_argument(
        "--speculative-max-model-len",
        type=int,
        default=None,
        help="Longest sequence the draft model serves.",
    )
    group.add_argument(
        "--speculative-disable-by-batch-size",
        type=int,
        default=None,
        help="Disable speculation above this queue size.",
    )
    group.add_argument(
        "--ngram-prompt-lookup-max",
        type=int,
        default=None,
        help="Largest n-gram prompt-lookup window.",
    )
    group.add_argument(
        "--ngram-prompt-lookup-min",
        type=int,
        default=None,
        help="Smallest n-gram prompt-lookup window.",
    )
    group.add_argument(
        "--spec-decoding-acceptance-method",
        default="rejection_sampler",
        choices=["rejection_sampler", "typical_acceptance_sampler"],
        help="Draft acceptance method.",
    )
    group.add_argument(
        "--typical-acceptance-sampler-posterior-threshold",
        type=float,
        default=None,
        help="Typical acceptance: posterior threshold.",
    )
    group.add_argument(
        "--typical-acceptance-sampler-posterior-alpha",
        type=float,
        default=None,
        help="Typical acceptance: entropy scale.",
    )
    group.add_argument(
        "--disable-logprobs-during-spec-decoding",
        type=bool_value,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="Skip logprobs during speculative decoding.",
    )
    group.add_argument(
        "--num-lookahead-slots",
        type=int,
        default=0,
        help="Lookahead slots for speculative decoding.",
    )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging and tracing")
    group.add_argument(
        "--disable-log-stats", action="store_true", help="Do not log the periodic engine statistics line."
    )
    group.add_argument("--disable-log-requests", action="store_true", help="Do not log requests.")
    group.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="Prompt characters / ids printed in logs (default: unlimited).",
    )
    group.add_argument(
        "--otlp-traces-endpoint", default=None, help="OpenTelemetry traces endpoint URL."
    )
    group.add_argument(
        "--collect-detailed-traces", default=None, help="Detailed traces of: model, worker, all."
    )


def long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """'--flag-name' -> its action, for every long option of the parser."""
    return {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
