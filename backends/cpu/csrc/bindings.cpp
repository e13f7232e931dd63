// The Python module of the CPU backend's kernels (backends/cpu/kernels.py builds it).

#include <torch/extension.h>

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale);
void write_kv_cache(at::Tensor kv_cache, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping);
at::Tensor paged_decode_step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             at::Tensor kv_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale);
void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_starts, const at::Tensor& query_lens, const at::Tensor& seq_lens,
                             double scale);
std::vector<int64_t> prefill_attention_head_dims();
bool group_quant_linear_supported();  // group_quant_linear.cpp, which registers tessera::group_quant_linear
torch::Tensor group_quant_gated_linear(const torch::Tensor& input, const torch::Tensor& packed,
                                       const torch::Tensor& scales_mins, const c10::optional<torch::Tensor>& bias);
void bind_decoder_stack(pybind11::module& m);  // decoder_stack.cpp: the DecoderStack class

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "out[r] = softmax(q[r] K_r^T * scale) V_r over request r's cached tokens (decode)");
  m.def("write_kv_cache", &write_kv_cache,
        "kv_cache[0 and 1] at slot_mapping[t] = key[t] and value[t] (the step's new tokens)");
  m.def("paged_decode_step", &paged_decode_step,
        "write_kv_cache, then paged_decode_attention into a new output: one layer of a decode-only step");
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "causal attention of requests' query rows (prompts or chunks) to their cached tokens (bf16)");
  m.def("prefill_attention_head_dims", &prefill_attention_head_dims,
        "the head sizes paged_prefill_attention is built for on this CPU (bf16 caches)");
  m.def("group_quant_linear_supported", &group_quant_linear_supported,
        "whether torch.ops.tessera.group_quant_linear was built (it needs AVX512-BF16 and VNNI)");
  m.def("group_quant_gated_linear", &group_quant_gated_linear,
        "silu(x W_gate^T) * (x W_up^T) for 4-bit groups of [W_gate | W_up] (the decoder stack's gated MLP)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("scales_mins"), pybind11::arg("bias") = pybind11::none());
  bind_decoder_stack(m);
}
