"""`--load-format gguf`: llama.cpp GGUF files, dequantized, renamed to Hugging Face names.

Config: for the llama architecture (Llama, Mistral, SmolLM, TinyLlama, ...) it is built straight
from the GGUF metadata (milliseconds); other architectures go through transformers'
`AutoConfig.from_pretrained(folder, gguf_file=...)` (seconds: it re-parses the file).
Tokenizer: transformers' GGUF tokenizer conversion, fed from one metadata read (under a second);
with `--tokenizer-mode mistral`, the mistral-common tokenizer file next to the .gguf file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ConfigError
from tessera.core.interfaces.tokenizer import Tokenizer
from tessera.core.interfaces.weight_loader import LoadedModelFiles, WeightLoader
from tessera.plugins.loaders.common import load_hf_tokenizer, progress
from tessera.plugins.loaders.gguf_file import GgufFile

logger = logging.getLogger(__name__)

_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def find_gguf_file(path: str) -> str | None:
    """`path` itself if it is a .gguf file; the single .gguf file of a folder; else None."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if os.path.isdir(path):
        files = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(files) == 1:
            return os.path.join(path, files[0])
    return None


def gguf_tokenizer(file: str) -> Any:
    """The Hugging Face fast tokenizer described by a GGUF file's `tokenizer.*` metadata."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # older transformers: the public (slower) path
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file))
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(file)
    fast, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=fast, **tokenizer_config, **extra)


def llama_config(gguf: GgufFile) -> Any:
    """A LlamaConfig (MistralConfig for files named Mistral, as transformers does) from metadata."""
    from transformers import LlamaConfig, MistralConfig

    meta, arch = gguf.metadata, gguf.arch_value
    num_heads = arch("attention.head_count")
    hidden_size = arch("embedding_length")
    kwargs: dict[str, Any] = dict(
        vocab_size=arch("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())),
        hidden_size=hidden_size,
        intermediate_size=arch("feed_forward_length"),
        num_hidden_layers=arch("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=arch("attention.head_count_kv", num_heads),
        head_dim=arch("attention.key_length") or arch("rope.dimension_count") or hidden_size // num_heads,
        max_position_embeddings=arch("context_length", 2048),
        rms_norm_eps=arch("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=arch("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    scaling_type = arch("rope.scaling.type")
    if scaling_type not in (None, "none"):
        kwargs["rope_scaling"] = {"rope_type": scaling_type, "factor": arch("rope.scaling.factor", 1.0)}
    if "rope_freqs.weight" in gguf.tensors:
        logger.warning("%s has rope_freqs (Llama 3.1 rope scaling), which is not applied yet", gguf.path)
    if "mistral" in str(meta.get("general.name", "")).lower():
        return MistralConfig(**kwargs, sliding_window=None, architectures=["MistralForCausalLM"])
    return LlamaConfig(**kwargs, architectures=["LlamaForCausalLM"])


def gguf_config(gguf: GgufFile) -> Any:
    if gguf.architecture() == "llama":
        return llama_config(gguf)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.path.dirname(gguf.path), gguf_file=os.path.basename(gguf.path))
    except Exception as exc:
        raise ConfigError(f"cannot build a config for GGUF architecture {gguf.architecture()!r}: {exc}") from exc


def checkpoint_dtype(gguf: GgufFile) -> torch.dtype:
    """The dtype `--dtype auto` should treat this file as: bfloat16 when matrices are quantized
    (dequantized values carry less precision than bf16 keeps), else the matrices' own type."""
    matrices = [info for info in gguf.tensors.values() if len(info.shape) == 2]
    if any(info.is_quantized for info in matrices):
        return torch.bfloat16
    types = {info.ggml_type for info in matrices}
    if types == {0}:
        return torch.float32
    return torch.float16 if 1 in types else torch.bfloat16


def _llama_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _LLAMA_TOP:
        return f"{_LLAMA_TOP[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LLAMA_BLOCK:
        return f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}.{suffix}"
    return None


def _generic_names(gguf: GgufFile, hf_config: Any) -> Callable[[str], str | None]:
    """GGUF -> HF names for any architecture gguf-py knows, through the HF model's parameter names."""
    import gguf as gguf_py
    from transformers import AutoModelForCausalLM

    arch = {name: key for key, name in gguf_py.MODEL_ARCH_NAMES.items()}.get(gguf.architecture())
    if arch is None:
        raise ConfigError(f"GGUF architecture {gguf.architecture()!r} is unknown to the gguf package")
    name_map = gguf_py.get_tensor_name_map(arch, hf_config.num_hidden_layers)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    table = {}
    for hf_name in hf_model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            table[f"{gguf_base}.{suffix}"] = hf_name
    return table.get


