"""Entry-point module of the built-in weight loaders, registered by `--load-format` name."""

from __future__ import annotations

from tessera.core.hookspecs import Register, hookimpl


@hookimpl
def tessera_register_weight_loaders(register: Register) -> None:
    register("safetensors", "tessera.plugins.loaders.safetensors_loader:SafetensorsLoader")
    register("pt", "tessera.plugins.loaders.pt_loader:PtLoader")
    register("npcache", "tessera.plugins.loaders.pt_loader:NpcacheLoader")
    register("gguf", "tessera.plugins.loaders.gguf_loader:GgufLoader")
    register("dummy", "tessera.plugins.loaders.dummy_loader:DummyLoader")
