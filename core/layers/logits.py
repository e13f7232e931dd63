"""Hidden states -> float32 logits over the vocabulary (gathering vocab shards across ranks)."""

from __future__ import annotations

import torch
from torch import nn

from tessera.core.layers.embedding import VocabEmbedding


class LogitsProcessor(nn.Module):
    """logits = soft_cap(scale * hidden @ W^T), cut to the real vocabulary size."""

    def __init__(self, vocab_size: int, scale: float = 1.0, soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.soft_cap = soft_cap

    def forward(self, lm_head: VocabEmbedding, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = hidden_states @ lm_head.weight.t()  # (num_rows, rows_per_rank)
        if lm_head.tp_size > 1:
            shards = [torch.empty_like(logits) for _ in range(lm_head.tp_size)]
            torch.distributed.all_gather(shards, logits)
            logits = torch.cat(shards, dim=-1)
        logits = logits[:, : self.vocab_size].float()  # (num_rows, vocab_size)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits
