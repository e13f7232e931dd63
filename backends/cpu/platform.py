"""The CPU platform: always available; bfloat16 by default where the CPU has native bf16 support."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch

from tessera.core.config import CacheConfig, cpu_kvcache_space_gib_from_env
from tessera.core.errors import ConfigError
from tessera.core.interfaces.platform import Platform

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_NAMED_DTYPES = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}


def available_memory_bytes() -> int:
    """Memory the OS can still give this process (MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory is available (no psutil, no /proc/meminfo)")


class CpuPlatform(Platform):
    """Runs on the host CPU with torch's oneDNN/MKL kernels.

    dtype `auto` (measured on an AVX512-BF16 Xeon): a bfloat16 checkpoint runs in bfloat16 and a
    float32 checkpoint in float32, so `auto` never loses precision the checkpoint has. float16 runs
    in bfloat16 instead: CPUs without AVX512-FP16 emulate fp16 matmuls (several times slower than
    bf16) and bf16 has the wider range. An explicit `--dtype float16` is honoured but warned about.
    Quantized checkpoints (GGUF) report bfloat16 as their dtype: their dequantized weights carry
    less precision than bf16 keeps, and bf16 halves the memory traffic of decode.
    """

    name = "cpu"
    device_type = "cpu"
    priority = 0

    @classmethod
    def is_available(cls) -> bool:
        return True

    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def resolve_dtype(self, requested: str, model_dtype: Any) -> torch.dtype:
        if requested == "auto":
            if model_dtype in (torch.float16, "float16", "half"):
                return torch.bfloat16
            if model_dtype in (torch.bfloat16, "bfloat16"):
                return torch.bfloat16
            return torch.float32
        if requested not in _NAMED_DTYPES:
            raise ConfigError(f"dtype={requested!r} is invalid: choose auto, {', '.join(_NAMED_DTYPES)}", param="dtype")
        dtype = _NAMED_DTYPES[requested]
        if dtype == torch.float16:
            logger.warning("float16 on CPU is slow (emulated matmuls); bfloat16 is faster with the same memory")
        return dtype

    def kv_cache_memory_bytes(self, cache_config: CacheConfig) -> int:
        gib = cache_config.kv_cache_space_gib
        if gib is None:
            gib = cpu_kvcache_space_gib_from_env()
        if gib is not None:
            return int(gib * _GIB)
        fraction_of_free = available_memory_bytes() * cache_config.kv_cache_memory_fraction
        return int(min(fraction_of_free, cache_config.kv_cache_default_max_gib * _GIB))

    def release_host_memory(self) -> None:
        # Loading a checkpoint frees hundreds of MB of temporaries (dequantized tensors, the
        # compiler's work) that glibc keeps in its heap; malloc_trim returns them (~200-300 MB).
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass

    def make_attention_backend(self) -> Any:
        from tessera.backends.cpu.attention import CpuAttentionBackend

        return CpuAttentionBackend()
