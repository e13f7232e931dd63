"""The CPU backend's C++ kernels (csrc/), compiled on first use with torch's extension builder.

Why hand-written C++: decode attention over a paged KV cache has no CPU kernel in torch or in
the libraries we depend on, and expressing it with stock ops (gather + tiny batched matmuls)
costs 4-5x more than the kernel (measured in docs/benchmarks.md). The 4- and 8-bit GGUF matmul
(csrc/group_quant_linear.cpp, see backends/cpu/group_quant_linear.py) is ~2x faster than torch's
int4 kernel and serves every batch size, so a GGUF layer needs no dequantized bf16 copy. Prefill
attention (paged_prefill_attention) is 1.6-2.2x faster than torch's CPU flash attention for bf16
caches, and the decoder stack (csrc/decoder_stack.cpp) runs a step's layers in one call. The
build takes ~80 s on 2 cores once per machine and is cached under `~/.cache/tessera/kernels/` (or
`$TESSERA_KERNEL_CACHE`), keyed by the source, the torch version and the CPU, so a changed source
or a different machine rebuilds; and by where the sources and torch are, because torch's builder
records those paths and rebuilds when they change: two checkouts (a CI clone beside a working
copy, say) sharing one build directory rebuilt it each time the other one loaded.

When no C++ compiler is found, or the build fails, `load()` logs why once and returns None; the
backend then computes the same thing with torch ops. `TESSERA_CPU_KERNELS=0` skips the kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "paged_attention.cpp", "group_quant_linear.cpp", "decoder_stack.cpp")]
# -ffast-math lets the compiler vectorize the dot products and exp(); the kernel avoids
# infinities and NaNs for that reason.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build_dir() -> Path:
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.read_bytes())
    key.update(" ".join([torch.__version__, platform.machine(), _cpu_model(), *CFLAGS]).encode())
    key.update(" ".join([str(Path(torch.__file__).parent), *(str(s.resolve()) for s in SOURCES)]).encode())
    root = Path(os.environ.get("TESSERA_KERNEL_CACHE") or Path.home() / ".cache" / "tessera" / "kernels")
    return root / key.hexdigest()[:16]


@functools.cache
def load() -> Any | None:
    """The compiled kernel module (`paged_decode_attention`, `write_kv_cache`; loading it also
    registers `tessera::group_quant_linear`), or None when unavailable."""
    if os.environ.get("TESSERA_CPU_KERNELS", "1") == "0":
        logger.info("TESSERA_CPU_KERNELS=0: CPU attention uses torch ops only")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        logger.warning("no C++ compiler found: CPU attention falls back to torch ops (slower decode)")
        return None
    from torch.utils import cpp_extension

    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name="tessera_cpu_kernels",
            sources=[str(s) for s in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as exc:  # a broken toolchain must not stop the server: fall back, loudly
        logger.warning("building the CPU kernels failed (%s): CPU attention falls back to torch ops", exc)
        return None
    elapsed = time.perf_counter() - start
    if elapsed > 1.0:
        logger.info("built the CPU kernels in %.1f s (cached in %s)", elapsed, build_dir)
    return module
