"""Activations of gated MLPs: the input holds [gate | up] and the output is act(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedActivation(nn.Module):
    """act(x[..., :d]) * x[..., d:] for an input of width 2d."""

    def __init__(self, hidden_act: str = "silu") -> None:
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; built: {', '.join(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (num_tokens, 2 * d) -> (num_tokens, d)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
