"""What the Hugging Face folder loaders share: config and tokenizer loading, file selection, progress."""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from tessera.core.errors import ConfigError
from tessera.core.interfaces.weight_loader import LoadedModelFiles
from tessera.core.model_source import resolve_model_path

logger = logging.getLogger(__name__)


def progress(items: Iterable[Any], total: int | None, desc: str) -> Iterator[Any]:
    """Iterate with a tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def weight_files(path: str, suffix: str, index_name: str, ignore_patterns: Iterable[str] = ()) -> list[str]:
    """The weight files with `suffix` in folder `path`: those the index file names when there is
    one, else all of them (minus Mistral's duplicate `consolidated*` files when others exist)."""
    if not os.path.isdir(path):
        return []
    index = os.path.join(path, index_name)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in names]
    else:
        files = sorted(glob.glob(os.path.join(path, f"*{suffix}")))
        preferred = [f for f in files if not os.path.basename(f).startswith("consolidated")]
        files = preferred or files
    patterns = list(ignore_patterns)
    return [f for f in files if not any(fnmatch.fnmatch(os.path.basename(f), p) for p in patterns)]


def load_hf_config(path: str, model_config: Any) -> Any:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"no config.json in {path}; is this a Hugging Face model folder?", param="model")
    return AutoConfig.from_pretrained(path, trust_remote_code=getattr(model_config, "trust_remote_code", False))


def load_hf_tokenizer(path: str, model_config: Any) -> Any | None:
    """The tokenizer from `--tokenizer` (a local path or a cached hub name) or the model folder:
    transformers', or with `--tokenizer-mode mistral` the folder's mistral-common tokenizer file;
    None with `--skip-tokenizer-init`."""
    if getattr(model_config, "skip_tokenizer_init", False):
        return None
    source = getattr(model_config, "tokenizer", None)
    location = resolve_model_path(source, getattr(model_config, "tokenizer_revision", None)) if source else path
    if getattr(model_config, "tokenizer_mode", "auto") == "mistral":
        from tessera.plugins.loaders.mistral_tokenizer import load_mistral_tokenizer

        return load_mistral_tokenizer(location)
    from transformers import AutoTokenizer

    if location.endswith(".gguf") and os.path.isfile(location):
        from tessera.plugins.loaders.gguf_loader import gguf_tokenizer

        return gguf_tokenizer(location)
    try:
        return AutoTokenizer.from_pretrained(
            location,
            trust_remote_code=getattr(model_config, "trust_remote_code", False),
            use_fast=getattr(model_config, "tokenizer_mode", "auto") != "slow",
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a tokenizer from {location}: {exc}. Pass --tokenizer PATH, or "
            "--skip-tokenizer-init to serve token ids only",
            param="tokenizer",
        ) from exc


def load_hf_files(path: str, model_config: Any) -> LoadedModelFiles:
    """Config + tokenizer + chat template of a Hugging Face model folder."""
    hf_config = load_hf_config(path, model_config)
    tokenizer = load_hf_tokenizer(path, model_config)
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(chat_template, dict):  # several named templates: the default one serves chat
        chat_template = chat_template.get("default")
    return LoadedModelFiles(hf_config=hf_config, tokenizer=tokenizer, chat_template=chat_template)
