"""Turn a ModelConfig into a loaded model: locate it, pick loader and architecture, build, fill weights."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from tessera.core.config import LoadConfig, ModelConfig
from tessera.core.errors import ConfigError, UnknownPluginError
from tessera.core.model_source import resolve_model_path
from tessera.core.plugins import PluginSet, get_plugins

logger = logging.getLogger(__name__)

# `--load-format auto` tries these first, in order; other registered loaders follow by name.
AUTO_ORDER_FILE = ("gguf", "safetensors", "pt")
AUTO_ORDER_FOLDER = ("safetensors", "pt", "gguf")
_NEVER_AUTO = ("dummy", "npcache")
_SCALED_ROPE_TYPES = ("linear", "dynamic")  # types that stretch max_position_embeddings by `factor`


@dataclass
class LoadedModel:
    """A model ready to run, with everything the engine and the API need to know about it."""

    model: Any  # torch.nn.Module implementing ModelArchitecture
    hf_config: Any
    tokenizer: Any | None
    chat_template: str | None
    dtype: Any  # torch.dtype
    device: Any  # torch.device
    attention_backend: Any
    model_path: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    load_format: str = "auto"
    load_seconds: float = 0.0


def select_loader(path: str, load_config: LoadConfig, plugins: PluginSet) -> tuple[str, Any]:
    """(name, instance) of the weight loader for `path`. Loaders are constructed as `cls(load_config)`."""
    registry = plugins.weight_loaders
    if load_config.load_format != "auto":
        return load_config.load_format, registry.get(load_config.load_format)(load_config)
    preferred = AUTO_ORDER_FILE if os.path.isfile(path) else AUTO_ORDER_FOLDER
    names = [n for n in preferred if n in registry]
    names += [n for n in registry.names() if n not in names and n not in _NEVER_AUTO]
    for name in names:
        loader = registry.get(name)(load_config)
        if loader.can_load(path):
            return name, loader
    raise ConfigError(
        f"no weight loader recognizes {path} (tried {', '.join(names)}); expected a .gguf file or a "
        "Hugging Face folder with *.safetensors or *.bin weights. Pick one with --load-format",
        param="load_format",
    )


def apply_rope_overrides(hf_config: Any, rope_scaling: dict[str, Any] | None, rope_theta: float | None) -> None:
    """Apply `--rope-scaling` / `--rope-theta` to the config, in whichever layout it uses
    (transformers 5: `rope_parameters`; older: `rope_scaling` + `rope_theta`)."""
    if not rope_scaling and rope_theta is None:
        return
    scaling = dict(rope_scaling or {})
    if "type" in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if getattr(hf_config, "rope_parameters", None) is not None:
        params = dict(hf_config.rope_parameters)
        params.update(scaling)
        if rope_theta is not None:
            params["rope_theta"] = rope_theta
        hf_config.rope_parameters = params
        return
    if scaling:
        hf_config.rope_scaling = {**(getattr(hf_config, "rope_scaling", None) or {}), **scaling}
    if rope_theta is not None:
        hf_config.rope_theta = rope_theta


def derive_max_model_len(hf_config: Any, requested: int | None) -> int:
    """The context length: the model's (stretched by linear/dynamic rope scaling), capped by
    `--max-model-len`. Asking for more than the model has is an error unless rope scaling is set."""
    from tessera.core.layers.rotary import rope_parameters

    derived = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length"):
        derived = getattr(hf_config, key, None)
        if derived:
            break
    rope = rope_parameters(hf_config)
    if derived and rope["rope_type"] in _SCALED_ROPE_TYPES and "original_max_position_embeddings" not in rope:
        derived = int(derived * float(rope.get("factor", 1.0)))
    if derived is None:
        derived = requested or 2048
        logger.warning("the config has no maximum length; using %d", derived)
    if requested is None:
        return int(derived)
    if requested > derived and rope["rope_type"] == "default":
        raise ConfigError(
            f"max_model_len={requested} is larger than the model's maximum length ({derived}); "
            "lower --max-model-len, or extend the context with --rope-scaling",
            param="max_model_len",
        )
    return requested


def _checkpoint_dtype(files: Any, hf_config: Any) -> Any:
    import torch

    dtype = files.extra.get("checkpoint_dtype") or getattr(hf_config, "dtype", None) or getattr(
        hf_config, "torch_dtype", None
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _eos_token_ids(path: str, hf_config: Any, tokenizer: Any | None) -> tuple[int, ...]:
    candidates: list[Any] = []
    generation_config = os.path.join(path, "generation_config.json") if os.path.isdir(path) else ""
    if generation_config and os.path.isfile(generation_config):
        import json

        with open(generation_config) as f:
            candidates.append(json.load(f).get("eos_token_id"))
    candidates.append(getattr(hf_config, "eos_token_id", None))
    candidates.append(getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None)
    ids: list[int] = []
    for value in candidates:
        for token_id in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _quantization(
    model_config: ModelConfig, hf_config: Any, plugins: PluginSet, loader_default: str | None = None
) -> Any | None:
    """The QuantizationMethod from `--quantization` ("none": no method), else from the checkpoint's
    quantization_config, else the loader's default (`gguf` for GGUF files) when it is registered."""
    if model_config.quantization in ("none", "None"):
        return None
    hf_quant = getattr(hf_config, "quantization_config", None)
    if hf_quant is not None and not isinstance(hf_quant, dict):
        hf_quant = hf_quant.to_dict()
    name = model_config.quantization or (hf_quant or {}).get("quant_method")
    if name is None and loader_default in plugins.quantization_methods:
        name = loader_default
    if name is None:
        return None
    return plugins.quantization_methods.get(name).from_config(hf_quant)


