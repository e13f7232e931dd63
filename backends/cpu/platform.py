"""The CPU platform: always available; bfloat16 by default where the CPU has native bf16 support."""

from __future__ import annotations

import ctypes
import logging
import os
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


# oneDNN, under torch's CPU matmuls, compiles a kernel for each matmul shape it meets and keeps it
# in two caches (oneDNN's own and ideep's), 1,024 entries each by default. The number of rows is
# part of the shape, so every distinct batch size or prompt length adds about 0.9 MB (500 row
# counts through SmolLM2's 4 layer shapes grew a process from 237 to 1,347 MB). 64 entries hold the shapes of the last
# dozen batch sizes (all layers of a step share a handful of shapes); a miss costs 0.5-1 ms a
# shape, once per step. Read when oneDNN first runs, so set before the model loads; a value in
# the environment wins.
ONEDNN_CACHE_CAPACITY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}

# glibc serves a large allocation with its own mmap and, once such a block is freed, raises that
# size limit to the block's size ("dynamic threshold"), so later tensors of that size come from
# the heap, where freed memory is seldom returned: varying prompt lengths left ~100 MB of freed
# activations in the engine's RSS. Fixing the limits (what MALLOC_MMAP_THRESHOLD_ and
# MALLOC_TRIM_THRESHOLD_ do) keeps tensors over 8 MiB (prefill activations) in their own mappings,
# returned when freed, while a decode step's smaller ones reuse heap memory without a system call
# or page faults. 8 MiB, not 1: a batch of 32 requests' logits (6 MB of float32, and 3 MB in bf16
# before that) then stay in the heap, where at 1 MiB each step mapped them afresh and faulted
# every page in (the float32 copy took ~2 ms instead of ~0.15; docs/benchmarks.md). The served
# peak RSS was the same at both limits (1,280-1,299 MiB).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MALLOC_LIMITS = {_M_MMAP_THRESHOLD: 8 << 20, _M_TRIM_THRESHOLD: 8 << 20}


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def configure_host_memory() -> None:
    """Bound oneDNN's kernel caches and fix glibc's allocation limits (see above), for this process.
    Values the user set in the environment win."""
    for variable, capacity in ONEDNN_CACHE_CAPACITY.items():
        os.environ.setdefault(variable, capacity)
    libc = _libc()
    user_set = any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if libc is not None and hasattr(libc, "mallopt") and not user_set:
        for parameter, value in MALLOC_LIMITS.items():
            libc.mallopt(parameter, value)


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
    # A step of 512 tokens already runs the 4-bit matmuls at their full rate (0.65 ms a token for
    # SmolLM2-135M at 512 and at 2,048 rows); a 2,048-token step takes ~1.4 s, during which every
    # decoding request waits. Served, 512 against 2,048 gave the same throughput with lower TTFT
    # and half the p99 inter-token latency under prompt-heavy load (docs/benchmarks.md).
    default_max_num_batched_tokens = 512

    def __init__(self) -> None:
        configure_host_memory()

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

    def kv_cache_memory_bytes(self, cache_config: CacheConfig, min_bytes: int = 0) -> int:
        gib = cache_config.kv_cache_space_gib
        if gib is None:
            gib = cpu_kvcache_space_gib_from_env()
        if gib is not None:
            return int(gib * _GIB)
        fraction_of_free = available_memory_bytes() * cache_config.kv_cache_memory_fraction
        return int(min(fraction_of_free, max(cache_config.kv_cache_default_max_gib * _GIB, min_bytes)))

    def release_host_memory(self) -> None:
        # Loading a checkpoint frees hundreds of MB of temporaries (dequantized tensors, the
        # compiler's work) that glibc keeps in its heap; malloc_trim returns them (~200-300 MB).
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)

    def group_quant_kernel(self) -> Any | None:
        from tessera.backends.cpu import group_quant_linear

        return group_quant_linear.CpuGroupQuantKernel() if group_quant_linear.kernel_available() else None

    def decoder_stack_kernel(self) -> Any | None:
        from tessera.backends.cpu import decoder_stack, kernels

        return decoder_stack.CpuDecoderStackKernel() if kernels.load() is not None else None

    def make_attention_backend(self) -> Any:
        from tessera.backends.cpu.attention import CpuAttentionBackend

        return CpuAttentionBackend()
