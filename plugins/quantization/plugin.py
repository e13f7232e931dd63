"""Entry-point module of the built-in quantization methods, registered by `--quantization` name."""

from __future__ import annotations

from tessera.core.hookspecs import Register, hookimpl


@hookimpl
def tessera_register_quantization_methods(register: Register) -> None:
    register("gguf", "tessera.plugins.quantization.gguf:GgufQuantization")
