"""The lazy Registry: imports on first use, names what is registered, refuses double registration."""

from __future__ import annotations

import sys

import pytest

from tessera.core.errors import PluginLoadError, UnknownPluginError
from tessera.core.registry import Registry


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    name = "tessera_test_lazy_target"
    (tmp_path / f"{name}.py").write_text("class Impl:\n    value = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_target_is_imported_only_on_get(lazy_module):
    registry = Registry("tool_parser")
    registry.register("lazy", f"{lazy_module}:Impl", plugin="p")
    assert "lazy" in registry and registry.names() == ["lazy"]
    assert registry.entry("lazy").target_path == f"{lazy_module}:Impl"
    assert lazy_module not in sys.modules
    impl = registry.get("lazy")
    assert lazy_module in sys.modules and impl.value == 42
    assert registry.get("lazy") is impl


def test_objects_register_directly():
    class Direct:
        pass

    registry = Registry("platform")
    registry.register("direct", Direct, plugin="p", distribution="dist", version="1.0")
    assert registry.get("direct") is Direct
    entry = registry.entry("direct")
    assert (entry.plugin, entry.distribution, entry.version) == ("p", "dist", "1.0")
    assert entry.target_path.endswith(":test_objects_register_directly.<locals>.Direct")


def test_unknown_name_lists_the_registered_ones():
    registry = Registry("tool_parser")
    registry.register("hermes", "x:Y", plugin="p")
    registry.register("mistral", "x:Z", plugin="p")
    with pytest.raises(UnknownPluginError) as exc:
        registry.get("nope")
    assert str(exc.value) == "unknown tool_parser 'nope'; registered: hermes, mistral"
    with pytest.raises(UnknownPluginError, match="registered: none"):
        Registry("platform").get("cuda")


def test_two_plugins_registering_one_name_is_an_error():
    registry = Registry("tool_parser")
    registry.register("hermes", "a:A", plugin="first")
    registry.register("hermes", "a:B", plugin="first")  # the same plugin may replace its own entry
    with pytest.raises(
        PluginLoadError, match="'hermes' is registered twice: by plugin 'first' and by 'second'"
    ):
        registry.register("hermes", "b:B", plugin="second")


def test_bad_lazy_target():
    registry = Registry("weight_loader")
    with pytest.raises(ValueError, match="must be 'module:attr'"):
        registry.register("x", "no_colon", plugin="p")
    registry.register("missing", "tessera_no_such_module_xyz:Thing", plugin="plug")
    with pytest.raises(
        PluginLoadError,
        match="'missing' from plugin 'plug' failed to load.*TESSERA_DISABLE_PLUGINS=plug",
    ):
        registry.get("missing")
