"""Device platforms: detection, memory, the attention backend and kernels for one kind of device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Platform(ABC):
    """Registered under a `--device` name. Exactly one platform is active per engine.

    `--device auto` asks every registered platform `is_available()` and picks the available one
    with the highest `priority`; the CPU platform is always available.
    """

    name: str = "abstract"
    device_type: str = "cpu"  # the torch device type
    priority: int = 0
    # Tokens per engine step when `--max-num-batched-tokens` is not given: where the device's
    # matmuls reach their full rate, larger steps only delay first tokens and stall decoding.
    default_max_num_batched_tokens: int = 2048

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Called by `--device auto` and before activation: can this process use the device?"""

    @abstractmethod
    def torch_device(self) -> Any:
        """Called at start-up: the torch.device tensors live on."""

    @abstractmethod
    def resolve_dtype(self, requested: str, model_dtype: Any) -> Any:
        """Called at start-up: the torch dtype for `--dtype` (auto|half|float16|bfloat16|float|float32)
        given the checkpoint's dtype; raises ConfigError for one the device cannot run."""

    @abstractmethod
    def kv_cache_memory_bytes(self, cache_config: Any, min_bytes: int = 0) -> int:
        """Called at start-up, after the model is loaded: bytes the KV cache may use. `min_bytes`
        is what one sequence of the model's full length needs: a default budget (one the user did
        not set) should not be smaller, or the engine refuses to start."""

    @abstractmethod
    def make_attention_backend(self) -> Any:
        """Called at start-up: an AttentionBackend for this device."""

    def group_quant_kernel(self) -> Any | None:
        """Called while loading a model: a `GroupQuantKernel` (core/interfaces/quantization.py)
        for layers whose weights are 4- or 8-bit groups, or None where the platform has none."""
        return None

    def decoder_stack_kernel(self) -> Any | None:
        """Called after loading a model: a `DecoderStackKernel` (core/interfaces/decoder_stack.py)
        that runs a whole Llama-layout layer stack for decode-only steps, or None where the
        platform has none."""
        return None

    def set_seed(self, seed: int) -> None:
        """Called at start-up with `--seed`."""
        import torch

        torch.manual_seed(seed)

    def synchronize(self) -> None:
        """Called where host code must wait for the device (timing, tests)."""

    def release_host_memory(self) -> None:
        """Called once start-up (loading, compiling) is done: hand freed host memory back to the OS."""
