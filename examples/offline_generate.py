"""Offline generation with tessera's library API on the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from tessera import LLM, SamplingParams


def main() -> None:
    llm = LLM()  # no model: the embedded default GGUF
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    (answer,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)
    print("chat:", answer.outputs[0].text)

    prompts = ["The three primary colours are", "A haiku about the sea:"]
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=7, n=2)
    for output in llm.generate(prompts, sampled):
        for choice in output.outputs:
            print(f"{output.prompt!r} [{choice.index}] -> {choice.text!r} ({choice.finish_reason})")


if __name__ == "__main__":
    main()
