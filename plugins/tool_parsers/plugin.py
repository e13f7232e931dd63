"""Entry-point module of this built-in plugin: its hookimpls register its implementations."""

from __future__ import annotations

from tessera.core.hookspecs import Register, hookimpl

TOOL_PARSERS = {
    "hermes": "tessera.plugins.tool_parsers.hermes:HermesToolParser",
    "mistral": "tessera.plugins.tool_parsers.mistral:MistralToolParser",
    "llama3_json": "tessera.plugins.tool_parsers.llama3_json:Llama3JsonToolParser",
    "pythonic": "tessera.plugins.tool_parsers.pythonic:PythonicToolParser",
    "qwen": "tessera.plugins.tool_parsers.qwen:QwenToolParser",
}


@hookimpl
def tessera_register_tool_parsers(register: Register) -> None:
    for name, target in TOOL_PARSERS.items():
        register(name, target)
