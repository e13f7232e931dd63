"""Hidden states -> float32 logits over the vocabulary (gathering vocab shards across ranks)."""

from __future__ import annotations

import torch
from torch import nn

from tessera.core.layers import onednn
from tessera.core.layers.embedding import VocabEmbedding


class LogitsProcessor(nn.Module):
    """logits = soft_cap(scale * hidden @ W^T), cut to the real vocabulary size.

    On a CPU with a bf16 LM head, W is also kept in oneDNN's blocked layout (packed on first use,
    once the weights are loaded; core/layers/onednn.py): the same arithmetic, ~1.8x faster for the
    28 M-parameter head of a small model at 1-64 rows (docs/benchmarks.md), for one more copy of
    the head in memory (the plain one stays: the head is often the input embedding too). A head
    whose quantization method keeps it in its own form (`lm_head.quant_method`) multiplies that way.
    """

    def __init__(self, vocab_size: int, scale: float = 1.0, soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.soft_cap = soft_cap
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, its packed form)

    def _matmul(self, weight: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if not onednn.can_prepack(weight) or hidden_states.dtype != weight.dtype:
            return hidden_states @ weight.t()
        if self._packed is None or self._packed[0] is not weight:
            self._packed = (weight, onednn.prepack(weight))
        return onednn.packed_linear(hidden_states, self._packed[1])

    def forward(self, lm_head: VocabEmbedding, hidden_states: torch.Tensor) -> torch.Tensor:
        if lm_head.quant_method is not None:  # the table is kept quantized (core/layers/embedding.py)
            logits = lm_head.quant_method.apply(lm_head, hidden_states)
        else:
            logits = self._matmul(lm_head.weight, hidden_states)  # (num_rows, rows_per_rank)
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
