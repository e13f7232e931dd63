"""Does rounding the default model's layer weights to bf16 change its greedy choices?

transformers' float32 model of the default GGUF (its weights dequantized exactly) is the
reference. Its greedy continuations of --prompts chat prompts (--tokens tokens each) are fed back
(teacher forcing) to two variants, and the share of positions where each picks the reference's
top token is printed:

  exact weights  the inputs of every decoder linear layer rounded to bf16, the weights exact: the
                 arithmetic of tessera's 4-bit kernel (backends/cpu/csrc/group_quant_linear.cpp)
  bf16 weights   the same, with every decoder linear weight also rounded to bf16: what a kernel
                 that dequantizes the 4-bit groups to bf16 would compute

and each variant's greedy answer to the first prompt. docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import os

import torch

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 50.", "What does a compiler do?", "Give me a recipe for pancakes.",
    "Who wrote Romeo and Juliet?", "Translate 'good morning' into Spanish.", "Why is the sky blue?",
    "Summarize the plot of Cinderella.", "What is 17 times 23?", "Name the planets of the solar system.",
    "How do I reverse a list in Python?", "What is the boiling point of water in Fahrenheit?",
    "Describe a cat to someone who has never seen one.", "What are the benefits of exercise?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.core.model_source import default_model_path

    path = str(default_model_path())
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        for p in PROMPTS[: args.prompts]
    ]
    with torch.no_grad():
        sequences = [model.generate(p, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
                     for p in prompts]
        reference = [model(s).logits[0].argmax(-1) for s in sequences]
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(lambda module, inputs: (inputs[0].bfloat16().float(),)) for m in linears]

    def measure(label: str) -> None:
        same = total = 0
        with torch.no_grad():
            for prompt, sequence, ref in zip(prompts, sequences, reference):
                start = prompt.shape[1] - 1
                picked = model(sequence).logits[0].argmax(-1)[start:-1]
                same += int((picked == ref[start:-1]).sum())
                total += picked.numel()
            answer = model.generate(prompts[0], max_new_tokens=16, do_sample=False)[0, prompts[0].shape[1]:]
        print(f"| {label} | {100 * same / total:.2f}% of {total} | {tokenizer.decode(answer)!r} |")

    print("| decoder linear layers | top-1 agreement with float32 | first prompt's greedy answer |")
    print("|---|---:|---|")
    measure("bf16 inputs, exact weights")
    for m in linears:
        m.weight.data = m.weight.data.bfloat16().float()
    measure("bf16 inputs, bf16 weights")
    for hook in hooks:
        hook.remove()


if __name__ == "__main__":
    main()
