"""Serving throughput under a JSON-schema constraint, per guided-decoding backend, vs unconstrained."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import regex

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402
from _servers import Server, free_port  # noqa: E402

BACKENDS = ("xgrammar", "llguidance", "outlines", "lm-format-enforcer", "auto")
UNCONSTRAINED = "unconstrained"
SECTION = "guided"
PROMPTS = [  # asking for steps, not for JSON: unconstrained output is prose, so a lost constraint shows
    "List, step by step, how to bake a loaf of bread.",
    "List, step by step, how to plant a tree.",
    "List, step by step, how to change a flat bicycle tyre.",
    "List, step by step, how to make a cup of tea.",
    "List, step by step, how to write a good essay.",
    "List, step by step, how to set up a fish tank.",
    "List, step by step, how to learn a new language.",
    "List, step by step, how to paint a room.",
]
# The full language of `schema(...)`: an object with one key whose value is an array of strings.
# Matched with partial=True it accepts exactly the prefixes of such text (whitespace left free).
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_LANGUAGE = regex.compile(
    r'\s*\{\s*"steps"\s*:\s*\[\s*(?:' + _STRING + r'(?:\s*,\s*' + _STRING + r')*)?\s*\]\s*\}\s*'
)

NOISE = 0.03  # throughput ratios closer than this are not told apart by two short runs


def schema(min_items: int) -> dict[str, Any]:
    """With `min_items` = max_tokens, an array that cannot be closed within the budget (every item
    costs at least one token), so EOS is never allowed and each constrained request runs its full
    budget. A schema that can complete would not do: under `ignore_eos` tessera ends the request
    with finish_reason "abort" once the grammar has accepted EOS."""
    return {
        "type": "object",
        "properties": {"steps": {"type": "array", "items": {"type": "string"}, "minItems": min_items}},
        "required": ["steps"],
    }


def is_valid_prefix(text: str) -> bool:
    """Is `text` a prefix of some instance of `schema(...)` (ignoring minItems)?"""
    return _LANGUAGE.fullmatch(text, partial=True) is not None


def check_output(text: str, finish_reason: str | None, num_tokens: int, max_tokens: int,
                 is_constrained: bool) -> str | None:
    """Why one output must not be counted, or None. Both modes must run the whole budget."""
    if num_tokens != max_tokens or finish_reason != "length":
        return f"ended early: finish_reason {finish_reason!r} after {num_tokens} of {max_tokens} tokens"
    if is_constrained and not (text and is_valid_prefix(text)):
        return f"not a prefix of the schema's JSON: {text[:80]!r}"
    return None


@dataclass
class Run:
    """One batch of concurrent requests under one configuration."""

    config: str
    num_tokens: int
    wall_s: float
    texts: list[str]
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s


def request_body(model: str, prompt: str, config: str, max_tokens: int, min_items: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, "seed": 0, "ignore_eos": True,  # the constraint is the only difference
    }
    if config != UNCONSTRAINED:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "steps", "schema": schema(min_items)}}
        body["guided_decoding_backend"] = config
    return body


async def run_batch(client: httpx.AsyncClient, model: str, config: str, concurrency: int,
                    max_tokens: int, min_items: int) -> Run:
    """`concurrency` requests at once; output tokens from each response's usage."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]

    async def one(prompt: str) -> dict[str, Any]:
        body = request_body(model, prompt, config, max_tokens, min_items)
        reply = await client.post("/v1/chat/completions", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"{config}: HTTP {reply.status_code}: {reply.text[:300]}")
        return dict(reply.json())

    start = time.perf_counter()
    replies = await asyncio.gather(*(one(p) for p in prompts))
    wall_s = time.perf_counter() - start
    texts, errors, num_tokens = [], [], 0
    for reply in replies:
        choice, used = reply["choices"][0], reply["usage"]["completion_tokens"]
        text = choice["message"]["content"] or ""
        texts.append(text)
        num_tokens += used
        error = check_output(text, choice["finish_reason"], used, max_tokens, config != UNCONSTRAINED)
        if error:
            errors.append(error)
    return Run(config, num_tokens, wall_s, texts, errors)


