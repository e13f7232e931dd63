"""`--load-format safetensors`: Hugging Face folders with *.safetensors shards (memory-mapped)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from tessera.core.errors import ConfigError
from tessera.core.interfaces.weight_loader import LoadedModelFiles, WeightLoader
from tessera.plugins.loaders.common import load_hf_files, progress, weight_files

INDEX = "model.safetensors.index.json"


class SafetensorsLoader(WeightLoader):
    name = "safetensors"

    def __init__(self, load_config: Any = None) -> None:
        self.load_config = load_config

    def _files(self, path: str) -> list[str]:
        ignore = getattr(self.load_config, "ignore_patterns", ())
        return weight_files(path, ".safetensors", INDEX, ignore)

    def can_load(self, path: str) -> bool:
        return bool(self._files(path))

    def load_files(self, path: str, model_config: Any) -> LoadedModelFiles:
        return load_hf_files(path, model_config)

    def iter_weights(self, path: str, model_config: Any, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        files = self._files(path)
        if not files:
            raise ConfigError(f"no *.safetensors files in {path}", param="load_format")
        handles = [safe_open(f, framework="pt") for f in files]
        names = [(handle, name) for handle in handles for name in handle.keys()]  # noqa: SIM118
        for handle, name in progress(names, len(names), "Loading safetensors"):
            yield name, handle.get_tensor(name)
