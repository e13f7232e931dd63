"""Offline throughput: tessera `LLM.generate` beside transformers `generate` (bf16, fp32), one run."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hf  # noqa: E402
import _report  # noqa: E402

from tessera.api.bench.datasets import load_tokenizer, random_requests  # noqa: E402
from tessera.core.model_source import default_model_path  # noqa: E402


def run_tessera(prompts: list[list[int]], output_len: int, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(None, **engine_kwargs)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_output = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    dtype = str(getattr(llm.config.model, "dtype", "auto"))
    del llm
    gc.collect()
    return {"engine": "tessera LLM.generate", "dtype": dtype, "elapsed_s": elapsed, "load_s": load_s,
            "num_output_tokens": num_output}


def run_hf(gguf: str, prompts: list[list[int]], output_len: int, dtype_name: str,
           batch_size: int) -> dict[str, Any]:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    start = time.perf_counter()
    model, _ = _hf.load_from_gguf(gguf, dtype)
    load_s = time.perf_counter() - start

    def generate(batch: list[list[int]], new_tokens: int) -> int:
        ids = torch.tensor(batch)  # equal-length prompts: no padding needed
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    generate(prompts[:2], 8)  # warm-up
    start = time.perf_counter()
    num_output = sum(generate(prompts[i:i + batch_size], output_len) for i in range(0, len(prompts), batch_size))
    elapsed = time.perf_counter() - start
    return {"engine": f"transformers generate (batch {batch_size})", "dtype": dtype_name,
            "elapsed_s": elapsed, "load_s": load_s, "num_output_tokens": num_output}


def run_hf_generate_batch(gguf: str, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    import torch

    model, _ = _hf.load_from_gguf(gguf, torch.bfloat16)
    _hf.generate_batch_throughput(model, prompts[:2], 8)  # warm-up
    got = _hf.generate_batch_throughput(model, prompts, output_len)
    return {"engine": "transformers generate_batch (continuous batching)", "dtype": "bf16",
            "elapsed_s": got["duration"], "load_s": 0.0, "num_output_tokens": got["total_output_tokens"]}


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mine = rows[0]["num_output_tokens"] / rows[0]["elapsed_s"]
    body = []
    for row in rows:
        tps = row["num_output_tokens"] / row["elapsed_s"]
        body.append([row["engine"], row["dtype"], f"{row['num_output_tokens']}", f"{row['elapsed_s']:.2f}",
                     f"{tps:,.0f}", f"{mine / tps:.2f}"])
    return "\n".join([
        "## Offline throughput: tessera beside transformers",
        "",
        f"Date: {meta['date']}. Machine: {_report.machine_line(meta['machine'])}.",
        f"SmolLM2-135M-Instruct from `{os.path.basename(meta['gguf'])}` (transformers dequantizes the same "
        f"GGUF). {meta['num_prompts']} prompts of {meta['input_len']} tokens, {meta['output_len']} output "
        "tokens each, greedy, EOS ignored; one warm-up call per engine, not timed. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        _report.table(["engine", "dtype", "output tokens", "seconds", "output tok/s", "tessera / this"], body),
        "",
        "Command:",
        "",
        "```",
        meta["command"],
        "```",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="transformers generate's batch.")
    parser.add_argument("--hf-dtypes", default="bf16,fp32")
    parser.add_argument("--with-generate-batch", action="store_true",
                        help="Also measure transformers' continuous batching (generate_batch, bf16).")
    parser.add_argument("--tessera-dtype", default=None, help="dtype= for tessera's LLM (default: auto).")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    gguf = default_model_path()
    tokenizer = load_tokenizer(gguf)
    reqs = random_requests(tokenizer, args.num_prompts, args.input_len, args.output_len, seed=0)
    prompts = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in reqs]
    assert all(len(p) == args.input_len for p in prompts)
    engine_kwargs = {"dtype": args.tessera_dtype} if args.tessera_dtype else {}
    rows = [run_tessera(prompts, args.output_len, engine_kwargs)]
    print(rows[-1], flush=True)
    for dtype in [d.strip() for d in args.hf_dtypes.split(",") if d.strip()]:
        rows.append(run_hf(gguf, prompts, args.output_len, dtype, args.hf_batch_size))
        print(rows[-1], flush=True)
    if args.with_generate_batch:
        rows.append(run_hf_generate_batch(gguf, prompts, args.output_len))
        print(rows[-1], flush=True)
    meta = {
        "date": _report.now(), "machine": _report.machine(), "gguf": gguf,
        "versions": _report.versions("tessera", "torch", "transformers"),
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "command": " ".join([os.path.relpath(sys.executable, _report.REPO), *sys.argv]),
    }
    _report.publish("offline_vs_hf", {"meta": meta, "rows": rows}, report(rows, meta),
                    None if args.no_doc else "offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
