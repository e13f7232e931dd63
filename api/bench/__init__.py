"""`tessera bench`: serve (load-test a server), throughput and latency (the offline engine)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from tessera.core.errors import TesseraError

# name -> (module under tessera.api.bench, one-line help); modules import lazily
SUBCOMMANDS = {
    "serve": ("serve", "load-test an OpenAI-compatible server (vLLM benchmark_serving metrics)"),
    "throughput": ("throughput", "offline engine throughput over N prompts of fixed lengths"),
    "latency": ("latency", "offline latency of one batch, repeated"),
}


def _module(name: str) -> Any:
    return importlib.import_module(f"tessera.api.bench.{SUBCOMMANDS[name][0]}")


def add_bench_subparsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` (with serve/throughput/latency) to an argparse subparsers object; each
    leaf sets `func(args) -> int`."""
    bench = subparsers.add_parser("bench", help="benchmark a server or the offline engine",
                                  description=__doc__)
    inner = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)
    for name, (_, text) in SUBCOMMANDS.items():
        sub = inner.add_parser(name, help=text, description=text)
        _module(name).add_arguments(sub)
        sub.set_defaults(func=_runner(name))
    return bench


def _runner(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            _module(name).run(args)
        except TesseraError as exc:
            print(f"tessera bench {name}: error: {exc.message}", file=sys.stderr)
            return 2
        return 0

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """`tessera bench ARGS...` as a command handler of its own."""
    parser = argparse.ArgumentParser(prog="tessera")
    add_bench_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
