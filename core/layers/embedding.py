"""Token embeddings and the LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.core.layers import LayerContext


class VocabEmbedding(nn.Module):
    """Each rank holds a contiguous range of `ceil(num_embeddings / tp_size)` rows.

    A quantization method may keep an unsplit table in its own form (`EmbeddingMethod`,
    core/interfaces/quantization.py): `quant_method` then serves lookups and, for the LM head,
    the matmul (LogitsProcessor); it is None when the plain `weight` serves.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, context: LayerContext) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_rank = context.tp_rank
        self.tp_size = context.tp_size
        self.rows_per_rank = -(-num_embeddings // context.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim, dtype=context.dtype, device=context.device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.platform = context.platform
        self.quant_method = None
        if context.quantization is not None and context.tp_size == 1:
            self.quant_method = context.quantization.get_embedding_method()
        if self.quant_method is not None:
            self.quant_method.create_weights(self, num_embeddings, embedding_dim, context.dtype)

    def process_weights_after_loading(self) -> None:
        if self.quant_method is not None and not self.quant_method.process_weights_after_loading(self):
            self.quant_method = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = loaded[self.vocab_start : self.vocab_start + self.rows_per_rank]
        if rows.shape[1:] != param.shape[1:] or loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit ({self.num_embeddings}, {param.shape[1]})")
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (num_tokens,) -> (num_tokens, dim)
        if self.quant_method is not None:
            return self.quant_method.embedding(self, input_ids)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        is_mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight) * is_mine.unsqueeze(-1)
        torch.distributed.all_reduce(out)
        return out


class LMHead(VocabEmbedding):
    """The output projection; shares the VocabEmbedding layout so tied weights are one tensor."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("LMHead is applied through LogitsProcessor, not called directly")