async def measure_async(base_url: str, configs: list[str], concurrency: int, max_tokens: int,
                        repeats: int, log: Callable[[str], object] = print) -> dict[str, list[Run]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=1800.0) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        # warm-up, not timed: the engine at this concurrency, then each backend's setup and compile
        warm_tokens = min(max_tokens, 16)
        await run_batch(client, model, UNCONSTRAINED, concurrency, warm_tokens, max_tokens)
        for config in configs:
            if config != UNCONSTRAINED:  # the same schema, so the timed runs hit the compile cache
                await run_batch(client, model, config, 1, warm_tokens, max_tokens)
        runs: dict[str, list[Run]] = {c: [] for c in configs}
        for repeat in range(repeats):  # interleaved, so drift in machine load hits every config alike
            for config in configs:
                run = await run_batch(client, model, config, concurrency, max_tokens, max_tokens)
                runs[config].append(run)
                invalid = f"; {len(run.errors)} invalid" if run.errors else ""
                log(f"[{repeat + 1}/{repeats}] {config}: {run.num_tokens} tokens in {run.wall_s:.2f} s "
                    f"= {run.tokens_per_s:.1f} tok/s{invalid}")
    return runs


def measure(base_url: str, backends: list[str], concurrency: int = 8, max_tokens: int = 128,
            repeats: int = 2, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Throughput of every configuration against a running server, best of `repeats` each, and
    each backend's ratio to unconstrained. `errors` lists every output that was cut short or (for
    a constrained one) does not follow the schema: those figures measure something else."""
    configs = [UNCONSTRAINED, *backends]
    runs = asyncio.run(measure_async(base_url, configs, concurrency, max_tokens, repeats, log))
    best = {c: max(rs, key=lambda r: r.tokens_per_s) for c, rs in runs.items()}
    base = best[UNCONSTRAINED].tokens_per_s
    rows = {
        c: {"tokens": r.num_tokens, "wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s,
            "ratio": r.tokens_per_s / base, "all_tokens_per_s": [x.tokens_per_s for x in runs[c]],
            "median_tokens_per_s": statistics.median(x.tokens_per_s for x in runs[c])}
        for c, r in best.items()
    }
    errors = [f"{c}: {e}" for c, rs in runs.items() for r in rs for e in r.errors]
    return {"rows": rows, "texts": {c: r.texts for c, r in best.items()}, "errors": errors}


def mask_times(backends: list[str], texts: dict[str, list[str]], max_tokens: int,
               repeats: int = 3) -> dict[str, dict[str, Any]]:
    """guided_mask_bench's compile and per-token mask time, on this benchmark's schema, walking the
    tokens of the backend's own first output (re-tokenized: the API returns text)."""
    import guided_mask_bench

    from tessera.core.engine.structured_output import StructuredOutputManager
    from tessera.core.interfaces.guided import GuidedConstraint
    from tessera.core.plugins import load_plugins

    registry = load_plugins().guided_decoding_backends
    tokenizer = guided_mask_bench.load_tokenizer()
    vocab_size = len(tokenizer)
    out: dict[str, dict[str, Any]] = {}
    for name in backends:
        if name == "auto":
            continue
        tokens = tokenizer.encode(texts[name][0], add_special_tokens=False)
        cls = registry.get(name)
        try:
            out[name] = guided_mask_bench.bench_backend(cls, tokenizer, vocab_size, repeats,
                                                        schema(max_tokens), tokens)
        except AssertionError as exc:  # re-tokenizing gave a token the backend would not sample
            out[name] = guided_mask_bench.bench_backend(cls, tokenizer, vocab_size, repeats)
            out[name]["fallback"] = f"{exc}; measured on guided_mask_bench's own schema and instance"
    if "auto" in backends:
        manager = StructuredOutputManager(registry, tokenizer, vocab_size)
        constraint = GuidedConstraint("json", json.dumps(schema(max_tokens)))
        out["auto"] = {"resolves_to": manager.validate(constraint)}
        manager.shutdown()
    return out


