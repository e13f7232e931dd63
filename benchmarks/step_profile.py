"""Where an engine step's time goes: per-phase wall time of offline decoding on the default model.

Runs `LLM.generate` (the engine in this process) for --batch prompts of --prompt-len tokens,
--output-len tokens each with EOS ignored, after an identical warm-up run, and times each phase
of every step by wrapping the engine's own methods:

  schedule        Scheduler.schedule            (which requests run, KV blocks)
  prepare inputs  ModelRunner._prepare_inputs   (flat token ids, positions, attention layout)
  forward         ModelRunner.forward           (the model, compiled unless --enforce-eager), and
                  and the model's decoder stack (StackedForward) where it has one
  lm head         model.compute_logits          (hidden states -> logits)
  sampling        build_sampling_batch + sample
  update          Scheduler.update_from_output  (append tokens, stop checks, free blocks)
  detokenize      OutputProcessor.process       (incremental detokenization, stop strings)

The HTTP share is what a served request adds on top: compare the single-stream TPOT of
`benchmarks/compare_peers.py` with this script's per-step time at --batch 1.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

from tessera import LLM, SamplingParams
from tessera.core.engine.engine_core import EngineCore
from tessera.core.engine.output_processor import OutputProcessor
from tessera.core.engine.scheduler import Scheduler
from tessera.core.interfaces.decoder_stack import StackedForward
from tessera.core.model_source import default_model_path
from tessera.core.worker import model_runner
from tessera.core.worker.compilation import CompiledForward
from tessera.core.worker.model_runner import ModelRunner
from tessera.plugins.models.llama import LlamaForCausalLM

PHASES = {  # label -> (class or module, attribute): wrapped before any engine exists, so the
    # compiled forward is traced with its final surroundings and never recompiles mid-run
    "schedule": (Scheduler, "schedule"),
    "prepare inputs": (ModelRunner, "_prepare_inputs"),
    "forward": (CompiledForward, "__call__"),
    "lm head": (LlamaForCausalLM, "compute_logits"),
    "sampling": (model_runner, "build_sampling_batch"),
    "sampling ": (model_runner, "sample"),  # summed with the line above
    "update": (Scheduler, "update_from_output"),
    "detokenize": (OutputProcessor, "process"),
}


class Timer:
    """Sums wall time per label while `active`; counts engine steps."""

    def __init__(self) -> None:
        self.active = False
        self.steps = 0
        self.seconds: collections.Counter[str] = collections.Counter()

    def reset(self, active: bool) -> None:
        self.active, self.steps = active, 0
        self.seconds.clear()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label.strip()] += time.perf_counter() - start

        setattr(owner, name, timed)

    def wrap_step(self) -> None:
        inner = EngineCore.step

        def counted(engine: EngineCore) -> Any:
            self.steps += self.active
            return inner(engine)

        EngineCore.step = counted  # type: ignore[method-assign]


TIMER = Timer()


def install(enforce_eager: bool) -> None:
    for label, (owner, name) in PHASES.items():
        if label == "forward" and enforce_eager:
            owner, name = LlamaForCausalLM, "__call__"
        TIMER.wrap(owner, name, label)
    TIMER.wrap(StackedForward, "__call__", "forward")  # the platform's decoder stack, where the model has one
    TIMER.wrap_step()


def profile(llm: LLM, batch: int, prompt_len: int, output_len: int) -> dict[str, Any]:
    prompts = [[1000 + i + j for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    TIMER.reset(active=False)
    llm.generate([[7, *p[1:]] for p in prompts], params)  # warm-up: same shapes, other tokens
    TIMER.reset(active=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    TIMER.active = False
    steps = TIMER.steps
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    phases = {label: seconds * 1e3 / steps for label, seconds in TIMER.seconds.items()}
    phases["other (engine loop, Python)"] = elapsed * 1e3 / steps - sum(phases.values())
    return {"batch": batch, "steps": steps, "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "ms_per_step": elapsed * 1e3 / steps, "phases_ms": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    install(args.enforce_eager)
    results = []
    for batch in args.batch:
        start = time.perf_counter()
        llm = LLM(default_model_path(), max_num_seqs=batch, seed=0, enforce_eager=args.enforce_eager)
        start_s = time.perf_counter() - start
        compile_s = llm.engine.runner.compile_seconds
        result = profile(llm, batch, args.prompt_len, args.output_len)
        result.update(start_s=start_s, compile_s=compile_s)
        results.append(result)
        del llm
    print(f"| phase (ms per step, {args.prompt_len}-token prompts, {args.output_len} output tokens) | "
          + " | ".join(f"batch {r['batch']}" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for label in results[0]["phases_ms"]:
        print(f"| {label} | " + " | ".join(f"{r['phases_ms'][label]:.2f}" for r in results) + " |")
    print("| **step (wall)** | " + " | ".join(f"**{r['ms_per_step']:.2f}**" for r in results) + " |")
    print("| output tok/s (prefill included) | " + " | ".join(f"{r['tokens_per_s']:.0f}" for r in results) + " |")
    print("| engine start-up s (of which compile) | " + " | ".join(
        f"{r['start_s']:.1f} ({r['compile_s']:.1f})" if r["compile_s"] is not None else f"{r['start_s']:.1f} (none)"
        for r in results) + " |")


if __name__ == "__main__":
    main()
