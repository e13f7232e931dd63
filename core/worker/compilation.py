"""The model's forward under `torch.compile` (inductor), unless `--enforce-eager`.

On a CPU most of a small model's step outside the matmuls is Python and dispatch overhead: a few
dozen small ops per layer (norms, rotary, residual adds, activations). Inductor fuses them into
generated C++ loops. Attention stays an opaque custom op (`tessera::attention`, see
core/layers/attention.py), so the graph has the same shape every step and only the number of
tokens varies (compiled as a dynamic size). The matmuls stay the library kernels they were.

Compiling takes tens of seconds the first time on a small machine (inductor caches its output on
disk, so a restart is faster); `warm_up` does it at start-up, for the batch sizes that take
different code paths, and logs how long it took. `TESSERA_ENFORCE_EAGER=1` is the same as
`--enforce-eager` for every engine in the process and its children (the test suite sets it).

Guards: before each call, Dynamo checks that what the compiled code assumed still holds. For a
model that is about 5,700 checks, almost all of them on the modules (hooks, attribute types,
constants), costing 1.5 ms a step. The modules never change after loading, so only the checks
on the inputs (sizes, dtypes) are kept (`skip_guard_on_all_nn_modules_unsafe`). The checks that
are dropped include the one on which model the function closes over; two engines in one process
still never share compiled code, because Dynamo only reuses code made by the same
`torch.compile` call (its backend check is not a guard) and each CompiledForward makes its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.layers.attention import Attention, step_context

logger = logging.getLogger(__name__)

# Token counts that can take different paths: one token (sizes 0 and 1 are specialised by the
# compiler), a small batch and a large one (GGUF layers without tessera's int4 kernel switch from
# torch's int4 kernel to dense matmuls above 8 rows; with it, both sizes share one graph).
WARM_UP_SIZES = (1, 8, 32)


def compile_wanted(enforce_eager: bool, device: torch.device) -> bool:
    """Whether to compile: not when asked for eager mode, and only where inductor can build."""
    if enforce_eager or os.environ.get("TESSERA_ENFORCE_EAGER", "0") == "1":
        return False
    if device.type != "cpu":
        logger.info("torch.compile is only set up for the CPU platform; running eagerly")
        return False
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        logger.warning("no C++ compiler found: the model runs eagerly (slower); install g++ to compile it")
        return False
    return True


@contextlib.contextmanager
def _triton_hidden() -> Iterator[None]:
    """Make `import triton` fail inside the block, unless Triton is already imported.

    Triton is a GPU compiler (installed because xgrammar depends on it). Dynamo imports it as soon
    as it loads, and Inductor again while compiling a graph it has not cached (to register its GPU
    code generators), if it can: about 65 MB of shared library plus ~80 MB of Python state that the
    CPU path never uses. torch records once that Triton is missing (`has_triton_package` is
    cached); after the block Triton is importable again for anything else in the process.
    """
    if "triton" in sys.modules:
        yield  # too late, or someone here wants it
        return
    sys.modules["triton"] = None  # type: ignore[assignment]  # makes `import triton` raise ImportError
    try:
        yield
    finally:
        if "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]


class CompiledForward:
    """Calls the model like `model(input_ids, positions, kv_caches, metadata)`, compiled."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        for index, layer in enumerate(self.layers):
            layer.layer_index = index
        no_caches = [None] * len(self.layers)
        with _triton_hidden():
            import torch._dynamo  # noqa: F401
            import torch._inductor.compile_fx  # noqa: F401

        def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model(input_ids, positions, no_caches, None)

        self._compiled = torch.compile(
            forward, dynamic=True, options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        )

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[Any], metadata: AttentionMetadata
    ) -> torch.Tensor:
        with step_context(self.layers, kv_caches, metadata):
            return self._compiled(input_ids, positions)

    def warm_up(self, kv_caches: list[Any], block_size: int, device: torch.device, single_token: bool = True) -> float:
        """Compile for every path now, on throwaway decode steps that write only the first
        slots of the cache (nothing is cached yet at start-up, and a slot is always written
        before it is read); without `single_token`, not the one-token graph (whose steps then run
        elsewhere). Returns the seconds it took."""
        start = time.perf_counter()
        num_slots = kv_caches[0].shape[1] * block_size if kv_caches else 0
        with _triton_hidden(), warnings.catch_warnings():
            # inductor notes when one fused loop reads fp16 and writes bf16 (a quantized embedding's
            # fp16 scales decoding bf16 rows): expected, and not something a user can act on
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")
            sizes = [s for s in WARM_UP_SIZES if s <= num_slots and (single_token or s > 1)]
            self._compile_sizes(sizes, kv_caches, block_size, device)
        elapsed = time.perf_counter() - start
        logger.info("compiled the model with torch.compile in %.1f s (--enforce-eager skips this)", elapsed)
        return elapsed

    def _compile_sizes(self, sizes: list[int], kv_caches: list[Any], block_size: int, device: torch.device) -> None:
        for size in sizes:
            slots = torch.arange(size, device=device)
            metadata = AttentionMetadata(
                slot_mapping=slots,
                block_tables=(slots // block_size).to(torch.int32).view(size, 1),
                seq_lens=torch.ones(size, dtype=torch.int32, device=device),
                query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
                query_lens_cpu=[1] * size,
                seq_lens_cpu=[1] * size,
                max_query_len=1,
                max_seq_len=1,
                block_size=block_size,
                is_decode_only=True,
            )
            with torch.inference_mode():
                self(torch.zeros(size, dtype=torch.long, device=device), torch.zeros_like(slots), kv_caches, metadata)
