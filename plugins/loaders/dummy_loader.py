"""`--load-format dummy`: random weights of the right shapes, for benchmarks and tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from tessera.core.interfaces.weight_loader import LoadedModelFiles, WeightLoader
from tessera.plugins.loaders.common import load_hf_files, progress
from tessera.plugins.loaders.gguf_loader import GgufLoader, find_gguf_file


def hf_parameter_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Hugging Face model's parameters, from a model built on the meta
    device (no memory, no initialization)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


class DummyLoader(WeightLoader):
    """Config and tokenizer come from the model location (a folder or a GGUF file); the weights
    are drawn from N(0, initializer_range), norm weights are ones. Seeded by `--seed`."""

    name = "dummy"

    def __init__(self, load_config: Any = None) -> None:
        self.load_config = load_config

    def can_load(self, path: str) -> bool:
        return False  # never chosen by `--load-format auto`

    def load_files(self, path: str, model_config: Any) -> LoadedModelFiles:
        if find_gguf_file(path) is not None:
            files = GgufLoader(self.load_config).load_files(path, model_config)
            files.extra.pop("checkpoint_dtype", None)
            return files
        return load_hf_files(path, model_config)

    def iter_weights(self, path: str, model_config: Any, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(getattr(model_config, "seed", 0))
        std = float(getattr(hf_config, "initializer_range", 0.02) or 0.02)
        shapes = hf_parameter_shapes(hf_config)
        for name, shape in progress(shapes.items(), len(shapes), "Dummy weights"):
            if len(shape) == 1 and "norm" in name:
                yield name, torch.ones(shape)
            else:
                yield name, torch.randn(shape, generator=generator) * std
