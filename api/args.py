"""The `tessera serve` command line: the parser, `--config` YAML, the unsupported-flag table, EngineConfig.

Every flag of `vllm serve` is accepted with vLLM's name, choices and default (the flags are
defined in `tessera.api.serve_flags`; docs/cli.md lists the few deliberate differences). A flag
whose feature is not built is rejected by the UNSUPPORTED table below, never accepted and
ignored. Importing this module must not import torch: `tessera serve --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tessera.api.config_file import read_config_file
from tessera.api.serve_flags import (
    REGISTRY_FLAGS,
    HelpFormatter,
    RegistryFlag,
    add_argument_groups,
    long_options,
)
from tessera.core.config import (
    CacheConfig,
    DecodingConfig,
    DeviceConfig,
    EngineConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    cpu_kvcache_space_gib_from_env,
)
from tessera.core.errors import ConfigError, NotImplementedFeatureError

if TYPE_CHECKING:
    from tessera.core.plugins import PluginSet

__all__ = [
    "REGISTRY_FLAGS",
    "UNSUPPORTED",
    "RegistryFlag",
    "Unsupported",
    "build_parser",
    "check_supported",
    "engine_config_from_args",
    "long_options",
    "parse_serve_args",
]

# --------------------------------------------------------------------------------------------
# The unsupported-flag table. A flag listed here exits with a clear message when given a value
# that `when` calls unsupported; its default is always accepted. When you build a feature, delete
# its rows (and add tests for the feature). `when` defaults to "any value other than the default".
# --------------------------------------------------------------------------------------------


def _any(_: Any) -> bool:
    return True


@dataclass(frozen=True)
class Unsupported:
    flag: str
    reason: str
    when: Callable[[Any], bool] = _any


_LORA = "LoRA adapters are not built yet"
_PROMPT_ADAPTER = "prompt adapters are not built yet"
_SPEC = "speculative decoding is not built yet"
_PARALLEL = "only one device per engine is built so far (uniproc executor)"
_CUDA_GRAPHS = "CUDA graphs are not built (no GPU platform yet)"
_POOL = "asynchronous tokenizer pools are not built; tokenization is synchronous"
_TRACING = "OpenTelemetry tracing is not built yet"

# fmt: off
UNSUPPORTED: tuple[Unsupported, ...] = (
    # model and tokenizer
    Unsupported("--tokenizer", "a tokenizer other than the model's own is not built"),
    Unsupported("--trust-remote-code", "running a model's own Python code from its repository is not built"),
    Unsupported("--skip-tokenizer-init", "running without a tokenizer (token-id prompts only) is not built"),
    Unsupported("--code-revision", "remote model code revisions are not built"),
    Unsupported("--tokenizer-revision", "models load from a local path or the local Hugging Face cache; selecting a tokenizer revision is not built"),
    Unsupported("--tokenizer-mode", "slow (Python) tokenizers are not built; use auto or mistral", lambda v: v == "slow"),
    Unsupported("--config-format", "only Hugging Face configs are read; 'mistral' is not built", lambda v: v == "mistral"),
    Unsupported("--download-dir", "weights are never downloaded; pass a local path or use the Hugging Face cache (HF_HOME)"),
    Unsupported("--limit-mm-per-prompt", "multimodal inputs are not built yet"),
    # weights and quantization
    Unsupported("--model-loader-extra-config", "no built weight loader takes extra configuration"),
    Unsupported("--ignore-patterns", "weight-file ignore patterns are not built", lambda v: bool(v)),
    Unsupported("--quantization-param-path", "KV-cache scaling factors need an fp8 KV cache, which is not built"),
    Unsupported("--kv-cache-dtype", "only 'auto' (the model dtype) is built", lambda v: v != "auto"),
    Unsupported("--cpu-offload-gb", "weight offloading to CPU memory is not built", lambda v: v > 0),
    # memory and CUDA graphs (no GPU platform yet)
    Unsupported("--gpu-memory-utilization", "no GPU platform is built; on CPU size the KV cache with --kv-cache-space"),
    Unsupported("--max-context-len-to-capture", _CUDA_GRAPHS),
    Unsupported("--max-seq-len-to-capture", _CUDA_GRAPHS),
    Unsupported("--disable-sliding-window", "capping the context at the sliding window is not built"),
    # scheduler
    Unsupported("--num-scheduler-steps", "multi-step scheduling is not built", lambda v: v > 1),
    Unsupported("--scheduler-delay-factor", "delayed prompt scheduling is not built", lambda v: v > 0),
    Unsupported("--disable-async-output-proc", "output processing is not configurable in tessera"),
    # parallelism
    Unsupported("--tensor-parallel-size", _PARALLEL, lambda v: v > 1),
    Unsupported("--pipeline-parallel-size", _PARALLEL, lambda v: v > 1),
    Unsupported("--distributed-executor-backend", _PARALLEL),
    Unsupported("--worker-use-ray", _PARALLEL),
    Unsupported("--max-parallel-loading-workers", _PARALLEL),
    Unsupported("--ray-workers-use-nsight", _PARALLEL),
    Unsupported("--disable-custom-all-reduce", "there is no custom all-reduce to disable (one device per engine)"),
    Unsupported("--override-neuron-config", "the Neuron platform is not built"),
    # tokenizer pool
    Unsupported("--tokenizer-pool-size", _POOL, lambda v: v > 0),
    Unsupported("--tokenizer-pool-type", _POOL),
    Unsupported("--tokenizer-pool-extra-config", _POOL),
    # LoRA and prompt adapters
    Unsupported("--enable-lora", _LORA),
    Unsupported("--lora-modules", _LORA),
    Unsupported("--max-loras", _LORA),
    Unsupported("--max-lora-rank", _LORA),
    Unsupported("--lora-extra-vocab-size", _LORA),
    Unsupported("--lora-dtype", _LORA),
    Unsupported("--long-lora-scaling-factors", _LORA),
    Unsupported("--max-cpu-loras", _LORA),
    Unsupported("--fully-sharded-loras", _LORA),
    Unsupported("--qlora-adapter-name-or-path", _LORA),
    Unsupported("--enable-prompt-adapter", _PROMPT_ADAPTER),
    Unsupported("--prompt-adapters", _PROMPT_ADAPTER),
    Unsupported("--max-prompt-adapters", _PROMPT_ADAPTER),
    Unsupported("--max-prompt-adapter-token", _PROMPT_ADAPTER),
    # speculative decoding
    Unsupported("--speculative-model", _SPEC),
    Unsupported("--speculative-model-quantization", _SPEC),
    Unsupported("--num-speculative-tokens", _SPEC),
    Unsupported("--speculative-draft-tensor-parallel-size", _SPEC),
    Unsupported("--speculative-max-model-len", _SPEC),
    Unsupported("--speculative-disable-by-batch-size", _SPEC),
    Unsupported("--ngram-prompt-lookup-max", _SPEC),
    Unsupported("--ngram-prompt-lookup-min", _SPEC),
    Unsupported("--spec-decoding-acceptance-method", _SPEC),
    Unsupported("--typical-acceptance-sampler-posterior-threshold", _SPEC),
    Unsupported("--typical-acceptance-sampler-posterior-alpha", _SPEC),
    Unsupported("--disable-logprobs-during-spec-decoding", _SPEC),
    Unsupported("--num-lookahead-slots", _SPEC, lambda v: v > 0),
    # tracing
    Unsupported("--otlp-traces-endpoint", _TRACING),
    Unsupported("--collect-detailed-traces", _TRACING),
)
# fmt: on


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def build_parser(prog: str = "tessera serve") -> argparse.ArgumentParser:
    """The parser of `tessera serve`: every `vllm serve` flag plus tessera's own."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [MODEL] [flags]",
        description="Serve a model over an OpenAI-compatible HTTP API.",
        epilog=(
            "Differences from `vllm serve`: the default model is the embedded SmolLM2-135M-Instruct; "
            "prefix caching is on by default (--no-enable-prefix-caching turns it off); flags whose "
            "feature is not built exit with an error instead of being ignored. See docs/cli.md."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Model to serve: a local path, a GGUF file or a Hugging Face name found in the local "
        "cache (same as --model). Default: the embedded SmolLM2-135M-Instruct.",
    )
    add_argument_groups(parser)
    options = long_options(parser)
    for row in UNSUPPORTED:  # --help says what is not built, as the error would
        action = options[row.flag]
        only = "; only the default is accepted" if row.when is _any else ""
        action.help = f"{action.help} [not built: {row.reason}{only}]"
    return parser


