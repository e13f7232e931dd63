"""RMSNorm, with the residual add fused in (as every pre-norm decoder uses it)."""

from __future__ import annotations

import torch
from torch import nn

from tessera.core.layers import LayerContext


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 like the reference implementations."""

    def __init__(self, hidden_size: int, eps: float, context: LayerContext) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=context.dtype, device=context.device), requires_grad=False
        )

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self._norm(x)
        x = x + residual  # (num_tokens, hidden_size)
        return self._norm(x), x
