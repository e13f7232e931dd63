"""Model building blocks shared by every architecture, and the LayerContext they are built with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerContext:
    """What every layer needs to know at construction: where it runs and how it is split.

    `quantization` is a `QuantizationMethod` (or None for plain weights); linear layers ask it for
    their `LinearMethod`. `tp_rank`/`tp_size` say which tensor-parallel shard this process holds.
    `platform` is the active Platform (None in tests that build bare layers); linear methods may
    use its kernels.
    """

    dtype: Any  # torch.dtype of parameters and activations
    device: Any  # torch.device
    attention_backend: Any  # AttentionBackend
    tp_rank: int = 0
    tp_size: int = 1
    quantization: Any | None = None
    platform: Any | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} must lie in [0, tp_size={self.tp_size})")


def divide(numerator: int, denominator: int) -> int:
    """Exact division for tensor-parallel splits; an uneven split is a configuration bug."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


__all__ = ["LayerContext", "divide"]
