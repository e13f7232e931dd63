"""bf16 matmuls on the CPU with the weight pre-packed in oneDNN's blocked layout.

A plain `F.linear` on a CPU hands oneDNN a row-major weight, which it re-lays out into its
blocked format on every call. For a small model's layers at decode-sized batches that relayout
costs about as much as the multiply: packing each weight once after loading makes the bf16
layers 20-35% faster at 1-32 rows and ~5% at hundreds (docs/benchmarks.md), for the same
arithmetic (the same bf16 products, summed in fp32, in another order).

The packed weight is an opaque oneDNN tensor: it has the weight's shape and dtype but no
readable storage, so the layer keeps it as its `weight` parameter (the compiler then passes it
to the graph as an input, like any parameter) and multiplies through the op
`tessera::packed_linear`, which inductor calls as an opaque kernel (its own mkldnn lowering
only accepts frozen constants). `TESSERA_ONEDNN_PACK=0` turns packing off.
"""

from __future__ import annotations

import os

import torch

# The row count oneDNN picks the blocked layout for; the layout serves every row count.
_BATCH_HINT = 32


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether `weight` (N, K) can be packed: a bf16 CPU tensor where oneDNN is available."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not weight.is_mkldnn
        and torch.backends.mkldnn.is_available()
        and os.environ.get("TESSERA_ONEDNN_PACK", "1") != "0"
    )


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight in oneDNN's blocked layout (an opaque tensor of the same shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for x (..., K) and W packed by `prepack`; y (..., N) in x's dtype."""
    return torch.ops.tessera.packed_linear(x, packed, bias)


_library = torch.library.Library("tessera", "FRAGMENT")
_library.define("packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != packed.dtype:
        rows = rows.to(packed.dtype)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if bias is not None and bias.dtype != packed.dtype:
        bias = bias.to(packed.dtype)
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


# The packed weight carries the MkldnnCPU dispatch key, the input the CPU one.
_library.impl("packed_linear", _packed_linear, "CPU")
_library.impl("packed_linear", _packed_linear, "MkldnnCPU")


@torch.library.register_fake("tessera::packed_linear")
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])
