"""The pluggy hook specifications: one `tessera_register_<kind>` hook per plugin kind.

Each hook receives a `register(name, target)` callback. `target` is either the implementation
itself or a lazy "module:attr" string, imported only when the entry is selected. Hook arguments
are only ever added, never renamed. Every hook here is documented in docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "tessera"
ENTRY_POINT_GROUP = "tessera"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[str, Any], None]


@hookspec
def tessera_register_model_architectures(register: Register) -> None:
    """Register model architectures by the Hugging Face `architectures` name they serve
    (e.g. "LlamaForCausalLM"); targets implement `tessera.core.interfaces.ModelArchitecture`."""


@hookspec
def tessera_register_weight_loaders(register: Register) -> None:
    """Register weight loaders by `--load-format` name (e.g. "safetensors", "gguf");
    targets implement `tessera.core.interfaces.WeightLoader`."""


@hookspec
def tessera_register_quantization_methods(register: Register) -> None:
    """Register quantization methods by `--quantization` name; targets implement
    `tessera.core.interfaces.QuantizationMethod`."""


@hookspec
def tessera_register_tool_parsers(register: Register) -> None:
    """Register tool-call parsers by `--tool-call-parser` name; targets implement
    `tessera.core.interfaces.ToolParser`."""


@hookspec
def tessera_register_guided_decoding_backends(register: Register) -> None:
    """Register guided-decoding backends by `--guided-decoding-backend` name; targets implement
    `tessera.core.interfaces.GuidedDecodingBackend`."""


@hookspec
def tessera_register_platforms(register: Register) -> None:
    """Register device platforms by `--device` name (e.g. "cpu", "cuda"); targets implement
    `tessera.core.interfaces.Platform`."""


@hookspec
def tessera_register_reasoning_parsers(register: Register) -> None:
    """Register reasoning parsers (split a model's thinking from its answer) by name; targets
    implement `tessera.core.interfaces.ReasoningParser`."""


# kind name (as shown by `tessera plugins`) -> hook name
PLUGIN_KINDS: dict[str, str] = {
    "model_architecture": "tessera_register_model_architectures",
    "weight_loader": "tessera_register_weight_loaders",
    "quantization_method": "tessera_register_quantization_methods",
    "tool_parser": "tessera_register_tool_parsers",
    "guided_decoding_backend": "tessera_register_guided_decoding_backends",
    "platform": "tessera_register_platforms",
    "reasoning_parser": "tessera_register_reasoning_parsers",
}
