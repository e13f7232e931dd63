"""CPU attention per layer with SmolLM2's heads (9 query, 3 KV, dim 64, bf16), timed.

  decode   the C++ kernel (backends/cpu/csrc/paged_attention.cpp) for R requests x L cached
           tokens, blocks of 16 scattered over the cache
  prefill  one prompt of L tokens through torch's SDPA, with 3-d inputs (torch's unfused math
           path) and with the 4-d inputs the backend passes (its flash-attention kernel)

Prints markdown tables of microseconds per call (best of --repeats).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessera.backends.cpu import kernels

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


def decode_us(module: object, num_reqs: int, length: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    blocks_per_req = -(-length // BLOCK)
    num_blocks = num_reqs * blocks_per_req
    keys = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(torch.bfloat16)
    values = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen).view(num_reqs, blocks_per_req).to(torch.int32)
    query = torch.randn(num_reqs, HEADS, DIM, generator=gen).to(torch.bfloat16)
    lengths = torch.full((num_reqs,), length, dtype=torch.int32)
    out = torch.empty_like(query)
    return best_us(lambda: module.paged_decode_attention(out, query, keys, values, tables, lengths, DIM**-0.5), repeats)


def prefill_us(length: int, batched: bool, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(HEADS, length, DIM, generator=gen).to(torch.bfloat16)
    k = torch.randn(KV_HEADS, length, DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(KV_HEADS, length, DIM, generator=gen).to(torch.bfloat16)
    if batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    return best_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats, inner=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    module = kernels.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if module is None:
        print("the C++ kernels are unavailable here (see the log); decode not measured")
    else:
        print("| decoding requests x context | kernel (us) |\n|---|---:|")
        for num_reqs, length in ((1, 100), (1, 2000), (32, 100), (32, 600)):
            print(f"| {num_reqs} x {length} | {decode_us(module, num_reqs, length, args.repeats):,.0f} |")
    print("\n| prompt tokens | SDPA 3-d inputs (us) | SDPA 4-d inputs (us) |\n|---|---:|---:|")
    for length in (128, 300, 600):
        unbatched, batched = (prefill_us(length, b, args.repeats) for b in (False, True))
        print(f"| {length} | {unbatched:,.0f} | {batched:,.0f} |")


if __name__ == "__main__":
    main()
