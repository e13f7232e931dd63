"""bf16 linear layers on the CPU keep their weight pre-packed for oneDNN (core/layers/onednn.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.core.layers import LayerContext
from tessera.core.layers.linear import ReplicatedLinear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


def _layer(dtype: torch.dtype, bias: bool, seed: int) -> tuple[ReplicatedLinear, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    layer = ReplicatedLinear(48, 80, bias=bias, context=LayerContext(dtype, torch.device("cpu"), None))
    weight = torch.randn(80, 48, generator=gen).to(dtype)
    layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.copy_(torch.randn(80, generator=gen).to(dtype))
    layer.process_weights_after_loading()
    return layer, weight, layer.bias


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_bf16_linear_matches_the_plain_one(rows, bias):
    layer, weight, b = _layer(torch.bfloat16, bias, seed=rows)
    assert layer.weight.is_mkldnn and layer.weight.shape == (80, 48)  # packed, same shape
    x = torch.randn(rows, 48).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 80)
    torch.testing.assert_close(y.float(), F.linear(x.float(), weight.float(), None if b is None else b.float()), rtol=2e-2, atol=5e-2)


def test_float32_and_switched_off_layers_stay_plain(monkeypatch):
    layer, _, _ = _layer(torch.float32, False, seed=0)
    assert not layer.weight.is_mkldnn
    monkeypatch.setenv("TESSERA_ONEDNN_PACK", "0")
    layer, weight, _ = _layer(torch.bfloat16, False, seed=0)
    assert not layer.weight.is_mkldnn
    assert torch.equal(layer.weight, weight)


def test_packed_linear_compiles_with_each_layer_its_own_weights():
    """Compiled with dynamic row counts; two layers with different weights through one graph
    (the packed weight is a graph input, not a baked-in constant)."""
    layers = [_layer(torch.bfloat16, True, seed=s) for s in (1, 2)]

    def forward(layer: ReplicatedLinear, x: torch.Tensor) -> torch.Tensor:
        return F.silu(layer(F.silu(x)))

    compiled = torch.compile(forward, dynamic=True)
    for rows in (3, 17):
        x = torch.randn(rows, 48).to(torch.bfloat16)
        for layer, weight, bias in layers:
            expected = F.silu(F.linear(F.silu(x).float(), weight.float(), bias.float()))
            torch.testing.assert_close(compiled(layer, x).float(), expected, rtol=2e-2, atol=5e-2)
