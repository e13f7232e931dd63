"""Entry-point module of this built-in plugin: its hookimpls register its implementations."""

from tessera.core.hookspecs import hookimpl  # noqa: F401
