"""The default model's forward for one decode step through the CPU decoder stack, timed.

Loads the default model (SmolLM2-135M-Instruct, GGUF) with `LLM`, then calls the model runner's
decoder stack (backends/cpu/csrc/decoder_stack.cpp: the 30 layers and the final norm, no LM head,
no engine around it) directly on fixed inputs: R requests decoding one token each after L cached
tokens, each request's blocks in its own stretch of the cache. What this times is the forward
column of benchmarks/step_profile.py without the engine's variation (prefills, growing
contexts), so two builds of the kernels compare within a few percent: run it alternately with
each (the kernels rebuild per source, docs/benchmarks.md).

Prints a markdown table of the median milliseconds per call over --calls calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from attention_kernels import decode_step_metadata

from tessera import LLM
from tessera.core.model_source import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=100, help="cached tokens per request, this step's included")
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()

    llm = LLM(model=str(default_model_path()))
    runner = llm.engine.runner
    stack = runner.decoder_stack
    if stack is None:
        raise SystemExit("this machine has no decoder stack (it needs the CPU kernels and AVX512-BF16)")
    block_size = llm.engine.config.cache.block_size
    blocks = runner.kv_caches[0].shape[1]
    print(f"| requests x context | ms per step (median of {args.calls}) |\n|---|---:|")
    with torch.inference_mode():
        for requests in args.requests:
            if requests * -(-args.context // block_size) > blocks:
                raise SystemExit(f"{requests} x {args.context} needs more than the cache's {blocks} blocks")
            per_request = -(-args.context // block_size)  # each request its own stretch of blocks
            tables = torch.arange(requests * per_request, dtype=torch.int32).view(requests, per_request)
            metadata = decode_step_metadata(tables, args.context, block_size)
            ids = torch.randint(1000, 20000, (requests,), generator=torch.Generator().manual_seed(0))
            positions = torch.full((requests,), args.context - 1, dtype=torch.long)
            for _ in range(5):  # warm-up
                stack(ids, positions, runner.kv_caches, metadata)
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                stack(ids, positions, runner.kv_caches, metadata)
                times.append((time.perf_counter() - start) * 1e3)
            print(f"| {requests} x {args.context} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
