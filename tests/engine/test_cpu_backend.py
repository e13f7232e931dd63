"""The CPU platform (dtype, KV-cache budget, selection) and its paged attention against plain SDPA."""

from __future__ import annotations

import os

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


@pytest.fixture
def mallopt_calls(monkeypatch) -> list[tuple[int, int]]:
    """The (parameter, value) of every mallopt call the CPU platform makes (none reach glibc)."""
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))

    monkeypatch.setattr("tessera.backends.cpu.platform._libc", FakeLibc)
    return calls


def test_platform_bounds_onednn_kernel_caches_and_fixes_malloc_limits(monkeypatch, mallopt_calls):
    monkeypatch.setattr(os, "environ", {**os.environ, "LRU_CACHE_CAPACITY": "300"})
    os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    CpuPlatform()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    assert os.environ["LRU_CACHE_CAPACITY"] == "300"  # a value the user set wins
    assert sorted(mallopt_calls) == [(-3, 8 << 20), (-1, 8 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_platform_leaves_malloc_limits_the_user_set_in_the_environment(monkeypatch, mallopt_calls):
    monkeypatch.setattr(os, "environ", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    CpuPlatform()
    assert mallopt_calls == []  # glibc read the user's value at start-up; it is not overwritten


def test_default_kv_cache_budget_holds_one_full_length_sequence(monkeypatch):
    platform = CpuPlatform()
    monkeypatch.delenv("TESSERA_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr("tessera.backends.cpu.platform.available_memory_bytes", lambda: 16 << 30)
    assert platform.kv_cache_memory_bytes(CacheConfig()) == 1 << 29  # the 0.5 GiB default
    assert platform.kv_cache_memory_bytes(CacheConfig(), min_bytes=3 << 30) == 3 << 30  # a long context
    assert platform.kv_cache_memory_bytes(CacheConfig(), min_bytes=5 << 30) == 4 << 30  # never past a quarter
    # a budget the user sets is theirs, even below one full-length sequence (the engine then says so)
    assert platform.kv_cache_memory_bytes(CacheConfig(kv_cache_space_gib=0.25), min_bytes=1 << 30) == 1 << 28


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


def _backend(use_kernel: bool) -> CpuAttentionBackend:
    backend = CpuAttentionBackend(use_kernel=use_kernel)
    if use_kernel and backend.kernels is None:
        pytest.skip("the C++ kernels could not be built here (see the log)")
    return backend


def _metadata(slots, tables, query_lens, seq_lens, block) -> AttentionMetadata:
    return AttentionMetadata(
        torch.tensor(slots), torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32), list(query_lens), list(seq_lens),
        max(query_lens), max(seq_lens), block, all(n == 1 for n in query_lens),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_cache_write_matches_index_copy(dtype):
    """The C++ cache write stores each token's key and value at its slot, from strided views like
    the ones a fused QKV projection yields, and refuses a slot outside the cache."""
    backend = _backend(use_kernel=True)
    gen = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 5, 4, 2, 8, generator=gen).to(dtype)
    expected = cache.clone()
    qkv = torch.randn(3, 2, 2, 8, generator=gen).to(dtype)
    key, value = qkv[:, 0], qkv[:, 1]  # non-contiguous, as views of one projection
    slots = torch.tensor([17, 0, 6])
    backend.kernels.write_kv_cache(cache, key, value, slots)
    expected[0].view(-1, 2, 8).index_copy_(0, slots, key)
    expected[1].view(-1, 2, 8).index_copy_(0, slots, value)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="slot 20 is outside the cache"):
        backend.kernels.write_kv_cache(cache, key, value, torch.tensor([1, 20, 2]))
    with pytest.raises(RuntimeError, match="the cache's dtype"):
        backend.kernels.write_kv_cache(cache, key.double(), value.double(), slots)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_dense_attention(dtype, use_kernel):
    """Two requests: one decodes (context 20), one prefills a 2nd chunk (tokens 16..23); then both decode."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 16
    backend = _backend(use_kernel)
    cache = backend.allocate_kv_cache(8, block, kv_heads, dim, dtype, "cpu")
    cache.fill_(float("nan"))  # the cache starts uninitialized: no path may read a slot before writing it
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
        metadata = _metadata(slots, tables, lens, [d + n for d, n in chunks], block)
        return backend.forward(torch.cat(q), torch.cat(k), torch.cat(v), cache, metadata, 0.3).split(lens)

    run([(0, 20), (0, 16)])
    outputs = run([(20, 1), (16, 8)]) + run([(21, 1), (24, 1)])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for out, (end, n), seq in zip(outputs, [(21, 1), (24, 8), (22, 1), (25, 1)], full + full, strict=True):
        q, k, v = seq[:end, :heads], seq[:end, heads : heads + kv_heads], seq[:end, heads + kv_heads :]
        expected = _reference(q[end - n :], k, v, 0.3)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol)


SHAPES = {  # (query heads, KV heads, head dim, block size, sequence lengths)
    "smollm2": (9, 3, 64, 16, [1, 17, 40, 130, 257]),  # the default model's layout
    "dim128-block32": (4, 1, 128, 32, [1, 33, 70]),
    "dim80-block8": (6, 2, 80, 8, [5, 23, 100]),  # head dim without an unrolled loop; small blocks
    "dim24-one-request": (2, 2, 24, 16, [300]),  # scalar tails; one request split over the threads
    "smollm2-one-request": (9, 3, 64, 16, [300]),  # bf16 kernel: one request split over the threads
    "dim64-group16": (16, 1, 64, 16, [20, 90]),  # more query heads per KV head than bf16's kernel takes
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_over_scattered_blocks(dtype, use_kernel, shape):
    """Decoding requests of different lengths whose blocks are scattered over the cache, some
    ending mid-block, for several head layouts."""
    _check_decode_attention(dtype, use_kernel, shape)


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize(
    "lengths", [[700], [1000, 20, 3], [50, 60, 900, 40], [31, 33]], ids=["one", "long-first", "long-inside", "short"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_cut_into_equal_shares_per_thread(dtype, lengths, threads):
    """The kernel cuts the step's cached tokens into one equal share per thread; a request a cut
    falls inside is attended in pieces whose softmax states are merged. Every way of cutting gives
    the same attention."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_decode_attention(dtype, True, (9, 3, 64, 16, lengths))
        _check_decode_attention(dtype, True, (2, 2, 24, 8, lengths))
    finally:
        torch.set_num_threads(before)


def _check_decode_attention(dtype, use_kernel, shape):
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block, lengths = shape
    num_blocks = sum(-(-n // block) for n in lengths) + 4
    width = max(-(-n // block) for n in lengths) + 1  # block table columns
    backend = _backend(use_kernel)
    cache = backend.allocate_kv_cache(num_blocks, block, kv_heads, dim, dtype, "cpu")
    cache.copy_(torch.randn(cache.shape, generator=gen).to(dtype))
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        count = -(-n // block)
        tables.append(order[used : used + count] + [0] * (width - count))
        used += count
    query = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    new_kv = torch.randn(2, len(lengths), kv_heads, dim, generator=gen).to(dtype)
    slots = [t[(n - 1) // block] * block + (n - 1) % block for t, n in zip(tables, lengths, strict=True)]
    metadata = _metadata(slots, tables, [1] * len(lengths), lengths, block)
    out = backend.forward(query, new_kv[0], new_kv[1], cache, metadata, dim**-0.5)
    flat = cache.view(2, -1, kv_heads, dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        positions = torch.arange(n)
        seq_slots = torch.tensor(table)[positions // block] * block + positions % block
        k, v = flat[0][seq_slots], flat[1][seq_slots]
        torch.testing.assert_close(k[-1], new_kv[0][row])  # the new key was stored in its slot
        expected = _reference(query[row : row + 1], k, v, dim**-0.5)[0]
        torch.testing.assert_close(out[row].float(), expected, rtol=0, atol=tol)


PREFILL_SHAPES = {  # (query heads, KV heads, head dim, block size): the C++ prefill kernel's head sizes
    "smollm2": (9, 3, 64, 16),
    "dim128-block32": (4, 1, 128, 32),
}


@pytest.mark.parametrize("shape", PREFILL_SHAPES.values(), ids=PREFILL_SHAPES.keys())
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
def test_prefills_and_decodes_in_one_step_match_dense_attention(use_kernel, shape):
    """One bf16 step holding a fresh 40-token prompt, a 17-token chunk after 33 cached tokens, a
    one-token prompt and a decode, their blocks scattered over the cache: every row matches dense
    causal attention over its request's tokens (query tiles of 16 rows, partial last tiles,
    chunks that start mid-block)."""
    _check_step_against_dense_attention(use_kernel, shape, [(0, 40), (33, 17), (0, 1), (57, 1)])


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", PREFILL_SHAPES.values(), ids=PREFILL_SHAPES.keys())
def test_short_chunks_after_long_contexts_match_dense_attention(shape, threads):
    """Chunks of a few rows after hundreds of cached tokens (a prefix-cache hit, a chat's next
    turn) beside a fresh prompt: the kernel packs a KV head's query heads into its lanes and
    extends the paired values from one task to the next; every split over the threads agrees."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_step_against_dense_attention(True, shape, [(300, 5), (0, 29), (211, 2), (97, 24)])
    finally:
        torch.set_num_threads(before)


def _check_step_against_dense_attention(use_kernel, shape, layout):
    """layout: (tokens cached before the step, tokens in the step) per request."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, block = shape
    backend = _backend(use_kernel)
    blocks_needed = [-(-(done + new) // block) for done, new in layout]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_needed)
    tables, used = [], 0
    for count in blocks_needed:
        tables.append(order[used : used + count] + [0] * (width - count))
        used += count
    cache = backend.allocate_kv_cache(num_blocks, block, kv_heads, dim, torch.bfloat16, "cpu")
    cache.fill_(float("nan"))  # no path may read a slot that was not written
    full = [torch.randn(d + n, heads + 2 * kv_heads, dim, generator=gen).to(torch.bfloat16) for d, n in layout]
    flat = cache.view(2, -1, kv_heads, dim)
    for (done, _), table, seq in zip(layout, tables, full, strict=True):  # the cached tokens
        slots = torch.tensor([table[p // block] * block + p % block for p in range(done)], dtype=torch.long)
        flat[0][slots] = seq[:done, heads : heads + kv_heads]
        flat[1][slots] = seq[:done, heads + kv_heads :]
    slots, q, k, v = [], [], [], []
    for (done, new), table, seq in zip(layout, tables, full, strict=True):
        slots += [table[p // block] * block + p % block for p in range(done, done + new)]
        q.append(seq[done:, :heads])
        k.append(seq[done:, heads : heads + kv_heads])
        v.append(seq[done:, heads + kv_heads :])
    metadata = _metadata(slots, tables, [n for _, n in layout], [d + n for d, n in layout], block)
    outputs = backend.forward(torch.cat(q), torch.cat(k), torch.cat(v), cache, metadata, dim**-0.5)
    for out, (done, _), seq in zip(outputs.split([n for _, n in layout]), layout, full, strict=True):
        expected = _reference(seq[:, :heads], seq[:, heads : heads + kv_heads], seq[:, heads + kv_heads :], dim**-0.5)
        torch.testing.assert_close(out.float(), expected[done:], rtol=0, atol=2e-2)
