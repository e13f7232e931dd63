"""`--load-format pt` (PyTorch *.bin shards) and `npcache` (the same, cached as .npy for fast reloads)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ConfigError
from tessera.core.interfaces.weight_loader import LoadedModelFiles, WeightLoader
from tessera.plugins.loaders.common import load_hf_files, progress, weight_files

logger = logging.getLogger(__name__)
INDEX = "pytorch_model.bin.index.json"
NPCACHE_MANIFEST = "weight_names.json"


class PtLoader(WeightLoader):
    name = "pt"

    def __init__(self, load_config: Any = None) -> None:
        self.load_config = load_config

    def _files(self, path: str) -> list[str]:
        ignore = list(getattr(self.load_config, "ignore_patterns", ())) + ["training_args.bin", "optimizer*.bin"]
        return [f for f in weight_files(path, ".bin", INDEX, ignore) if os.path.basename(f) != "tokenizer.bin"]

    def can_load(self, path: str) -> bool:
        return bool(self._files(path))

    def load_files(self, path: str, model_config: Any) -> LoadedModelFiles:
        return load_hf_files(path, model_config)

    def iter_weights(self, path: str, model_config: Any, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        files = self._files(path)
        if not files:
            raise ConfigError(f"no PyTorch *.bin weight files in {path}", param="load_format")
        for file in progress(files, len(files), "Loading pt shards"):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


class NpcacheLoader(PtLoader):
    """Reads the *.bin shards once and writes every tensor as an .npy file; later loads memory-map
    those. The cache sits under `--download-dir` (or ~/.cache/tessera) in `npcache/<hash of the
    model folder and its shard sizes>`, so a changed checkpoint gets a fresh cache."""

    name = "npcache"

    def cache_dir(self, path: str) -> str:
        files = self._files(path)
        key = json.dumps([os.path.abspath(path)] + [[f, os.path.getsize(f)] for f in files])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        root = getattr(self.load_config, "download_dir", None) or os.path.join(
            os.path.expanduser("~"), ".cache", "tessera"
        )
        return os.path.join(root, "npcache", digest)

    def iter_weights(self, path: str, model_config: Any, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        cache = self.cache_dir(path)
        manifest = os.path.join(cache, NPCACHE_MANIFEST)
        if not os.path.isfile(manifest):
            self._write_cache(path, model_config, hf_config, cache)
        with open(manifest) as f:
            entries = json.load(f)
        for entry in progress(entries, len(entries), "Loading npcache"):
            array = np.load(os.path.join(cache, entry["file"]), mmap_mode="r")
            tensor = torch.from_numpy(np.array(array))  # a private, writable copy
            if entry["dtype"] == "bfloat16":  # numpy has no bfloat16: stored as its raw 16 bits
                tensor = tensor.view(torch.bfloat16)
            yield entry["name"], tensor

    def _write_cache(self, path: str, model_config: Any, hf_config: Any, cache: str) -> None:
        logger.info("npcache: converting %s into %s", path, cache)
        partial = cache + f".tmp{os.getpid()}"
        os.makedirs(partial, exist_ok=True)
        entries = []
        for i, (name, tensor) in enumerate(super().iter_weights(path, model_config, hf_config)):
            dtype = str(tensor.dtype).removeprefix("torch.")
            array = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
            file = f"{i:05d}.npy"
            np.save(os.path.join(partial, file), array)
            entries.append({"name": name, "file": file, "dtype": dtype})
        with open(os.path.join(partial, NPCACHE_MANIFEST), "w") as f:
            json.dump(entries, f)
        try:
            os.replace(partial, cache)  # atomic: a concurrent writer's cache wins, ours is dropped
        except OSError:
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
