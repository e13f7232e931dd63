"""The one PluginManager: loads the `tessera` entry-point group and fills one Registry per kind."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tessera.core import hookspecs
from tessera.core.errors import PluginLoadError
from tessera.core.registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class LoadedPlugin:
    name: str
    module: str
    distribution: str | None = None
    version: str | None = None


@dataclass
class PluginSet:
    """The registries built from every loaded plugin."""

    registries: dict[str, Registry]
    plugins: list[LoadedPlugin] = field(default_factory=list)

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    @property
    def model_architectures(self) -> Registry:
        return self.registries["model_architecture"]

    @property
    def weight_loaders(self) -> Registry:
        return self.registries["weight_loader"]

    @property
    def quantization_methods(self) -> Registry:
        return self.registries["quantization_method"]

    @property
    def tool_parsers(self) -> Registry:
        return self.registries["tool_parser"]

    @property
    def guided_decoding_backends(self) -> Registry:
        return self.registries["guided_decoding_backend"]

    @property
    def platforms(self) -> Registry:
        return self.registries["platform"]

    @property
    def reasoning_parsers(self) -> Registry:
        return self.registries["reasoning_parser"]


def _split_names(value: str | None) -> set[str] | None:
    if value is None or not value.strip():
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def load_plugins(
    *,
    allow: str | None = None,
    disable: str | None = None,
    extra_modules: list[str] | tuple[str, ...] = (),
) -> PluginSet:
    """Load entry-point plugins (filtered by the allow/deny lists) plus `extra_modules`.

    `allow` and `disable` are comma-separated plugin (entry-point) names, as in the
    TESSERA_PLUGINS and TESSERA_DISABLE_PLUGINS environment variables.
    """
    allowed = _split_names(allow)
    disabled = _split_names(disable) or set()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    loaded: list[LoadedPlugin] = []

    for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if entry_point.name in disabled or (allowed is not None and entry_point.name not in allowed):
            logger.debug("plugin %s skipped by the allow/deny lists", entry_point.name)
            continue
        if manager.has_plugin(entry_point.name):
            continue  # the same distribution seen twice on sys.path
        try:
            module = entry_point.load()
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {entry_point.name!r} ({entry_point.value}) failed to import: {exc}. "
                f"Fix or uninstall it, or disable it with TESSERA_DISABLE_PLUGINS={entry_point.name}."
            ) from exc
        dist = entry_point.dist
        manager.register(module, name=entry_point.name)
        loaded.append(
            LoadedPlugin(
                entry_point.name,
                entry_point.value,
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
            )
        )

    for module_name in extra_modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginLoadError(
                f"plugin module {module_name!r} given by --plugin failed to import: {exc}"
            ) from exc
        if not manager.has_plugin(module_name):
            manager.register(module, name=module_name)
            loaded.append(LoadedPlugin(module_name, module_name))

    registries = {kind: Registry(kind) for kind in hookspecs.PLUGIN_KINDS}
    by_name = {plugin.name: plugin for plugin in loaded}
    for kind, hook_name in hookspecs.PLUGIN_KINDS.items():
        hook = getattr(manager.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin = by_name[impl.plugin_name]
            registry = registries[kind]

            def register(name: str, target: Any, _plugin: LoadedPlugin = plugin, _registry: Registry = registry) -> None:
                _registry.register(
                    name, target, plugin=_plugin.name,
                    distribution=_plugin.distribution, version=_plugin.version,
                )

            try:
                impl.function(register=register)
            except PluginLoadError:
                raise
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {plugin.name!r} failed in {hook_name}: {exc}. "
                    f"Disable it with TESSERA_DISABLE_PLUGINS={plugin.name}."
                ) from exc
    return PluginSet(registries, loaded)


def load_plugins_from_env(extra_modules: list[str] | tuple[str, ...] = ()) -> PluginSet:
    """`load_plugins` with the allow/deny lists read from the environment (via core.config)."""
    from tessera.core.config import plugin_env

    allow, disable = plugin_env()
    return load_plugins(allow=allow, disable=disable, extra_modules=extra_modules)


_default: PluginSet | None = None


def get_plugins() -> PluginSet:
    """The process-wide plugin set, loaded once from the environment."""
    global _default
    if _default is None:
        _default = load_plugins_from_env()
    return _default


def set_plugins(plugins: PluginSet | None) -> None:
    """Replace the process-wide plugin set (the CLI does this after `--plugin`)."""
    global _default
    _default = plugins
