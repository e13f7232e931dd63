"""Weight loaders: turn a model location into a config, a tokenizer and a stream of tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadedModelFiles:
    """What a loader found at a model location."""

    hf_config: Any  # transformers.PretrainedConfig
    tokenizer: Any | None  # a transformers tokenizer or a core.interfaces.Tokenizer (None with --skip-tokenizer-init)
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class WeightLoader(ABC):
    """Registered under a `--load-format` name.

    The engine calls `can_load` (for `--load-format auto`, in registry order of preference),
    then `load_files` once, then `iter_weights` once while the model's `load_weights` consumes
    the stream.
    """

    name: str = "abstract"

    @abstractmethod
    def can_load(self, path: str) -> bool:
        """Called for `--load-format auto`: does `path` hold weights in this format?"""

    @abstractmethod
    def load_files(self, path: str, model_config: Any) -> LoadedModelFiles:
        """Called once at start-up: the HF config and tokenizer for the model at `path`."""

    @abstractmethod
    def iter_weights(self, path: str, model_config: Any, hf_config: Any) -> Iterator[tuple[str, Any]]:
        """Called once: yields (Hugging Face parameter name, tensor) pairs."""