def load_model(
    model_config: ModelConfig, load_config: LoadConfig, platform: Any, plugins: PluginSet | None = None
) -> LoadedModel:
    """Locate, configure, build and fill the model described by `model_config` on `platform`."""
    import torch

    from tessera.core.layers import LayerContext

    start = time.perf_counter()
    plugins = plugins or get_plugins()
    path = resolve_model_path(model_config.model, model_config.revision)
    load_format, loader = select_loader(path, load_config, plugins)
    files = loader.load_files(path, model_config)
    hf_config = files.hf_config
    apply_rope_overrides(hf_config, model_config.rope_scaling, model_config.rope_theta)
    max_model_len = derive_max_model_len(hf_config, model_config.max_model_len)

    architectures = getattr(hf_config, "architectures", None) or []
    registry = plugins.model_architectures
    arch = next((a for a in architectures if a in registry), None)
    if arch is None:
        raise UnknownPluginError(
            f"model architecture {', '.join(architectures) or '(none in config)'} is not supported; "
            f"registered: {', '.join(registry.names()) or 'none'}",
            param="model",
        )
    model_cls = registry.get(arch)

    dtype = platform.resolve_dtype(model_config.dtype, _checkpoint_dtype(files, hf_config))
    device = platform.torch_device()
    backend = platform.make_attention_backend()
    quantization = _quantization(model_config, hf_config, plugins, files.extra.get("quantization"))
    context = LayerContext(dtype, device, backend, quantization=quantization, platform=platform)
    with torch.device(device):
        model = model_cls(hf_config, model_config, context)
    loaded = model.load_weights(loader.iter_weights(path, model_config, hf_config))
    missing = sorted(set(dict(model.named_parameters())) - set(loaded))
    if missing:
        raise ConfigError(
            f"the checkpoint at {path} lacks {len(missing)} weights of {arch}, e.g. {', '.join(missing[:5])}",
            param="model",
        )
    model.eval()
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s) from %s in %.1f s", arch, load_format, dtype, path, seconds)
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        tokenizer=files.tokenizer,
        chat_template=files.chat_template,
        dtype=dtype,
        device=device,
        attention_backend=backend,
        model_path=path,
        max_model_len=max_model_len,
        eos_token_ids=_eos_token_ids(path, hf_config, files.tokenizer),
        vocab_size=int(hf_config.vocab_size),
        load_format=load_format,
        load_seconds=seconds,
    )
