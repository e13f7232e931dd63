"""Engine configuration: frozen dataclasses, validated on construction; the only reader of env vars."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.core.errors import ConfigError

DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOAD_FORMAT_CHOICES = (
    "auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "sharded_state", "gguf",
    "bitsandbytes", "mistral",
)
BLOCK_SIZE_CHOICES = (8, 16, 32)

# Environment variables (documented in docs/server.md).
ENV_PLUGINS = "TESSERA_PLUGINS"
ENV_DISABLE_PLUGINS = "TESSERA_DISABLE_PLUGINS"
ENV_CPU_KVCACHE_SPACE = "TESSERA_CPU_KVCACHE_SPACE"  # GiB for the KV cache on CPU
ENV_API_KEY = "TESSERA_API_KEY"  # VLLM_API_KEY is honoured too
ENV_HF_HOME = "HF_HOME"
ENV_HF_HUB_CACHE = "HF_HUB_CACHE"


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}", param=field_name)


def plugin_env() -> tuple[str | None, str | None]:
    """(allow-list, deny-list) of plugin names from the environment."""
    return os.environ.get(ENV_PLUGINS), os.environ.get(ENV_DISABLE_PLUGINS)


def api_key_from_env() -> str | None:
    return os.environ.get(ENV_API_KEY) or os.environ.get("VLLM_API_KEY")


def cpu_kvcache_space_gib_from_env() -> float | None:
    value = os.environ.get(ENV_CPU_KVCACHE_SPACE)
    if value is None or value == "":
        return None
    try:
        gib = float(value)
    except ValueError:
        raise ConfigError(f"{ENV_CPU_KVCACHE_SPACE}={value!r} is not a number of GiB") from None
    if gib <= 0:
        _fail(ENV_CPU_KVCACHE_SPACE, value, "must be > 0 GiB")
    return gib


def hf_cache_dirs() -> list[str]:
    """Directories that may hold a local Hugging Face hub cache, most specific first."""
    dirs = []
    if os.environ.get(ENV_HF_HUB_CACHE):
        dirs.append(os.environ[ENV_HF_HUB_CACHE])
    hf_home = os.environ.get(ENV_HF_HOME, os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    dirs.append(os.path.join(hf_home, "hub"))
    return dirs


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None
    tokenizer_mode: Literal["auto", "slow", "mistral"] = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_theta: float | None = None
    enforce_eager: bool = False
    quantization: str | None = None
    served_model_name: tuple[str, ...] = ()
    max_logprobs: int = 20
    revision: str | None = None
    tokenizer_revision: str | None = None
    code_revision: str | None = None
    config_format: Literal["auto", "hf", "mistral"] = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            _fail("dtype", self.dtype, f"choose one of {', '.join(DTYPE_CHOICES)}")
        if self.tokenizer_mode not in ("auto", "slow", "mistral"):
            _fail("tokenizer_mode", self.tokenizer_mode, "choose auto, slow or mistral")
        if self.max_model_len is not None and self.max_model_len < 1:
            _fail("max_model_len", self.max_model_len, "must be >= 1")
        if self.max_logprobs < 0:
            _fail("max_logprobs", self.max_logprobs, "must be >= 0")
        if self.rope_theta is not None and self.rope_theta <= 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"
    download_dir: str | None = None
    ignore_patterns: tuple[str, ...] = ()
    model_loader_extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMAT_CHOICES:
            _fail("load_format", self.load_format, f"choose one of {', '.join(LOAD_FORMAT_CHOICES)}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # --num-gpu-blocks-override
    kv_cache_space_gib: float | None = None  # CPU budget; None: env var, else the default below
    # with no budget: this fraction of available RAM, capped at kv_cache_default_max_gib or at
    # what one sequence of the model's full length needs, whichever is more. 0.5 GiB holds 23k
    # tokens of SmolLM2 in bf16 (32 requests of 700 tokens) and keeps the default server small;
    # the prefix cache fills whatever the budget is, so the budget is what the server's RSS grows to.
    kv_cache_memory_fraction: float = 0.25
    kv_cache_default_max_gib: float = 0.5
    swap_space_gib: float = 4.0
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZE_CHOICES:
            _fail("block_size", self.block_size, "choose 8, 16 or 32")
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            _fail("num_gpu_blocks_override", self.num_blocks_override, "must be >= 1")
        if self.swap_space_gib < 0:
            _fail("swap_space", self.swap_space_gib, "must be >= 0 GiB")
        if not 0 < self.gpu_memory_utilization <= 1:
            _fail("gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        if self.kv_cache_space_gib is not None and self.kv_cache_space_gib <= 0:
            _fail("kv_cache_space_gib", self.kv_cache_space_gib, "must be > 0")
        if self.kv_cache_dtype != "auto":
            _fail("kv_cache_dtype", self.kv_cache_dtype, "only 'auto' (the model dtype) is built")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int | None = None  # None: the device platform's default
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's, filled in by the engine
    enable_chunked_prefill: bool = True
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    max_waiting_requests: int = 1024  # bound of the waiting queue; beyond it requests get 429

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            _fail("max_num_batched_tokens", self.max_num_batched_tokens, "must be >= 1")
        if self.max_num_seqs < 1:
            _fail("max_num_seqs", self.max_num_seqs, "must be >= 1")
        if self.preemption_mode not in ("recompute", "swap"):
            _fail("preemption_mode", self.preemption_mode, "choose recompute or swap")
        if self.max_waiting_requests < 1:
            _fail("max_waiting_requests", self.max_waiting_requests, "must be >= 1")
        budget = self.max_num_batched_tokens
        max_len = self.max_model_len
        if not self.enable_chunked_prefill and budget is not None and max_len is not None and budget < max_len:
            _fail(
                "max_num_batched_tokens", self.max_num_batched_tokens,
                f"without chunked prefill it must be >= max_model_len ({self.max_model_len})",
            )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            _fail("tensor_parallel_size", self.tensor_parallel_size, "only 1 is built so far")
        if self.pipeline_parallel_size != 1:
            _fail("pipeline_parallel_size", self.pipeline_parallel_size, "only 1 is built so far")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"


@dataclass(frozen=True)
class DecodingConfig:
    # the server's default guided-decoding backend; "auto" = the fastest that can express the
    # constraint. A request's guided_decoding_backend overrides it.
    guided_decoding_backend: str = "auto"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; each component receives only its own part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    plugin_modules: tuple[str, ...] = ()  # --plugin: extra modules to load in every process


_SECTIONS = {
    "model": ModelConfig,
    "load": LoadConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "device": DeviceConfig,
    "decoding": DecodingConfig,
}


def engine_config_from_kwargs(model: str | None = None, **kwargs: Any) -> EngineConfig:
    """Build an EngineConfig from flat keyword arguments named like the config fields
    (`dtype=`, `block_size=`, `max_num_seqs=`, ...); an unknown name is a ConfigError."""
    from dataclasses import fields

    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    sections["model"]["model"] = model
    plugin_modules = tuple(kwargs.pop("plugin_modules", ()))
    for key, value in kwargs.items():
        owner = next((s for s, cls in _SECTIONS.items() if key in {f.name for f in fields(cls)}), None)
        if owner is None:
            raise ConfigError(f"unknown engine option {key!r}", param=key)
        sections[owner][key] = value
    if "max_model_len" in sections["model"]:
        sections["scheduler"].setdefault("max_model_len", sections["model"]["max_model_len"])
    built = {name: _SECTIONS[name](**values) for name, values in sections.items()}
    return EngineConfig(**built, plugin_modules=plugin_modules)
