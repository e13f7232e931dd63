"""Entry-point module of the CPU platform plugin: registers the "cpu" device."""

from __future__ import annotations

from tessera.core.hookspecs import Register, hookimpl


@hookimpl
def tessera_register_platforms(register: Register) -> None:
    register("cpu", "tessera.backends.cpu.platform:CpuPlatform")
