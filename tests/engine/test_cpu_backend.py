"""The CPU platform (dtype, KV-cache budget, selection) and its paged attention against plain SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.backends.cpu.attention import CpuAttentionBackend
from tessera.backends.cpu.platform import CpuPlatform
from tessera.core.config import CacheConfig, DeviceConfig
from tessera.core.errors import ConfigError, UnknownPluginError
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.plugins import PluginSet, get_plugins
from tessera.core.registry import Registry
from tessera.core.worker.platform_select import select_platform


def test_dtype_resolution():
    platform = CpuPlatform()
    assert platform.resolve_dtype("auto", torch.float32) == torch.float32
    assert platform.resolve_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert platform.resolve_dtype("auto", torch.float16) == torch.bfloat16
    assert platform.resolve_dtype("half", torch.float32) == torch.float16
    assert platform.resolve_dtype("float", torch.bfloat16) == torch.float32
    with pytest.raises(ConfigError, match="dtype='int8'"):
        platform.resolve_dtype("int8", torch.float32)


def test_kv_cache_budget_from_config_env_or_free_memory(monkeypatch):
    platform = CpuPlatform()
    monkeypatch.setenv("TESSERA_CPU_KVCACHE_SPACE", "2")
    assert platform.kv_cache_memory_bytes(CacheConfig(kv_cache_space_gib=0.5)) == 1 << 29
    assert platform.kv_cache_memory_bytes(CacheConfig()) == 2 << 30
    monkeypatch.delenv("TESSERA_CPU_KVCACHE_SPACE")
    monkeypatch.setattr("tessera.backends.cpu.platform.available_memory_bytes", lambda: 1000)
    assert platform.kv_cache_memory_bytes(CacheConfig(kv_cache_memory_fraction=0.25)) == 250


class _Unavailable(CpuPlatform):
    name = "fancy"
    priority = 10

    @classmethod
    def is_available(cls) -> bool:
        return False


def test_select_platform():
    assert isinstance(select_platform(DeviceConfig("auto"), get_plugins()), CpuPlatform)
    assert isinstance(select_platform(DeviceConfig("cpu"), get_plugins()), CpuPlatform)
    with pytest.raises(UnknownPluginError, match="'tpu'; registered: cpu"):
        select_platform(DeviceConfig("tpu"), get_plugins())
    registries = {kind: Registry(kind) for kind in get_plugins().registries}
    registries["platform"].register("cpu", CpuPlatform)
    registries["platform"].register("fancy", _Unavailable)
    plugins = PluginSet(registries)
    assert type(select_platform(DeviceConfig("auto"), plugins)) is CpuPlatform  # fancy is unavailable
    with pytest.raises(ConfigError, match="device 'fancy' is not available.*available: cpu"):
        select_platform(DeviceConfig("fancy"), plugins)


def _reference(q, k, v, scale):  # one request, all tokens: (n, heads, d)
    n_q, n_k = q.shape[0], k.shape[0]
    mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_dense_attention(dtype):
    """Two requests: one decodes (context 20), one prefills a 2nd chunk (tokens 16..23); then both decode."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 16
    backend = CpuAttentionBackend()
    cache = backend.allocate_kv_cache(8, block, kv_heads, dim, dtype, "cpu")
    tables = [[5, 2], [3, 6]]
    full = [torch.randn(n, heads + 2 * kv_heads, dim, generator=gen).to(dtype) for n in (22, 25)]

    def run(chunks):  # chunks: [(done, new)] per request
        slots, q, k, v, lens = [], [], [], [], []
        for (done, new), table, seq in zip(chunks, tables, full, strict=True):
            slots += [table[p // block] * block + p % block for p in range(done, done + new)]
            q.append(seq[done : done + new, :heads])
            k.append(seq[done : done + new, heads : heads + kv_heads])
            v.append(seq[done : done + new, heads + kv_heads :])
            lens.append(new)
        seq_lens = [d + n for d, n in chunks]
        metadata = AttentionMetadata(
            torch.tensor(slots), torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
            torch.tensor([0] + lens).cumsum(0).to(torch.int32), lens, seq_lens, max(lens), max(seq_lens), block,
            all(n == 1 for n in lens),
        )
        return backend.forward(torch.cat(q), torch.cat(k), torch.cat(v), cache, metadata, 0.3).split(lens)

    run([(0, 20), (0, 16)])
    outputs = run([(20, 1), (16, 8)]) + run([(21, 1), (24, 1)])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for out, (end, n), seq in zip(outputs, [(21, 1), (24, 8), (22, 1), (25, 1)], full + full, strict=True):
        q, k, v = seq[:end, :heads], seq[:end, heads : heads + kv_heads], seq[:end, heads + kv_heads :]
        expected = _reference(q[end - n :], k, v, 0.3)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol)
