"""Linear layers (replicated, column/row tensor-parallel, fused QKV and gate/up) over a LinearMethod.

A layer owns the shapes and the tensor-parallel split; its `LinearMethod` owns the parameters and
the arithmetic (plain weights here, quantized ones in quantization plugins). Each parameter gets a
`weight_loader(param, loaded_weight, shard_id=None)` that copies this rank's slice of a checkpoint
tensor into it. Parameters a method creates may carry `output_dim` / `input_dim` attributes (the
tensor dimension along which outputs / inputs run); the loaders narrow along those. A parameter
without them is copied whole (a per-tensor scale, for instance).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.core.interfaces.quantization import LinearMethod
from tessera.core.layers import LayerContext, divide, onednn


class UnquantizedLinearMethod(LinearMethod):
    """Plain dense weights in the model dtype: y = x W^T + b. A bf16 weight on the CPU is
    re-laid out once after loading for oneDNN (core/layers/onednn.py)."""

    def create_weights(self, layer: Any, input_size: int, output_size: int, dtype: Any) -> None:
        weight = nn.Parameter(
            torch.empty(output_size, input_size, dtype=dtype, device=layer.device), requires_grad=False
        )
        weight.output_dim = 0  # type: ignore[attr-defined]
        weight.input_dim = 1  # type: ignore[attr-defined]
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: Any) -> None:
        layer.weight_packed = onednn.can_prepack(layer.weight)
        if layer.weight_packed:
            layer.weight = nn.Parameter(onednn.prepack(layer.weight), requires_grad=False)

    def apply(self, layer: Any, x: Any, bias: Any | None) -> Any:
        if getattr(layer, "weight_packed", False):
            return onednn.packed_linear(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)

    def decoder_stack_weight(self, layer: Any) -> Any | None:
        return layer.weight if getattr(layer, "weight_packed", False) else None


def get_linear_method(context: LayerContext, prefix: str) -> LinearMethod:
    """The LinearMethod for the layer at `prefix`: the quantization method's, else plain weights."""
    if context.quantization is None:
        return UnquantizedLinearMethod()
    return context.quantization.get_linear_method(prefix)


def _copy_into(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    """Holds the method and (optionally) a bias; subclasses decide the split and the loaders."""

    def __init__(
        self,
        input_size: int,  # this rank's input features
        output_size: int,  # this rank's output features
        *,
        bias: bool,
        context: LayerContext,
        prefix: str,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank = context.tp_rank
        self.tp_size = context.tp_size
        self.device = context.device
        self.platform = context.platform  # for methods that use the platform's kernels
        self.prefix = prefix
        self.linear_method = get_linear_method(context, prefix)
        self.linear_method.create_weights(self, input_size, output_size, context.dtype)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(output_size, dtype=context.dtype, device=context.device), requires_grad=False
            )
            self.bias.output_dim = 0  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        _copy_into(param, loaded)

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (num_tokens, input_size) -> (.., output_size)
        return self.linear_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, context: LayerContext, prefix: str = "") -> None:
        super().__init__(input_size, output_size, bias=bias, context=context, prefix=prefix)


class ColumnParallelLinear(LinearBase):
    """Outputs split across ranks; each rank computes its own slice of y (no communication)."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, context: LayerContext, prefix: str = "") -> None:
        self.total_output_size = output_size
        super().__init__(input_size, divide(output_size, context.tp_size), bias=bias, context=context, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is not None and self.tp_size > 1:
            size = param.shape[output_dim]
            loaded = loaded.narrow(output_dim, self.tp_rank * size, size)
        _copy_into(param, loaded)


class _FusedColumnLinear(ColumnParallelLinear):
    """Several checkpoint matrices stacked along the output dimension (each split per rank)."""

    def __init__(
        self, input_size: int, shard_sizes: dict[Any, int], *, bias: bool, context: LayerContext, prefix: str
    ) -> None:
        self.shard_sizes = {key: divide(size, context.tp_size) for key, size in shard_sizes.items()}
        self.shard_offsets: dict[Any, int] = {}
        offset = 0
        for key, size in self.shard_sizes.items():
            self.shard_offsets[key] = offset
            offset += size
        super().__init__(input_size, sum(shard_sizes.values()), bias=bias, context=context, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        output_dim = getattr(param, "output_dim", None)
        if shard_id is None or output_dim is None:
            _copy_into(param, loaded)  # already fused in the checkpoint, or not split by output
            return
        # The method may store fewer rows than outputs (packed formats): scale offsets to match.
        scale = param.shape[output_dim] / self.output_size
        size = int(self.shard_sizes[shard_id] * scale)
        offset = int(self.shard_offsets[shard_id] * scale)
        if self.tp_size > 1:
            loaded = loaded.narrow(output_dim, self._shard_rank(shard_id) * size, size)
        _copy_into(param.data.narrow(output_dim, offset, size), loaded)

    def _shard_rank(self, shard_id: Any) -> int:
        """Which slice of shard `shard_id` this rank holds."""
        return self.tp_rank


class MergedColumnParallelLinear(_FusedColumnLinear):
    """[gate | up] in one matmul; shard ids are the indexes into `output_sizes`."""

    def __init__(
        self, input_size: int, output_sizes: list[int], *, bias: bool, context: LayerContext, prefix: str = ""
    ) -> None:
        super().__init__(input_size, dict(enumerate(output_sizes)), bias=bias, context=context, prefix=prefix)


class QKVParallelLinear(_FusedColumnLinear):
    """[q | k | v] in one matmul; shard ids "q", "k", "v". KV heads are replicated when there are
    fewer of them than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        context: LayerContext,
        prefix: str = "",
    ) -> None:
        self.num_heads = divide(num_heads, context.tp_size)
        self.kv_replicas = max(1, context.tp_size // num_kv_heads)
        self.num_kv_heads = max(1, num_kv_heads // context.tp_size)
        self.head_dim = head_dim
        tp = context.tp_size
        sizes = {
            "q": num_heads * head_dim,
            "k": self.num_kv_heads * head_dim * tp,
            "v": self.num_kv_heads * head_dim * tp,
        }
        super().__init__(hidden_size, sizes, bias=bias, context=context, prefix=prefix)

    def _shard_rank(self, shard_id: Any) -> int:
        # With fewer KV heads than ranks, `kv_replicas` neighbouring ranks share one KV head.
        if shard_id in ("k", "v"):
            return self.tp_rank // self.kv_replicas
        return self.tp_rank


class RowParallelLinear(LinearBase):
    """Inputs split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, context: LayerContext, prefix: str = "") -> None:
        super().__init__(divide(input_size, context.tp_size), output_size, bias=bias, context=context, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        input_dim = getattr(param, "input_dim", None)
        if input_dim is not None and self.tp_size > 1:
            size = param.shape[input_dim]
            loaded = loaded.narrow(input_dim, self.tp_rank * size, size)
        _copy_into(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (num_tokens, input_size / tp) -> (.., output)
        if self.tp_size == 1:
            return self.linear_method.apply(self, x, self.bias)
        y = self.linear_method.apply(self, x, None)
        torch.distributed.all_reduce(y)
        return y if self.bias is None else y + self.bias
