"""The ways a CPU step can multiply SmolLM2's linear layers, timed against each other.

For every row count, one pass over 120 distinct matrices with the shapes of SmolLM2-135M's 30
layers (fused QKV 960x576, output 576x576, fused gate/up 3072x576, down 576x1536), so the weights
stream from memory as in a real step rather than sitting in cache:

  bf16 F.linear     a plain row-major bf16 weight (oneDNN re-lays it out on every call)
  bf16 packed       the weight pre-packed for oneDNN once (core/layers/onednn.py)
  int4 (torch)      GGUF Q4 groups of 32 through aten._weight_int4pack_mm_for_cpu
  int4 (tessera)    the same groups through tessera::group_quant_linear
                    (backends/cpu/group_quant_linear.py), where the CPU has AVX512-BF16 and VNNI
                    and the kernels built

A second table times the LM head (49152 x 576, tied to the embedding): oneDNN's packed bf16
weight against the file's Q8_0 table through tessera::group_quant_linear.

Prints markdown tables of milliseconds per pass (best of --repeats). A GGUF layer uses tessera's
kernel at every row count where it is available; elsewhere it picks torch's int4 kernel up to
`MAX_INT4_ROWS` rows and the packed weight above. This is the measurement behind both choices.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessera.backends.cpu import group_quant_linear as cpu_quant
from tessera.core.layers import onednn
from tessera.plugins.quantization.gguf import int4_linear, int4_pack

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # (out, in) per matrix, 30 layers


def best_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for n, k in SHAPES]
    packed = [onednn.prepack(w) for w in weights]
    groups = [
        (torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen), torch.rand(n, k // 32, 2, generator=gen) * 0.02)
        for n, k in SHAPES
    ]
    int4 = [int4_pack(q, scales_zeros, torch.bfloat16) for q, scales_zeros in groups]
    blocks = [cpu_quant.repack(q, scales_zeros) for q, scales_zeros in groups] if cpu_quant.kernel_available() else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per pass over {len(SHAPES)} matrices")
    print("| rows | bf16 F.linear | bf16 packed | int4 (torch) | int4 (tessera) |")
    print("|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (576, 1536)}
        plain = best_ms(lambda inputs=inputs: [F.linear(inputs[w.shape[1]], w) for w in weights], args.repeats)
        pre = best_ms(lambda inputs=inputs: [onednn.packed_linear(inputs[w.shape[1]], p) for w, p in zip(weights, packed)], args.repeats)
        cells = [f"{plain:.1f}", f"{pre:.1f}"]
        if rows <= 32:  # the int4 kernel is for decode-sized calls
            q4 = best_ms(lambda inputs=inputs: [int4_linear(inputs[w.shape[1]], *q, w.shape[0]) for w, q in zip(weights, int4)], args.repeats)
            cells.append(f"{q4:.1f}")
        else:
            cells.append("-")
        if blocks is not None:
            mine = best_ms(lambda inputs=inputs: [cpu_quant.group_quant_linear(inputs[w.shape[1]], b) for w, b in zip(weights, blocks)], args.repeats)
            cells.append(f"{mine:.1f}")
        else:
            cells.append("n/a")
        print(f"| {rows} | " + " | ".join(cells) + " |")
    lm_head(args, gen)


def lm_head(args: argparse.Namespace, gen: torch.Generator) -> None:
    vocab, hidden = 49152, 576
    weight = torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16)
    packed = onednn.prepack(weight)
    codes = torch.randint(0, 256, (vocab, hidden), dtype=torch.uint8, generator=gen)  # Q8_0 values + 128
    scale = torch.rand(vocab, hidden // 32, generator=gen) * 0.002
    blocks = cpu_quant.repack(codes, torch.stack([scale, -120 * scale], -1)) if cpu_quant.kernel_available() else None
    print(f"\nLM head {vocab} x {hidden}, ms per call")
    print("| rows | bf16 packed | Q8_0 (tessera) |")
    print("|---:|---:|---:|")
    for rows in args.rows:
        x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
        cells = [f"{best_ms(lambda x=x: onednn.packed_linear(x, packed), args.repeats):.2f}"]
        cells.append(f"{best_ms(lambda x=x: cpu_quant.group_quant_linear(x, blocks), args.repeats):.2f}" if blocks else "n/a")
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
