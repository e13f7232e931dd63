"""The CPU platform's `DecoderStackKernel`: a decode-only step's whole layer stack in one C++ call.

csrc/decoder_stack.cpp runs every layer (norms, `tessera::group_quant_linear`, rotary, the paged
decode attention, the gated MLP) without returning to Python. At one request this takes the
compiled forward of SmolLM2-135M from ~5.7 to ~3.1 ms a step: under torch.compile the step is
~450 small ops whose entry costs, not the arithmetic, were half its time (docs/benchmarks.md).
It needs the group kernel (GGUF Q4 layers on CPUs with AVX512-BF16 and VNNI) and bf16.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.backends.cpu import kernels
from tessera.backends.cpu.group_quant_linear import GroupQuantBlocks
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.interfaces.decoder_stack import (
    DecoderStackForward,
    DecoderStackKernel,
    DecoderStackSpec,
)


class CpuDecoderStack:
    """The stack's forward: (hidden, positions, kv_caches, metadata) -> the final norm's output."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack  # the C++ DecoderStack

    def __call__(
        self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], metadata: AttentionMetadata
    ) -> torch.Tensor:  # (num_tokens, hidden_size) -> (num_tokens, hidden_size)
        assert metadata.is_decode_only
        return self.stack.run(
            hidden, positions, kv_caches, metadata.slot_mapping, metadata.block_tables.contiguous(),
            metadata.seq_lens.contiguous(),
        )


class CpuDecoderStackKernel(DecoderStackKernel):
    def build(self, spec: DecoderStackSpec) -> DecoderStackForward | None:
        module = kernels.load()
        tensors = [spec.final_norm, spec.cos_cache, spec.sin_cache]
        for layer in spec.layers:
            tensors += [layer.input_norm, layer.post_attention_norm]
        if module is None or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
            return None
        projections = [(p.qkv, p.qkv_bias, p.o, p.o_bias, p.gate_up, p.gate_up_bias, p.down, p.down_bias) for p in spec.layers]
        weights = [w for layer in projections for w in layer[0::2]]
        if not all(isinstance(w, GroupQuantBlocks) and w.packed.shape[-1] == 256 for w in weights):
            return None  # only 4-bit group weights (bf16 activations) match the model's own path
        stack = module.DecoderStack(
            [norm for p in spec.layers for norm in (p.input_norm, p.post_attention_norm)],
            [w.packed for w in weights],
            [w.scales_mins for w in weights],
            [bias for layer in projections for bias in layer[1::2]],
            spec.final_norm,
            spec.cos_cache,
            spec.sin_cache,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            spec.rms_norm_eps,
            spec.attention_scale,
        )
        return CpuDecoderStack(stack)
