"""Shared parts of the offline benchmarks: engine flags, the `LLM`, random token-id prompts."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tessera.core.errors import TesseraError


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default=None, help="Model path or name (default: the embedded SmolLM2).")
    add("--dtype", default="auto")
    add("--max-model-len", type=int, default=None)
    add("--max-num-seqs", type=int, default=None)
    add("--max-num-batched-tokens", type=int, default=None)
    add("--block-size", type=int, default=None)
    add("--enforce-eager", action="store_true")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    add("--seed", type=int, default=0)
    add("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
        help="Any other EngineConfig field, e.g. --engine-arg kv_cache_space_gib=2 (repeatable).")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM keyword arguments the flags ask for (unset flags keep the engine's defaults)."""
    names = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "enable_prefix_caching", "seed")
    kwargs: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    for item in args.engine_arg:
        key, sep, raw = item.partition("=")
        if not sep:
            raise TesseraError(f"--engine-arg {item!r}: write KEY=VALUE")
        try:
            kwargs[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = raw  # a plain string
    return kwargs


def make_llm(args: argparse.Namespace) -> Any:
    from tessera import LLM

    return LLM(args.model, **engine_kwargs(args))


def random_token_prompts(
    tokenizer: Any, num_prompts: int, input_len: int, seed: int = 0
) -> list[list[int]]:
    """`num_prompts` prompts of exactly `input_len` random non-special token ids."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(seed)
    return [rng.choice(ids, size=input_len).tolist() for _ in range(num_prompts)]


def greedy_params(output_len: int) -> Any:
    """Sampling for a benchmark: greedy, EOS ignored so every request yields `output_len` tokens."""
    from tessera import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Save a benchmark result as JSON when `--output-json` asked for it."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


def run_command(
    prog: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None,
) -> int:
    """Parse, run, and turn a TesseraError into a one-line message and exit code 2."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except TesseraError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 2
    return 0
