"""`tessera bench latency`: the latency of one batch through the offline engine, repeated."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.api.bench.offline import (
    add_engine_arguments,
    greedy_params,
    make_llm,
    random_token_prompts,
    run_command,
    write_json,
)
from tessera.core.errors import TesseraError

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-iters-warmup", type=int, default=3)
    parser.add_argument("--num-iters", type=int, default=10)
    parser.add_argument("--output-json", default=None, help="Write the result to this JSON file.")


def latency_summary(latencies_s: Sequence[float]) -> dict[str, Any]:
    values = np.asarray(latencies_s, dtype=np.float64)
    return {
        "avg_latency": float(values.mean()),
        "latencies": [float(v) for v in values],
        "percentiles": {str(p): float(np.percentile(values, p)) for p in PERCENTILES},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if min(args.input_len, args.output_len, args.batch_size, args.num_iters) < 1:
        raise TesseraError("--input-len, --output-len, --batch-size and --num-iters must be >= 1")
    llm = make_llm(args)
    prompts = random_token_prompts(llm.get_tokenizer(), args.batch_size, args.input_len, args.seed)
    params = greedy_params(args.output_len)

    def one_batch() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        one_batch()
    result = latency_summary([one_batch() for _ in range(args.num_iters)])
    result.update(batch_size=args.batch_size, input_len=args.input_len, output_len=args.output_len)
    print(f"Avg latency: {result['avg_latency']:.4f} s over {args.num_iters} iterations "
          f"(batch {args.batch_size}, {args.input_len} in, {args.output_len} out)")
    for p, value in result["percentiles"].items():
        print(f"{p}% percentile latency: {value:.4f} s")
    write_json(args.output_json, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("tessera bench latency", __doc__, add_arguments, run, argv)
