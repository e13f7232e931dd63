"""Rotary position embeddings: default, "linear", "dynamic" (NTK) and "llama3" frequency scaling.

The frequencies follow the Hugging Face definitions. One deliberate difference: "dynamic" NTK
scaling uses a fixed base computed for the longest sequence the model may see (as vLLM does),
not one that changes with the current length, since the paged KV cache stores rotated keys
that must not change meaning from one step to the next.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tessera.core.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config as one dict with "rope_type" and "rope_theta" keys.

    transformers 5 keeps them in `config.rope_parameters`; older versions in `rope_theta` plus
    an optional `rope_scaling` dict (whose type key was once spelled "type").
    """
    params = getattr(hf_config, "rope_parameters", None)
    if params and "rope_type" not in params and "rope_theta" not in params and "type" not in params:
        params = None  # per-layer-type dicts (e.g. Gemma 3) are not for this helper
    merged: dict[str, Any] = dict(params or {})
    if not params:
        merged.update(getattr(hf_config, "rope_scaling", None) or {})
    merged.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = merged.pop("type", None)
    merged["rope_type"] = merged.get("rope_type") or rope_type or "default"
    return merged


def _base_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:  # (rotary_dim // 2,) float32
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (theta**exponent)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Long wavelengths are divided by `factor`, short ones kept, the band between interpolated."""
    factor = float(params["factor"])
    low_freq_factor = float(params.get("low_freq_factor", 1.0))
    high_freq_factor = float(params.get("high_freq_factor", 4.0))
    old_context_len = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context_len / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context_len / high_freq_factor) & (wavelen <= old_context_len / low_freq_factor)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(rotary_dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, int]:
    """(inverse frequencies, number of positions to precompute) for the given rope settings."""
    rope_type = params["rope_type"]
    theta = float(params["rope_theta"])
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; built: {', '.join(ROPE_TYPES)}", param="rope_scaling")
    if rope_type == "default":
        return _base_inv_freq(rotary_dim, theta), max_position
    factor = float(params.get("factor", 1.0))
    if factor < 1.0 and rope_type != "llama3":
        raise ConfigError(f"rope scaling factor must be >= 1, got {factor}", param="rope_scaling")
    if rope_type == "linear":
        return _base_inv_freq(rotary_dim, theta) / factor, int(max_position * factor)
    if rope_type == "dynamic":
        original = int(params.get("original_max_position_embeddings", max_position))
        longest = int(original * factor)
        theta = theta * ((factor * longest / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _base_inv_freq(rotary_dim, theta), longest
    return _llama3_inv_freq(_base_inv_freq(rotary_dim, theta), params), max_position


class RotaryEmbedding(nn.Module):
    """Rotates the first `rotary_dim` features of each head by position (the "rotate half" layout
    Hugging Face Llama checkpoints use). cos/sin are precomputed in float32 for every position."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        params: dict[str, Any],
        dtype: torch.dtype,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        inv_freq, num_positions = compute_inv_freq(rotary_dim, params, max_position)
        positions = torch.arange(num_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (num_positions, rotary_dim // 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (num_positions, rotary_dim)
        self.register_buffer("cos_cache", emb.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin_cache", emb.sin().to(dtype=dtype, device=device), persistent=False)

    @property
    def max_position(self) -> int:
        return self.cos_cache.shape[0]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (num_tokens, num_heads, head_dim); cos/sin: (num_tokens, 1, rotary_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated_half * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (num_tokens,); query/key (num_tokens, num_heads * head_dim) or 3-D. Returns
        the rotated query and key in the input shapes."""
        cos = self.cos_cache[positions].unsqueeze(1)  # (num_tokens, 1, rotary_dim)
        sin = self.sin_cache[positions].unsqueeze(1)
        q = self._rotate(query.view(query.shape[0], -1, self.head_dim), cos, sin)
        k = self._rotate(key.view(key.shape[0], -1, self.head_dim), cos, sin)
        return q.view_as(query), k.view_as(key)


_SHARED: dict[tuple[Any, ...], RotaryEmbedding] = {}


def get_rope(
    head_dim: int,
    max_position: int,
    params: dict[str, Any],
    dtype: torch.dtype,
    device: Any = None,
    rotary_dim: int | None = None,
) -> RotaryEmbedding:
    """A RotaryEmbedding for settings from `rope_parameters(hf_config)`. Layers with equal
    settings share one instance (its cos/sin tables are the same and cost time and memory)."""
    key = (head_dim, rotary_dim, max_position, repr(sorted(params.items())), dtype, str(device))
    if key not in _SHARED:
        _SHARED[key] = RotaryEmbedding(head_dim, rotary_dim or head_dim, max_position, params, dtype, device)
    return _SHARED[key]
