"""A lazy name -> implementation registry, one instance per plugin kind."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from tessera.core.errors import PluginLoadError, UnknownPluginError


@dataclass(frozen=True)
class RegistryEntry:
    """One registered implementation: where it lives and which plugin registered it."""

    name: str
    target: str | Any  # "module:attr" (imported on first use) or the object itself
    plugin: str  # the registering plugin's name (entry-point name or module)
    distribution: str | None = None
    version: str | None = None

    @property
    def target_path(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{getattr(self.target, '__module__', '?')}:{getattr(self.target, '__qualname__', repr(self.target))}"


class Registry:
    """Maps names to implementations of one plugin kind; imports a target only when selected."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry] = {}
        self._loaded: dict[str, Any] = {}

    def register(
        self,
        name: str,
        target: str | Any,
        *,
        plugin: str = "<direct>",
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: a lazy target must be 'module:attr', got {target!r}")
        previous = self._entries.get(name)
        if previous is not None and previous.plugin != plugin:
            raise PluginLoadError(
                f"{self.kind} {name!r} is registered twice: by plugin {previous.plugin!r} and by "
                f"{plugin!r}. Disable one with TESSERA_DISABLE_PLUGINS."
            )
        self._entries[name] = RegistryEntry(name, target, plugin, distribution, version)
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[RegistryEntry]:
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> RegistryEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; registered: {known}", param=self.kind
            ) from None

    def get(self, name: str) -> Any:
        """Return the implementation registered as `name`, importing it on first use."""
        if name in self._loaded:
            return self._loaded[name]
        entry = self.entry(name)
        target = entry.target
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except Exception as exc:
                raise PluginLoadError(
                    f"{self.kind} {name!r} from plugin {entry.plugin!r} failed to load "
                    f"({target}): {exc}. Disable it with TESSERA_DISABLE_PLUGINS={entry.plugin}."
                ) from exc
            target = obj
        self._loaded[name] = target
        return target