# --------------------------------------------------------------------------------------------
# Parsing with --config
# --------------------------------------------------------------------------------------------


def parse_serve_args(
    argv: Sequence[str] | None = None, prog: str = "tessera serve"
) -> argparse.Namespace:
    """Parse `tessera serve` arguments; values from `--config` fill what the command line omits.

    Exits (argparse's usual exit code 2, message naming the flag) on an unknown flag, a bad
    choice or value, or an invalid config file.
    """
    parser = build_parser(prog)
    argv = list(argv) if argv is not None else None
    ns = parser.parse_args(argv)
    if ns.config is not None:
        from_file = read_config_file(parser, ns.config)
        given = _dests_given(parser, argv)
        if "model_tag" in given:  # the positional MODEL is the command line's --model
            given.add("model")
        for dest, value in from_file.items():
            if dest not in given:
                setattr(ns, dest, value)
    if ns.model_tag is not None:
        if ns.model is not None and ns.model != ns.model_tag:
            parser.error(
                f"the model is given twice: MODEL {ns.model_tag!r} and --model {ns.model!r}"
            )
        ns.model = ns.model_tag
    return ns


def _dests_given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests the command line sets explicitly (defaults suppressed)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


# --------------------------------------------------------------------------------------------
# Checks after parsing, and the EngineConfig
# --------------------------------------------------------------------------------------------


