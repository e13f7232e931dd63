"""tessera: a high-throughput LLM inference engine and OpenAI-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tessera.core.entrypoints import LLM
    from tessera.core.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:  # lazy, so `tessera --help` does not import torch
    if name == "LLM":
        from tessera.core.entrypoints import LLM

        return LLM
    if name == "SamplingParams":
        from tessera.core.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
