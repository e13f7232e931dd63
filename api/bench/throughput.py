"""`tessera bench throughput`: offline engine throughput over N prompts of fixed lengths."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from tessera.api.bench.offline import (
    add_engine_arguments,
    greedy_params,
    make_llm,
    random_token_prompts,
    run_command,
    write_json,
)
from tessera.core.errors import TesseraError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-json", default=None, help="Write the result to this JSON file.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if min(args.input_len, args.output_len, args.num_prompts) < 1:
        raise TesseraError("--input-len, --output-len and --num-prompts must be >= 1")
    load_start = time.perf_counter()
    llm = make_llm(args)
    load_s = time.perf_counter() - load_start
    prompts = random_token_prompts(llm.get_tokenizer(), args.num_prompts, args.input_len, args.seed)
    params = greedy_params(args.output_len)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_output = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    num_input = sum(len(p) for p in prompts)
    result = {
        "elapsed_time": elapsed,
        "load_time": load_s,
        "num_requests": len(prompts),
        "total_num_tokens": num_input + num_output,
        "num_output_tokens": num_output,
        "requests_per_second": len(prompts) / elapsed,
        "tokens_per_second": (num_input + num_output) / elapsed,
        "output_tokens_per_second": num_output / elapsed,
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s "
        f"({len(prompts)} requests, {num_output} output tokens in {elapsed:.2f} s; load {load_s:.1f} s)"
    )
    write_json(args.output_json, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("tessera bench throughput", __doc__, add_arguments, run, argv)