def report(result: dict[str, Any], masks: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = []
    for config, r in result["rows"].items():
        mask = masks.get(config, {})
        served = mask.get("resolves_to", "-" if config == UNCONSTRAINED else config)
        if "resolves_to" in mask:
            mask = masks.get(served, {})
        rows.append([
            f"`{config}`" if config != UNCONSTRAINED else "none",
            f"`{served}`" if served != "-" else "-",
            str(r["tokens"]), f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['ratio']:.2f}",
            f"{mask['mask_ms_mean']:.4f}" + ("*" if "fallback" in mask else "") if mask else "-",
            f"{mask['compile_ms_median']:.1f}" if mask else "-",
        ])
    header = ["constraint backend", "served by", "output tokens", "seconds", "output tok/s",
              "/ unconstrained", "mask ms/token", "compile ms"]
    p = meta["params"]
    lines = [
        "## Structured outputs: JSON-schema throughput against unconstrained",
        "",
        f"Date: {meta['date']}. Machine: {_report.machine_line(meta['machine'])}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"One `tessera serve` (default model, SmolLM2-135M-Instruct GGUF); {p['concurrency']} concurrent "
        f"chat requests, {p['max_tokens']} output tokens each, temperature 0, `ignore_eos`, the same "
        "prompts in every row. Constrained rows add `response_format` with a JSON schema (an array of "
        f"strings, `minItems` {p['max_tokens']}, so it cannot end early) and `guided_decoding_backend`. "
        f"Each row: the best of {p['repeats']} runs (the rows interleaved), tokens over the wall time "
        "of the whole batch, tokens from each response's `usage`; every "
        "constrained output checked to be a prefix of the schema's JSON. Mask and compile times: "
        "`benchmarks/guided_mask_bench.py`'s measurement on this schema, walking the tokens of the "
        "backend's first output, in the benchmark process after the server stopped.",
        "",
        _report.table(header, rows),
    ]
    guided = {c: r for c, r in result["rows"].items() if c not in (UNCONSTRAINED, "auto")}
    if guided:
        fastest = max(guided, key=lambda c: guided[c]["ratio"])
        best = guided[fastest]["ratio"]
        tied = sorted(c for c in guided if guided[c]["ratio"] >= best - NOISE)
        verdict = (f"Fastest backend: `{fastest}`, {best:.0%} of unconstrained throughput (goal: at "
                   f"least 90%); within {NOISE:.0%} of it, which is run-to-run noise here: "
                   + ", ".join(f"`{c}`" for c in tied) + ".")
        auto = masks.get("auto", {}).get("resolves_to")
        if auto:
            verdict += f" `auto` picks `{auto}` for this schema" + (
                ", one of the fastest." if auto in tied else ", not one of the fastest.")
        lines += ["", verdict]
    if any("fallback" in m for m in masks.values()):
        lines += ["", "\\* the backend rejected a token of its re-tokenized output, so this is "
                  "`guided_mask_bench.py`'s own four-field schema and 34-token instance."]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}."]
    if result["errors"]:
        lines += ["", "Invalid outputs (their rows measure something else):", ""]
        lines += [f"- {e}" for e in result["errors"][:10]]
    server = f"server: {shlex.join(meta['server_command'])}"
    lines += ["", "Command:", "", "```", meta["command"], server, "```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=8, help="Requests sent at once per run.")
    parser.add_argument("--max-tokens", type=int, default=128, help="Output tokens of every request.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per configuration; the best counts.")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="Comma-separated; `auto` included.")
    parser.add_argument("--mask-repeats", type=int, default=3, help="guided_mask_bench passes per backend.")
    parser.add_argument("--serve-args", default="", help="Extra `tessera serve` flags, one string.")
    parser.add_argument("--write-docs", action="store_true", help="Write the table into docs/benchmarks.md.")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    logs = os.path.join(_report.RESULTS_DIR, "logs")
    os.makedirs(logs, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "tessera.api.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *shlex.split(args.serve_args)]
    server = Server("tessera", command, port, log_path=os.path.join(logs, "guided-tessera.log"))
    meta: dict[str, Any] = {
        "date": _report.now(),
        "machine": _report.machine(),
        "versions": _report.versions("tessera", "torch", "xgrammar", "llguidance", "outlines-core",
                                     "lm-format-enforcer"),
        "command": shlex.join([os.path.relpath(sys.executable, _report.REPO), *sys.argv]),
        "server_command": [os.path.relpath(command[0], _report.REPO), *command[1:]],
        "params": {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "repeats": args.repeats},
    }
    if os.nice(0) > 0:  # the server inherits it and loses every contended time slice
        meta["note"] = f"run at niceness {os.nice(0)} (the server inherited it): figures are pessimistic"
        print(f"warning: {meta['note']}", file=sys.stderr)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server never outlives the script
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"starting: {shlex.join(command)}", flush=True)
    try:
        server.start()
        meta["server_startup_s"] = server.startup_s
        result = measure(server.base_url, backends, args.concurrency, args.max_tokens, args.repeats)
    finally:
        meta["server_memory"] = server.stop()
    masks = mask_times(backends, result["texts"], args.max_tokens, args.mask_repeats)
    _report.publish("guided", {"meta": meta, "result": result, "masks": masks}, report(result, masks, meta),
                    SECTION if args.write_docs else None)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"total {time.perf_counter() - start:.0f} s")
    sys.exit(code)
