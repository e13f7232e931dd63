"""Entry-point module of the built-in model architectures; each registered lazily by HF name."""

from __future__ import annotations

from tessera.core.hookspecs import Register, hookimpl


@hookimpl
def tessera_register_model_architectures(register: Register) -> None:
    register("LlamaForCausalLM", "tessera.plugins.models.llama:LlamaForCausalLM")
    register("MistralForCausalLM", "tessera.plugins.models.llama:MistralForCausalLM")
