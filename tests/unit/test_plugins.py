"""The PluginManager: allow/deny lists, --plugin modules, and loud failures that name the plugin."""

from __future__ import annotations

import sys
import types

import pytest

from tessera.core import plugins as plugins_module
from tessera.core.errors import PluginLoadError
from tessera.core.hookspecs import ENTRY_POINT_GROUP, PLUGIN_KINDS, hookimpl
from tessera.core.plugins import load_plugins, load_plugins_from_env


def _module(monkeypatch, name: str, **hooks) -> str:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_builtins_load_from_entry_points():
    loaded = {plugin.name: plugin for plugin in load_plugins().plugins}
    assert {"cpu", "models", "loaders", "tool_parsers", "guided"} <= set(loaded)
    assert (
        loaded["cpu"].distribution == "tessera"
        and loaded["cpu"].module == "tessera.backends.cpu.plugin"
    )
    assert set(load_plugins().registries) == set(PLUGIN_KINDS)


def test_allow_list_and_deny_list():
    assert [p.name for p in load_plugins(allow="cpu").plugins] == ["cpu"]
    assert {p.name for p in load_plugins(allow=" cpu , models ").plugins} == {"cpu", "models"}
    names = {p.name for p in load_plugins(disable="cpu,models").plugins}
    assert "cpu" not in names and "models" not in names and "loaders" in names
    assert load_plugins(allow="cpu", disable="cpu").plugins == []  # deny wins


def test_env_lists(monkeypatch):
    monkeypatch.setenv("TESSERA_PLUGINS", "cpu")
    monkeypatch.delenv("TESSERA_DISABLE_PLUGINS", raising=False)
    assert [p.name for p in load_plugins_from_env().plugins] == ["cpu"]
    monkeypatch.delenv("TESSERA_PLUGINS")
    monkeypatch.setenv("TESSERA_DISABLE_PLUGINS", "cpu")
    assert "cpu" not in {p.name for p in load_plugins_from_env().plugins}


def test_extra_module_registers(monkeypatch):
    def tessera_register_tool_parsers(register):
        register("mine", "some.module:Parser")

    name = _module(
        monkeypatch,
        "tessera_test_extra_plugin",
        tessera_register_tool_parsers=tessera_register_tool_parsers,
    )
    plugin_set = load_plugins(allow="none", extra_modules=[name])
    entry = plugin_set.tool_parsers.entry("mine")
    assert entry.plugin == name and entry.target == "some.module:Parser"
    assert [p.name for p in plugin_set.plugins] == [name]


def test_hook_that_raises_names_the_plugin(monkeypatch):
    def tessera_register_weight_loaders(register):
        raise RuntimeError("kaboom")

    name = _module(
        monkeypatch,
        "tessera_test_raising_plugin",
        tessera_register_weight_loaders=tessera_register_weight_loaders,
    )
    with pytest.raises(PluginLoadError) as exc:
        load_plugins(allow="none", extra_modules=[name])
    message = str(exc.value)
    assert name in message and "kaboom" in message and "tessera_register_weight_loaders" in message
    assert f"TESSERA_DISABLE_PLUGINS={name}" in message


def test_extra_module_that_fails_to_import():
    with pytest.raises(
        PluginLoadError, match="'tessera_no_such_plugin_module' given by --plugin failed to import"
    ):
        load_plugins(allow="none", extra_modules=["tessera_no_such_plugin_module"])


def test_two_plugins_same_name(monkeypatch):
    def first(register):
        register("dup", "a:A")

    def second(register):
        register("dup", "b:B")

    a = _module(monkeypatch, "tessera_test_dup_a", tessera_register_platforms=first)
    b = _module(monkeypatch, "tessera_test_dup_b", tessera_register_platforms=second)
    with pytest.raises(PluginLoadError, match="platform 'dup' is registered twice"):
        load_plugins(allow="none", extra_modules=[a, b])


def test_entry_point_that_fails_to_import(monkeypatch):
    class BrokenEntryPoint:
        name = "broken"
        value = "tessera_broken_plugin_module"
        dist = None

        def load(self):
            raise ImportError("No module named 'tessera_broken_plugin_module'")

    def entry_points(group):
        assert group == ENTRY_POINT_GROUP
        return [BrokenEntryPoint()]

    monkeypatch.setattr(plugins_module.importlib.metadata, "entry_points", entry_points)
    with pytest.raises(PluginLoadError) as exc:
        load_plugins()
    assert "plugin 'broken'" in str(exc.value) and "TESSERA_DISABLE_PLUGINS=broken" in str(
        exc.value
    )
    assert load_plugins(disable="broken").plugins == []


def test_get_and_set_plugins():
    from tessera.core.plugins import get_plugins, set_plugins

    custom = load_plugins(allow="cpu")
    set_plugins(custom)
    try:
        assert get_plugins() is custom
    finally:
        set_plugins(None)
    assert get_plugins() is not custom
