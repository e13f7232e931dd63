"""`--tool-parser-plugin FILE`: import a Python file by path and register the tool parsers it defines."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import sys
from types import ModuleType
from typing import Any

from tessera.core.errors import ConfigError, PluginLoadError
from tessera.core.interfaces.tool_parser import ToolParser
from tessera.core.registry import Registry

logger = logging.getLogger(__name__)


def _import_file(path: str) -> ModuleType:
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"tessera_tool_parser_plugin_{''.join(ch if ch.isalnum() else '_' for ch in stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--tool-parser-plugin {path!r} cannot be imported: it must be a .py file", param="tool_parser_plugin")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginLoadError(
            f"--tool-parser-plugin {path!r} failed to import: {exc!r}. Fix the file or drop the flag.",
            param="tool_parser_plugin",
        ) from exc
    return module


def load_tool_parser_file(path: str, registry: Registry) -> list[str]:
    """Import the .py file at `path` and register its tool parsers in `registry`; return their names.

    A module-level `register_tool_parsers(register)` function, if the file has one, does the
    registering (`register(name, ToolParserSubclass)`). Otherwise every ToolParser subclass the
    file defines with a string class attribute `name` is registered under that name.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"--tool-parser-plugin {path!r}: no such file", param="tool_parser_plugin")
    if not path.endswith(".py"):
        raise ConfigError(f"--tool-parser-plugin {path!r}: expected a .py file", param="tool_parser_plugin")
    module = _import_file(path)
    plugin = f"file:{path}"
    names: list[str] = []

    def register(name: str, target: Any) -> None:
        if not isinstance(target, str) and not (inspect.isclass(target) and issubclass(target, ToolParser)):
            raise PluginLoadError(
                f"--tool-parser-plugin {path!r}: {name!r} is {target!r}, not a ToolParser subclass",
                param="tool_parser_plugin",
            )
        registry.register(name, target, plugin=plugin)
        names.append(name)

    hook = getattr(module, "register_tool_parsers", None)
    if callable(hook):
        try:
            hook(register)
        except (PluginLoadError, ConfigError):
            raise
        except Exception as exc:
            raise PluginLoadError(
                f"--tool-parser-plugin {path!r}: register_tool_parsers failed: {exc!r}", param="tool_parser_plugin"
            ) from exc
    else:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, ToolParser) or inspect.isabstract(cls):
                continue
            name = cls.__dict__.get("name")
            if isinstance(name, str) and name:
                register(name, cls)
    if not names:
        raise ConfigError(
            f"--tool-parser-plugin {path!r} registers no tool parser: define a ToolParser subclass "
            f"with a class attribute name = '...', or a function register_tool_parsers(register)",
            param="tool_parser_plugin",
        )
    logger.info("tool parsers %s loaded from %s", ", ".join(names), path)
    return names