def _unpermute_llama_qk(hf_name: str, tensor: torch.Tensor, hf_config: Any) -> torch.Tensor:
    """llama.cpp's converter interleaves the two rotary halves of each Q/K head; undo it."""
    if ".q_proj." in hf_name:
        num_heads = hf_config.num_attention_heads
    elif ".k_proj." in hf_name:
        num_heads = hf_config.num_key_value_heads
    else:
        return tensor
    shape = tensor.shape
    return tensor.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


_FIXUPS: dict[str, Callable[[str, torch.Tensor, Any], torch.Tensor]] = {"llama": _unpermute_llama_qk}


def wants_groups(model_config: Any) -> bool:
    """Whether the `gguf` quantization method is in effect (named, or the default: unset)."""
    return getattr(model_config, "quantization", None) in (None, "gguf")


def _group_bits(hf_name: str) -> int:
    """The widest codes a weight's layer takes as groups: 8 for the token table (embedding, LM
    head), 4 for linear layers (their fallback is torch's int4 kernel), 0 for anything else."""
    if not hf_name.endswith(".weight"):
        return 0
    return 8 if hf_name.startswith(("lm_head.", "model.embed_tokens.")) else 4


def _groups(
    gguf: GgufFile,
    info: Any,
    hf_name: str,
    max_bits: int,
    hf_config: Any,
    fixup: Callable[..., torch.Tensor] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`<layer>.qweight` and `<layer>.scales_zeros` for a Q4_0 / Q4_1 / Q8_0 matrix whose codes fit
    `max_bits` (nothing otherwise)."""
    groups = gguf.load_groups(info, max_bits)
    if groups is None:
        return
    base = hf_name.removesuffix(".weight")
    for suffix, array in zip((".qweight", ".scales_zeros"), groups, strict=True):
        tensor = torch.from_numpy(array)
        yield base + suffix, fixup(hf_name, tensor, hf_config) if fixup else tensor


class GgufLoader(WeightLoader):
    name = "gguf"

    def __init__(self, load_config: Any = None) -> None:
        self.load_config = load_config
        self._parsed: dict[str, GgufFile] = {}

    def _open(self, path: str) -> GgufFile:
        file = find_gguf_file(path)
        if file is None:
            raise ConfigError(f"{path} is not a .gguf file (or a folder holding exactly one)", param="model")
        if file not in self._parsed:
            self._parsed[file] = GgufFile(file)
        return self._parsed[file]

    def can_load(self, path: str) -> bool:
        return find_gguf_file(path) is not None

    def load_files(self, path: str, model_config: Any) -> LoadedModelFiles:
        gguf = self._open(path)
        hf_config = gguf_config(gguf)
        if getattr(model_config, "tokenizer", None) or getattr(model_config, "tokenizer_mode", "auto") == "mistral":
            tokenizer = load_hf_tokenizer(path, model_config)
        elif getattr(model_config, "skip_tokenizer_init", False):
            tokenizer = None
        else:
            tokenizer = gguf_tokenizer(gguf.path)
        if isinstance(tokenizer, Tokenizer):  # it encodes chat itself: the file's template is not used
            chat_template = None
        else:
            chat_template = gguf.metadata.get("tokenizer.chat_template") or getattr(tokenizer, "chat_template", None)
        extra = {"checkpoint_dtype": checkpoint_dtype(gguf), "gguf_file": gguf.path, "quantization": "gguf"}
        return LoadedModelFiles(hf_config=hf_config, tokenizer=tokenizer, chat_template=chat_template, extra=extra)

    def iter_weights(self, path: str, model_config: Any, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        gguf = self._open(path)
        arch = gguf.architecture()
        to_hf = _llama_name if arch == "llama" else _generic_names(gguf, hf_config)
        fixup = _FIXUPS.get(arch)
        keep_groups = wants_groups(model_config)
        infos = list(gguf.tensors.values())
        for info in progress(infos, len(infos), "Loading GGUF"):
            hf_name = to_hf(info.name)
            if hf_name is None:
                logger.info("GGUF tensor %s has no Hugging Face counterpart; skipped", info.name)
                continue
            array = gguf.load_tensor(info)
            if not array.flags.writeable or array.dtype != np.float32:  # memory-mapped or f16
                array = array.astype(np.float32)
            tensor = torch.from_numpy(array)
            yield hf_name, fixup(hf_name, tensor, hf_config) if fixup else tensor
            max_bits = _group_bits(hf_name) if keep_groups else 0
            if max_bits:
                yield from _groups(gguf, info, hf_name, max_bits, hf_config, fixup)
