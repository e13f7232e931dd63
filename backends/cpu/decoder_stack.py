"""The CPU platform's `DecoderStackKernel`: a step's whole layer stack in one C++ call.

csrc/decoder_stack.cpp runs every layer (norms, the matmuls, rotary, the paged attention, the
gated MLP) without returning to Python. At one request this takes the compiled forward of the
4-bit SmolLM2-135M from ~5.7 to ~3.1 ms a step: under torch.compile the step is ~450 small ops
whose entry costs, not the arithmetic, were half its time (docs/benchmarks.md). It takes bf16
models whose projections are GGUF 4-bit groups (`tessera::group_quant_linear`) or bf16 weights
packed for oneDNN (core/layers/onednn.py), on CPUs where the kernels build. Steps with prompts
run here too where the C++ prefill attention is built for the head size; then the model needs no
compiled graph at all.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.backends.cpu import kernels
from tessera.backends.cpu.attention import step_plan
from tessera.backends.cpu.group_quant_linear import GroupQuantBlocks
from tessera.core.interfaces.attention import AttentionMetadata
from tessera.core.interfaces.decoder_stack import (
    DecoderStackForward,
    DecoderStackKernel,
    DecoderStackSpec,
)


class CpuDecoderStack(DecoderStackForward):
    """The stack's forward: (hidden, positions, kv_caches, metadata) -> the final norm's output."""

    def __init__(self, stack: Any, module: Any, runs_prefills: bool) -> None:
        self.stack = stack  # the C++ DecoderStack
        self.module = module  # the kernels' module, for its StepLayout
        self.runs_prefills = runs_prefills

    def __call__(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (num_tokens, hidden_size) -> (num_outputs or num_tokens, hidden_size)
        plan = step_plan(metadata, with_kernels=True)
        if plan.prefills and not self.runs_prefills:
            raise ValueError("this decoder stack runs decode-only steps; the step has prompts")
        layout = self.module.StepLayout(
            metadata.slot_mapping, plan.decode_rows, plan.decode_tables, plan.decode_seq_lens,
            plan.prefill_starts, plan.prefill_query_lens, plan.prefill_seq_lens, plan.prefill_tables,
        )
        return self.stack.run(hidden, positions, kv_caches, layout, output_rows)


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
        if not all(_is_4bit_groups(w) or _is_onednn_bf16(w) for w in weights):
            return None
        stack = module.DecoderStack(
            [norm for p in spec.layers for norm in (p.input_norm, p.post_attention_norm)],
            [w.packed if _is_4bit_groups(w) else w for w in weights],
            [w.scales_mins if _is_4bit_groups(w) else None for w in weights],
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
        # the C++ prefill attention covers bf16 caches of some head sizes (the cache has the model's dtype)
        return CpuDecoderStack(stack, module, runs_prefills=spec.head_dim in module.prefill_attention_head_dims())


def _is_4bit_groups(weight: Any) -> bool:
    """tessera::group_quant_linear's 4-bit layout (its 8-bit one rounds activations; the layers'
    own path does not use it)."""
    return isinstance(weight, GroupQuantBlocks) and weight.packed.shape[-1] == 256


def _is_onednn_bf16(weight: Any) -> bool:
    """A bf16 weight packed for oneDNN (core/layers/onednn.py)."""
    return isinstance(weight, torch.Tensor) and weight.is_mkldnn and weight.dtype == torch.bfloat16