def check_supported(ns: argparse.Namespace, plugins: PluginSet | None = None) -> None:
    """Raise NotImplementedFeatureError naming the first flag set to a value tessera cannot honour.

    With `plugins`, registry-backed flags (--device, --quantization, --tool-call-parser, ...) must
    name a registered implementation.
    """
    parser = build_parser()
    options = long_options(parser)
    for row in UNSUPPORTED:
        action = options[row.flag]
        value = getattr(ns, action.dest)
        default = parser.get_default(action.dest)
        if value != default and row.when(value):
            given = row.flag if isinstance(value, bool) else f"{row.flag} {_show(value)}"
            fix = (
                "remove the flag"
                if default in (None, False, [])
                else f"use the default ({_show(default)})"
            )
            raise NotImplementedFeatureError(f"{given}: {row.reason}; {fix}.", param=row.flag)
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ConfigError(
            "--enable-auto-tool-choice needs --tool-call-parser NAME", param="--tool-call-parser"
        )
    if ns.tokenizer_mode == "mistral":
        from tessera.api.chat_template import check_no_chat_template

        check_no_chat_template(ns.chat_template)
    if plugins is not None:
        for flag, spec in REGISTRY_FLAGS.items():
            value = getattr(ns, options[flag].dest)
            if (
                value is None
                or value == parser.get_default(options[flag].dest)
                or value in spec.builtin
            ):
                continue
            registry = plugins.registry(spec.kind)
            if value not in registry:
                known = ", ".join(registry.names()) or "none"
                raise NotImplementedFeatureError(
                    f"{flag} {value}: no installed plugin provides the {spec.kind} {value!r} "
                    f"(registered: {known}). Install or enable a plugin that registers it "
                    f"(see `tessera plugins`).",
                    param=flag,
                )


def _show(value: Any) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def engine_config_from_args(ns: argparse.Namespace) -> EngineConfig:
    """Map parsed flags onto the config dataclasses; raises ConfigError naming a bad value."""
    enable_chunked_prefill = (
        True if ns.enable_chunked_prefill is None else ns.enable_chunked_prefill
    )
    # None: the device platform's default, which the engine raises to max_model_len when
    # chunked prefill is off (a whole prompt must fit in one step)
    max_num_batched_tokens = ns.max_num_batched_tokens
    # An explicit `--quantization None` is "none": no method, not even a loader's default.
    quantization = "none" if ns.quantization == "None" else ns.quantization
    kv_cache_space = (
        ns.kv_cache_space if ns.kv_cache_space is not None else cpu_kvcache_space_gib_from_env()
    )
    scheduler_kwargs: dict[str, Any] = {}
    if ns.max_model_len is not None:
        scheduler_kwargs["max_model_len"] = ns.max_model_len
    return EngineConfig(
        model=ModelConfig(
            model=ns.model,
            tokenizer=ns.tokenizer,
            tokenizer_mode=ns.tokenizer_mode,
            skip_tokenizer_init=ns.skip_tokenizer_init,
            trust_remote_code=ns.trust_remote_code,
            dtype=ns.dtype,
            seed=ns.seed,
            max_model_len=ns.max_model_len,
            rope_scaling=ns.rope_scaling,
            rope_theta=ns.rope_theta,
            enforce_eager=ns.enforce_eager,
            quantization=quantization,
            served_model_name=tuple(ns.served_model_name or ()),
            max_logprobs=ns.max_logprobs,
            revision=ns.revision,
            tokenizer_revision=ns.tokenizer_revision,
            code_revision=ns.code_revision,
            config_format=ns.config_format,
        ),
        load=LoadConfig(
            load_format=ns.load_format,
            download_dir=ns.download_dir,
            ignore_patterns=tuple(ns.ignore_patterns),
            model_loader_extra_config=dict(ns.model_loader_extra_config or {}),
        ),
        cache=CacheConfig(
            block_size=ns.block_size,
            enable_prefix_caching=ns.enable_prefix_caching,
            num_blocks_override=ns.num_gpu_blocks_override,
            kv_cache_space_gib=kv_cache_space,
            swap_space_gib=ns.swap_space,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            kv_cache_dtype=ns.kv_cache_dtype,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=ns.max_num_seqs,
            enable_chunked_prefill=enable_chunked_prefill,
            preemption_mode=ns.preemption_mode or "recompute",
            max_waiting_requests=ns.max_waiting_requests,
            **scheduler_kwargs,
        ),
        parallel=ParallelConfig(
            tensor_parallel_size=ns.tensor_parallel_size,
            pipeline_parallel_size=ns.pipeline_parallel_size,
            distributed_executor_backend=ns.distributed_executor_backend,
        ),
        device=DeviceConfig(device=ns.device),
        decoding=DecodingConfig(guided_decoding_backend=ns.guided_decoding_backend),
        plugin_modules=tuple(ns.plugin),
    )
