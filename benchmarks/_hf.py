"""Hugging Face transformers as a peer: the GGUF as a safetensors folder, and offline generate_batch."""

from __future__ import annotations

import os
import time
from typing import Any

CACHE = os.environ.get("TESSERA_BENCH_CACHE", os.path.expanduser("~/.cache/tessera-bench"))


def load_from_gguf(gguf_path: str, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file, dequantized to `dtype` by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tokenizer


def hf_folder(gguf_path: str) -> str:
    """A safetensors copy of the GGUF's (dequantized, fp32) weights for `transformers serve`, whose
    GGUF path loses the architecture name; built once under the cache, outside the repo."""
    import torch
    from transformers import AutoConfig

    out = os.path.join(CACHE, os.path.basename(gguf_path).removesuffix(".gguf") + "-hf")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    model, tokenizer = load_from_gguf(gguf_path, torch.float32)
    config = AutoConfig.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    config.architectures = [type(model).__name__]
    # a model loaded from GGUF refuses save_pretrained; a fresh one with the same weights does not
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def no_eos_generation_config(max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    # eos_token_id=-1 is continuous batching's "no EOS": every request runs to max_new_tokens
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=-1, do_sample=False)


def generate_batch_throughput(model: Any, prompts: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    """Offline continuous batching (`generate_batch`) over all prompts at once."""
    config = no_eos_generation_config(max_new_tokens)
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    elapsed = time.perf_counter() - start
    num_output = sum(len(r.generated_tokens) for r in results.values())
    return {
        "duration": elapsed,
        "completed": len(results),
        "total_output_tokens": num_output,
        "output_throughput": num_output / elapsed,
        "request_throughput": len(results) / elapsed,
    }


def generate_throughput(model: Any, prompts: list[list[int]], max_new_tokens: int,
                        batch_size: int) -> dict[str, float]:
    """Static batches through `generate` (left-padded), EOS suppressed by min_new_tokens."""
    import torch

    start = time.perf_counter()
    num_output = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # (batch, width)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        num_output += int(out.shape[0] * (out.shape[1] - width))
    elapsed = time.perf_counter() - start
    return {
        "duration": elapsed,
        "completed": len(prompts),
        "total_output_tokens": num_output,
        "output_throughput": num_output / elapsed,
        "request_throughput": len(prompts) / elapsed,
    }
