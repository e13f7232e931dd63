"""Llama and Mistral (without sliding window) decoder-only models over the paged KV cache."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tessera.core.errors import ConfigError
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.interfaces.decoder_stack import (
    DecoderLayerWeights,
    DecoderStackSpec,
    StackedForward,
)
from tessera.core.interfaces.model import ModelArchitecture
from tessera.core.layers import LayerContext
from tessera.core.layers.activation import GatedActivation
from tessera.core.layers.attention import Attention
from tessera.core.layers.embedding import LMHead, VocabEmbedding
from tessera.core.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tessera.core.layers.logits import LogitsProcessor
from tessera.core.layers.norm import RMSNorm
from tessera.core.layers.rotary import get_rope, rope_parameters

logger = logging.getLogger(__name__)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, context: LayerContext, prefix: str) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=bias, context=context, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, context=context, prefix=f"{prefix}.down_proj")
        self.act = GatedActivation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (num_tokens, hidden_size)
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, context: LayerContext, max_position: int, prefix: str) -> None:
        super().__init__()
        head_dim = _head_dim(config)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, num_heads, num_kv_heads, bias=bias, context=context, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, config.hidden_size, bias=bias, context=context, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = get_rope(head_dim, max_position, rope_parameters(config), context.dtype, context.device)
        self.attn = Attention(num_heads, head_dim, num_kv_heads, context, prefix=f"{prefix}.attn")
        self.q_size = self.attn.num_heads * head_dim
        self.kv_size = self.attn.num_kv_heads * head_dim

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: Any, metadata: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # (num_tokens, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, context: LayerContext, max_position: int, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, context, max_position, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, context, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, context)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, context)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: Any,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, context: LayerContext, max_position: int, prefix: str = "model") -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, context)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, context, max_position, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, context)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[Any], metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (num_tokens, hidden_size)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaForCausalLM(nn.Module, ModelArchitecture):
    """Llama 1/2/3 (incl. Llama-3 rope scaling), SmolLM, TinyLlama and other Llama-layout models."""

    architectures = ("LlamaForCausalLM",)

    def __init__(self, hf_config: Any, model_config: Any, context: LayerContext) -> None:
        super().__init__()
        self.check_config(hf_config, model_config)
        self.config = hf_config
        self.context = context
        max_position = max(hf_config.max_position_embeddings, getattr(model_config, "max_model_len", None) or 0)
        self.model = LlamaModel(hf_config, context, max_position)
        self.is_tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.is_tied:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, context)
        self.logits_processor = LogitsProcessor(hf_config.vocab_size)

    def check_config(self, hf_config: Any, model_config: Any) -> None:
        """Raise ConfigError for settings this implementation does not compute."""
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{type(self).__name__} supports hidden_act 'silu', not {act!r}")

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[Any], metadata: Any
    ) -> torch.Tensor:  # (num_tokens, hidden_size)
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (num_rows, vocab_size) float32
        return self.logits_processor(self.lm_head, hidden_states)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        attn = self.model.layers[0].self_attn.attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def decoder_stack_forward(self) -> StackedForward | None:
        """The platform's decoder stack over these layers, where it has one and takes every
        projection's weight (on the CPU: GGUF 4-bit groups or oneDNN-packed bf16); the embedding
        stays here."""
        kernel = self.context.platform.decoder_stack_kernel() if self.context.platform is not None else None
        spec = self._decoder_stack_spec() if kernel is not None and self.context.tp_size == 1 else None
        stack = kernel.build(spec) if spec is not None else None
        return StackedForward(self.model.embed_tokens, stack) if stack is not None else None

    def _decoder_stack_spec(self) -> DecoderStackSpec | None:
        layers = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            weights = [p.linear_method.decoder_stack_weight(p) for p in projections]
            if any(w is None for w in weights):
                return None
            layers.append(
                DecoderLayerWeights(
                    input_norm=layer.input_layernorm.weight,
                    qkv=weights[0],
                    qkv_bias=attn.qkv_proj.bias,
                    o=weights[1],
                    o_bias=attn.o_proj.bias,
                    post_attention_norm=layer.post_attention_layernorm.weight,
                    gate_up=weights[2],
                    gate_up_bias=mlp.gate_up_proj.bias,
                    down=weights[3],
                    down_bias=mlp.down_proj.bias,
                )
            )
        first = self.model.layers[0].self_attn
        return DecoderStackSpec(
            layers=tuple(layers),
            final_norm=self.model.norm.weight,
            rms_norm_eps=self.model.norm.eps,
            num_heads=first.attn.num_heads,
            num_kv_heads=first.attn.num_kv_heads,
            head_dim=first.attn.head_dim,
            attention_scale=first.attn.scale,
            cos_cache=first.rotary_emb.cos_cache,
            sin_cache=first.rotary_emb.sin_cache,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.is_tied and name.startswith("lm_head.")):
                continue  # recomputed / shared with the embedding
            shard_id: Any = None
            for fragment, fused, sid in _STACKED:
                if fragment in name:
                    name, shard_id = name.replace(fragment, fused), sid
                    break
            param = params.get(name)
            if param is None:
                logger.warning("checkpoint tensor %s has no parameter in %s; skipped", name, type(self).__name__)
                continue
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.data.copy_(tensor)
            else:
                loader(param, tensor, shard_id)
            loaded.add(name)
        for module in self.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral 7B-style models: Llama layout; sliding-window attention is not built, so a window
    shorter than the context the model may use is refused."""

    architectures = ("MistralForCausalLM",)

    def check_config(self, hf_config: Any, model_config: Any) -> None:
        super().check_config(hf_config, model_config)
        window = getattr(hf_config, "sliding_window", None)
        context_len = min(
            hf_config.max_position_embeddings, getattr(model_config, "max_model_len", None) or 1 << 62
        )
        if window is not None and window < context_len:
            raise ConfigError(
                f"this Mistral config uses sliding-window attention (window {window} < context "
                f"{context_len}), which tessera does not implement yet; pass --max-model-len {window} "
                "to stay within the window",
                param="max_model_len",
            )
