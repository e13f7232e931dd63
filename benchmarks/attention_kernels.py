"""CPU attention per layer with SmolLM2's heads (9 query, 3 KV, dim 64, bf16), timed.

  decode   the C++ kernel (backends/cpu/csrc/paged_attention.cpp) for R requests x L cached
           tokens, blocks of 16 scattered over the cache, called again and again on one cache
           (which then sits in the CPU's caches) and, per layer, over 30 layers' caches in turn
           (each read from memory, as in a model's step); then the whole layer call a compiled
           graph makes in a decode-only step (`tessera::attention`: the op's dispatch, the
           backend's Python, storing the step's keys and values, the kernel), so the difference
           is what the layer adds around the kernel
  prefill  one prompt of L tokens through torch's SDPA, with 3-d inputs (torch's unfused math
           path) and with 4-d inputs (its flash-attention kernel, which the backend used before
           tessera's own), and through tessera's C++ prefill kernel reading the paged cache

Prints markdown tables of microseconds per call (best of --repeats).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tessera.backends.cpu import kernels
from tessera.backends.cpu.attention import CpuAttentionBackend
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.layers import LayerContext
from tessera.core.layers.attention import Attention, step_context

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16


def best_us(run: Callable[[], object], repeats: int, inner: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            run()
        times.append((time.perf_counter() - start) / inner)
    return min(times) * 1e6


def decode_us(module: Any, num_reqs: int, length: int, repeats: int, layers: int = 1) -> float:
    """Microseconds per layer, the kernel run over `layers` caches in turn."""
    gen = torch.Generator().manual_seed(0)
    blocks_per_req = -(-length // BLOCK)
    num_blocks = num_reqs * blocks_per_req
    caches = []
    for _ in range(layers):
        keys = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(torch.bfloat16)
        values = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(torch.bfloat16)
        tables = torch.randperm(num_blocks, generator=gen).view(num_reqs, blocks_per_req).to(torch.int32)
        caches.append((keys, values, tables))
    query = torch.randn(num_reqs, HEADS, DIM, generator=gen).to(torch.bfloat16)
    lengths = torch.full((num_reqs,), length, dtype=torch.int32)
    out = torch.empty_like(query)

    def run() -> None:
        for keys, values, tables in caches:
            module.paged_decode_attention(out, query, keys, values, tables, lengths, DIM**-0.5)

    return best_us(run, repeats, inner=max(1, 20 // layers)) / layers


def decode_step_metadata(tables: torch.Tensor, length: int, block_size: int) -> AttentionMetadata:
    """A decode-only step: request i (its blocks tables[i], int32) decodes position length - 1."""
    num_reqs = tables.shape[0]
    positions = torch.full((num_reqs,), length - 1)
    slots = tables.long()[torch.arange(num_reqs), positions // block_size] * block_size + positions % block_size
    return AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=torch.full((num_reqs,), length, dtype=torch.int32),
        query_start_loc=torch.arange(num_reqs + 1, dtype=torch.int32),
        query_lens_cpu=[1] * num_reqs,
        seq_lens_cpu=[length] * num_reqs,
        max_query_len=1,
        max_seq_len=length,
        block_size=block_size,
        is_decode_only=True,
    )


def layer_call_us(num_reqs: int, length: int, repeats: int) -> float:
    """`tessera::attention` for one layer of a decode-only step, as the compiled graph calls it."""
    gen = torch.Generator().manual_seed(0)
    backend = CpuAttentionBackend()
    context = LayerContext(dtype=torch.bfloat16, device=torch.device("cpu"), attention_backend=backend)
    layer = Attention(HEADS, DIM, KV_HEADS, context)
    layer.layer_index = 0
    blocks_per_req = -(-length // BLOCK)
    num_blocks = num_reqs * blocks_per_req
    cache = backend.allocate_kv_cache(num_blocks, BLOCK, KV_HEADS, DIM, torch.bfloat16, "cpu")
    cache.normal_(generator=gen)
    tables = torch.randperm(num_blocks, generator=gen).view(num_reqs, blocks_per_req).to(torch.int32)
    metadata = decode_step_metadata(tables, length, BLOCK)
    query = torch.randn(num_reqs, HEADS * DIM, generator=gen).to(torch.bfloat16)
    key, value = (torch.randn(num_reqs, KV_HEADS * DIM, generator=gen).to(torch.bfloat16) for _ in range(2))
    with torch.inference_mode(), step_context([layer], [cache], metadata):
        return best_us(lambda: torch.ops.tessera.attention(query, key, value, 0), repeats)


def prefill_us(length: int, batched: bool, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(HEADS, length, DIM, generator=gen).to(torch.bfloat16)
    k = torch.randn(KV_HEADS, length, DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(KV_HEADS, length, DIM, generator=gen).to(torch.bfloat16)
    if batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    return best_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats, inner=3)


def prefill_kernel_us(module: Any, length: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    num_blocks = -(-length // BLOCK)
    keys = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(torch.bfloat16)
    values = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen).view(1, num_blocks).to(torch.int32)
    query = torch.randn(length, HEADS, DIM, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(query)
    starts, lengths = torch.zeros(1, dtype=torch.int32), torch.full((1,), length, dtype=torch.int32)
    return best_us(
        lambda: module.paged_prefill_attention(out, query, keys, values, tables, starts, lengths, lengths, DIM**-0.5),
        repeats,
        inner=3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    module = kernels.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if module is None:
        print("the C++ kernels are unavailable here (see the log); decode not measured")
    else:
        print("| decoding requests x context | kernel (us) | kernel, 30 layers' caches (us per layer) "
              "| layer call (us) |\n|---|---:|---:|---:|")
        for num_reqs, length in ((1, 100), (1, 2000), (32, 100), (32, 600)):
            kernel = decode_us(module, num_reqs, length, args.repeats)
            cold = decode_us(module, num_reqs, length, args.repeats, layers=30)
            call = layer_call_us(num_reqs, length, args.repeats)
            print(f"| {num_reqs} x {length} | {kernel:,.0f} | {cold:,.0f} | {call:,.0f} |")
    with_kernel = module is not None and DIM in module.prefill_attention_head_dims()
    print("\n| prompt tokens | SDPA 3-d inputs (us) | SDPA 4-d inputs (us) | tessera kernel (us) |\n|---|---:|---:|---:|")
    for length in (128, 300, 600):
        unbatched, batched = (prefill_us(length, b, args.repeats) for b in (False, True))
        kernel = f"{prefill_kernel_us(module, length, args.repeats):,.0f}" if with_kernel else "-"
        print(f"| {length} | {unbatched:,.0f} | {batched:,.0f} | {kernel} |")


if __name__ == "__main__":
    main()
