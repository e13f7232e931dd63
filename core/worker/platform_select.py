"""Pick the device platform for `--device`: a named one, or the best available one for `auto`."""

from __future__ import annotations

from typing import Any

from tessera.core.config import DeviceConfig
from tessera.core.errors import ConfigError
from tessera.core.plugins import PluginSet, get_plugins


def select_platform(device_config: DeviceConfig, plugins: PluginSet | None = None) -> Any:
    """An instance of the chosen Platform. `auto`: the available platform with the highest
    priority; a name: that platform, or a ConfigError if it cannot run here."""
    registry = (plugins or get_plugins()).platforms
    if device_config.device == "auto":
        candidates = [registry.get(name) for name in registry.names()]
        available = [cls for cls in candidates if cls.is_available()]
        if not available:
            raise ConfigError(f"no device platform is available (registered: {', '.join(registry.names()) or 'none'})")
        return max(available, key=lambda cls: cls.priority)()
    cls = registry.get(device_config.device)  # UnknownPluginError names the registered ones
    if not cls.is_available():
        usable = [name for name in registry.names() if registry.get(name).is_available()]
        raise ConfigError(
            f"device {device_config.device!r} is not available on this machine; available: "
            f"{', '.join(usable) or 'none'} (or use --device auto)",
            param="device",
        )
    return cls()
