// A whole stack of Llama-layout decoder layers for one step, in one call.
//
// Each layer: h = RMSNorm(x); q, k, v = split(h W_qkv^T); rotate q, k by position ("rotate half");
// attend over the paged cache (storing k, v first); x += o W_o^T; h = RMSNorm(x);
// x += (silu(h W_gate^T) * (h W_up^T)) W_down^T. The matmuls are tessera::group_quant_linear (GGUF
// 4-bit groups) or oneDNN's with a pre-packed bf16 weight (what tessera::packed_linear calls),
// attention is paged_decode_step in a decode-only step, else write_kv_cache, then
// paged_decode_attention for the rows that decode and paged_prefill_attention for the prompts
// (csrc/paged_attention.cpp); the rest is a few small loops here.
//
// Why: under torch.compile a one-token step of SmolLM2-135M runs ~450 ops (120 matmuls, 30
// attention calls, ~150 generated loops and their allocations), each entered from Python or the
// dispatcher, and each a fork/join of the OpenMP team. At one request the arithmetic is ~2.5 ms of
// a ~5.5 ms forward; the rest was that per-op overhead, with the second core waiting
// (docs/benchmarks.md). Here the only parallel regions are the matmuls and attention. Steps with
// prompts gain less (their matmuls dominate: ~3 ms of a 128-token prompt's ~90), but with every
// step here the model needs no compiled graph at all, which saves its compile time at start-up.
//
// Rounding follows the model's ops: the residual stream and every op's output are bf16; norms,
// rotation and the activation compute in fp32 and round once (as inductor's fused loops do).

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// ATen's AVX-512 vector types, for exp_u20 (as in csrc/paged_attention.cpp)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <vector>

torch::Tensor group_quant_linear(const torch::Tensor& input, const torch::Tensor& packed,
                                 const torch::Tensor& scales_mins, const c10::optional<torch::Tensor>& bias,
                                 c10::optional<at::ScalarType> out_dtype);
torch::Tensor group_quant_gated_linear(const torch::Tensor& input, const torch::Tensor& packed,
                                       const torch::Tensor& scales_mins, const c10::optional<torch::Tensor>& bias);
at::Tensor paged_decode_step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             at::Tensor kv_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale);
void write_kv_cache(at::Tensor kv_cache, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping);
void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale);
void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_starts, const at::Tensor& query_lens, const at::Tensor& seq_lens,
                             double scale);

namespace {

using bf16 = at::BFloat16;

// Rows per thread in the elementwise loops: one decode row is a few hundred values, far less
// than an OpenMP fork/join costs, so small batches stay on the calling thread.
constexpr int64_t kRowsPerTask = 8;

// y = x W^T (+ bias), W either 4-bit groups for tessera::group_quant_linear (with scales_mins) or a
// bf16 weight oneDNN packed (core/layers/onednn.py), multiplied as tessera::packed_linear does.
struct Linear {
  at::Tensor packed;
  c10::optional<at::Tensor> scales_mins;  // none for a oneDNN-packed weight
  c10::optional<at::Tensor> bias;

  bool is_group_quant() const { return scales_mins.has_value(); }
  int64_t out_features() const { return is_group_quant() ? packed.size(0) * 16 : packed.size(0); }
  int64_t in_features() const { return is_group_quant() ? packed.size(1) * 32 : packed.size(1); }
  at::Tensor operator()(const at::Tensor& x) const {
    if (is_group_quant()) return group_quant_linear(x, packed, *scales_mins, bias, c10::nullopt);
    static const auto onednn_linear =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                              c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
    return onednn_linear.call(x, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
};

struct Layer {
  at::Tensor input_norm, post_attention_norm;
  Linear qkv, o, gate_up, down;
};

#if defined(CPU_CAPABILITY_AVX512)
// 16 values at a time, widened to fp32 and rounded back as the scalar loops below do (bf16's
// constructor and `vcvtneps2bf16` both round to nearest even). Without these the loops call
// glibc's vector exp through the PLT and convert bf16 one value at a time: the activation alone
// was ~6% of a 32-row decode step's samples (`perf`, docs/benchmarks.md).
constexpr int64_t kLanes = 16;
inline __m512 load16(const bf16* p) { return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }
inline __m512 round_to_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }
#endif

// With `add`: residual += add (rounded to bf16). Then out = RMSNorm(residual) * weight.
// residual, add, out: (rows, dim) contiguous; weight: (dim,).
void add_rms_norm(bf16* residual, const bf16* add, const bf16* weight, bf16* out, int64_t rows, int64_t dim,
                  float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      bf16* x = residual + r * dim;
      float sum_sq = 0.f;
      int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
      __m512 squares = _mm512_setzero_ps();
      for (; i + kLanes <= dim; i += kLanes) {
        __m512 v = load16(x + i);
        if (add != nullptr) {
          v = round_to_bf16(_mm512_add_ps(v, load16(add + r * dim + i)));
          store16(x + i, v);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      sum_sq = _mm512_reduce_add_ps(squares);
#endif
      for (; i < dim; ++i) {
        if (add != nullptr) x[i] = bf16(float(x[i]) + float(add[r * dim + i]));
        const float v = float(x[i]);
        sum_sq += v * v;
      }
      const float inv_rms = 1.f / std::sqrt(sum_sq / float(dim) + eps);
      i = 0;
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 inv = _mm512_set1_ps(inv_rms);
      for (; i + kLanes <= dim; i += kLanes)
        store16(out + r * dim + i, _mm512_mul_ps(load16(weight + i), round_to_bf16(_mm512_mul_ps(load16(x + i), inv))));
#endif
      for (; i < dim; ++i) out[r * dim + i] = bf16(float(weight[i]) * float(bf16(float(x[i]) * inv_rms)));
    }
  });
}

// Splits a (rows, (num_heads + 2 num_kv_heads) head_dim) projection into q, k, v and rotates the
// first rotary_dim features of each q and k head by the row's position ("rotate half": feature i
// pairs with i + rotary_dim / 2). cos, sin: (num_positions, rotary_dim).
void split_rotate(const bf16* qkv, const int64_t* positions, const bf16* cos, const bf16* sin, int64_t num_positions,
                  int64_t rotary_dim, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, bf16* q, bf16* k,
                  bf16* v, int64_t rows) {
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t half = rotary_dim / 2;
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t position = positions[r];
      TORCH_CHECK(position >= 0 && position < num_positions, "decoder stack: position ", position,
                  " is outside the rotary table (", num_positions, " positions)");
      const bf16* c = cos + position * rotary_dim;
      const bf16* s = sin + position * rotary_dim;
      const bf16* row = qkv + r * (q_size + 2 * kv_size);
      const auto rotate = [&](const bf16* src, bf16* dst, int64_t heads) {
        for (int64_t h = 0; h < heads; ++h) {
          const bf16* x = src + h * head_dim;
          bf16* y = dst + h * head_dim;
          int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
          for (; i + kLanes <= half; i += kLanes) {
            const __m512 x1 = load16(x + i), x2 = load16(x + i + half);
            store16(y + i, _mm512_fmsub_ps(x1, load16(c + i), _mm512_mul_ps(x2, load16(s + i))));
            store16(y + i + half, _mm512_fmadd_ps(x2, load16(c + i + half), _mm512_mul_ps(x1, load16(s + i + half))));
          }
#endif
          for (; i < half; ++i) {
            const float x1 = float(x[i]), x2 = float(x[i + half]);
            y[i] = bf16(x1 * float(c[i]) - x2 * float(s[i]));
            y[i + half] = bf16(x2 * float(c[i + half]) + x1 * float(s[i + half]));
          }
          for (int64_t i = rotary_dim; i < head_dim; ++i) y[i] = x[i];
        }
      };
      rotate(row, q + r * q_size, num_heads);
      rotate(row + q_size, k + r * kv_size, num_kv_heads);
      std::copy(row + q_size + kv_size, row + q_size + 2 * kv_size, v + r * kv_size);
    }
  });
}

// out = silu(gate) * up for a (rows, 2 width) input holding [gate | up].
void silu_mul(const bf16* gate_up, bf16* out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* g = gate_up + r * 2 * width;
      const bf16* u = g + width;
      int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + kLanes <= width; i += kLanes) {
        const __m512 x = load16(g + i);
        const __m512 e = static_cast<__m512>(at::vec::Vectorized<float>(_mm512_sub_ps(_mm512_setzero_ps(), x)).exp_u20());
        store16(out + r * width + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), load16(u + i)));
      }
#endif
      for (; i < width; ++i) {
        const float x = float(g[i]);
        out[r * width + i] = bf16(x / (1.f + std::exp(-x)) * float(u[i]));
      }
    }
  });
}

// silu(h W_gate^T) * (h W_up^T) for h (rows, hidden): fused into the matmul for 4-bit groups
// (group_quant_gated_linear, the same bits), else the matmul's [gate | up] and then silu_mul.
at::Tensor gated_mlp_input(const Linear& gate_up, const at::Tensor& h) {
  if (gate_up.is_group_quant()) return group_quant_gated_linear(h, gate_up.packed, *gate_up.scales_mins, gate_up.bias);
  const at::Tensor both = gate_up(h);
  const int64_t rows = h.size(0), width = both.size(1) / 2;
  at::Tensor activated = at::empty({rows, width}, h.options());
  silu_mul(both.data_ptr<bf16>(), activated.data_ptr<bf16>(), rows, width);
  return activated;
}

void check_bf16_vector(const at::Tensor& t, int64_t size, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 1 && t.size(0) == size && t.is_contiguous(), "decoder stack: ",
              what, " must be a contiguous bf16 vector of ", size);
}

}  // namespace

// Where a step's rows go in attention (made by the CPU attention backend's step_plan,
// backends/cpu/attention.py). Without prefills every row decodes one token.
struct StepLayout {
  at::Tensor slot_mapping;                    // (rows,) int64: each row's cache slot
  c10::optional<at::Tensor> decode_rows;      // the rows that decode; none: all of them
  at::Tensor decode_tables, decode_seq_lens;  // int32, one row per decoding request
  // the prompts (or chunks of one): first row, rows, sequence length and block table of each
  c10::optional<at::Tensor> prefill_starts, prefill_query_lens, prefill_seq_lens, prefill_tables;

  bool has_prefills() const { return prefill_tables.has_value(); }
};

class DecoderStack {
 public:
  // norms: input and post-attention norm weights, 2 per layer; packed, scales_mins, biases: the
  // weights of qkv, o, gate_up, down, 4 per layer (scales_mins none for a oneDNN-packed bf16
  // weight); cos, sin: (num_positions, rotary_dim) rotary tables.
  DecoderStack(const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& packed,
               const std::vector<c10::optional<at::Tensor>>& scales_mins,
               const std::vector<c10::optional<at::Tensor>>& biases,
               at::Tensor final_norm, at::Tensor cos, at::Tensor sin, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, double eps, double scale)
      : final_norm_(std::move(final_norm)), cos_(cos.contiguous()), sin_(sin.contiguous()), num_heads_(num_heads),
        num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(float(eps)), scale_(scale) {
    const size_t num_layers = norms.size() / 2;
    TORCH_CHECK(norms.size() == 2 * num_layers && packed.size() == 4 * num_layers &&
                    scales_mins.size() == 4 * num_layers && biases.size() == 4 * num_layers,
                "decoder stack: 2 norms and 4 linears per layer");
    hidden_ = final_norm_.size(0);
    check_bf16_vector(final_norm_, hidden_, "the final norm");
    TORCH_CHECK(cos_.scalar_type() == at::kBFloat16 && sin_.scalar_type() == at::kBFloat16 && cos_.dim() == 2 &&
                    cos_.sizes() == sin_.sizes() && cos_.size(1) % 2 == 0 && cos_.size(1) <= head_dim,
                "decoder stack: cos and sin must be bf16 (num_positions, rotary_dim) tables, rotary_dim even <= head_dim");
    TORCH_CHECK(num_heads % num_kv_heads == 0, "decoder stack: query heads must be a multiple of kv heads");
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    for (size_t i = 0; i < num_layers; ++i) {
      Layer layer;
      layer.input_norm = norms[2 * i];
      layer.post_attention_norm = norms[2 * i + 1];
      check_bf16_vector(layer.input_norm, hidden_, "an input norm");
      check_bf16_vector(layer.post_attention_norm, hidden_, "a post-attention norm");
      Linear* linears[4] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
      for (int j = 0; j < 4; ++j) {
        *linears[j] = Linear{packed[4 * i + j], scales_mins[4 * i + j], biases[4 * i + j]};
        TORCH_CHECK(packed[4 * i + j].dim() == (linears[j]->is_group_quant() ? 3 : 2),
                    "decoder stack: a linear's weight must be 4-bit groups (3-d) or oneDNN-packed (2-d)");
      }
      const int64_t intermediate = layer.down.in_features();
      TORCH_CHECK(layer.qkv.in_features() == hidden_ && layer.qkv.out_features() == q_size + 2 * kv_size &&
                      layer.o.in_features() == q_size && layer.o.out_features() == hidden_ &&
                      layer.gate_up.in_features() == hidden_ && layer.gate_up.out_features() == 2 * intermediate &&
                      layer.down.out_features() == hidden_,
                  "decoder stack: layer ", i, "'s linear shapes do not fit the model's sizes");
      layers_.push_back(std::move(layer));
    }
  }

  // hidden: (rows, hidden) bf16, the embedded tokens; positions: (rows,) int64; kv_caches: one
  // per layer; output_rows: (outputs,) int64, the rows whose outputs the step uses, or none for
  // all. Returns the final norm's output for those rows, (outputs or rows, hidden) bf16.
  //
  // With output_rows, the last layer stores every row's keys and values (later tokens attend to
  // them) and then carries only the output rows through its attention projection and MLP: a
  // prompt needs its last token's output alone. For a 128-token prompt of the default model
  // that is 127 rows of one layer's O, gate_up and down matmuls, ~2.8% of its arithmetic
  // (llama.cpp skips them the same way).
  at::Tensor run(const at::Tensor& hidden, const at::Tensor& positions, const std::vector<at::Tensor>& kv_caches,
                 const StepLayout& layout, const c10::optional<at::Tensor>& output_rows) const {
    TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && hidden.dim() == 2 && hidden.size(1) == hidden_,
                "decoder stack: hidden must be (rows, ", hidden_, ") bf16");
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == hidden.size(0),
                "decoder stack: one int64 position per row");
    TORCH_CHECK(kv_caches.size() == layers_.size(), "decoder stack: one KV cache per layer");
    TORCH_CHECK(!layout.has_prefills() || (layout.decode_rows.has_value() && layout.prefill_starts.has_value() &&
                                           layout.prefill_query_lens.has_value() && layout.prefill_seq_lens.has_value()),
                "decoder stack: a step with prefills needs its decode rows and every prefill tensor");
    const int64_t rows = hidden.size(0);
    if (output_rows.has_value()) {
      TORCH_CHECK(output_rows->scalar_type() == at::kLong && output_rows->dim() == 1 && output_rows->is_contiguous(),
                  "decoder stack: output_rows must be a contiguous int64 vector");
      const int64_t* index = output_rows->data_ptr<int64_t>();
      for (int64_t j = 0; j < output_rows->numel(); ++j)
        TORCH_CHECK(index[j] >= 0 && index[j] < rows, "decoder stack: output row ", index[j], " is not one of the ",
                    rows, " rows");
    }
    const at::Tensor pos = positions.contiguous();
    at::Tensor residual = hidden.clone(at::MemoryFormat::Contiguous);
    at::Tensor normed = at::empty_like(residual);
    at::Tensor q = at::empty({rows, num_heads_, head_dim_}, residual.options());
    at::Tensor k = at::empty({rows, num_kv_heads_, head_dim_}, residual.options());
    at::Tensor v = at::empty_like(k);
    at::Tensor mlp_out;  // the previous layer's, added to the residual stream by the next norm
    int64_t live_rows = rows;  // rows still carried: all, until the last layer drops the unused
    const auto keep_output_rows = [&] {  // from here on, the output rows alone
      residual = residual.index_select(0, *output_rows);
      normed = at::empty_like(residual);
      live_rows = residual.size(0);
    };
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      add_rms_norm(residual.data_ptr<bf16>(), mlp_out.defined() ? mlp_out.data_ptr<bf16>() : nullptr,
                   layer.input_norm.data_ptr<bf16>(), normed.data_ptr<bf16>(), rows, hidden_, eps_);
      const at::Tensor qkv = layer.qkv(normed);
      split_rotate(qkv.data_ptr<bf16>(), pos.data_ptr<int64_t>(), cos_.data_ptr<bf16>(), sin_.data_ptr<bf16>(),
                   cos_.size(0), cos_.size(1), num_heads_, num_kv_heads_, head_dim_, q.data_ptr<bf16>(),
                   k.data_ptr<bf16>(), v.data_ptr<bf16>(), rows);
      at::Tensor attended = attend(q, k, v, kv_caches[i], layout).view({rows, num_heads_ * head_dim_});
      if (i + 1 == layers_.size() && output_rows.has_value()) {
        attended = attended.index_select(0, *output_rows);
        keep_output_rows();
      }
      const at::Tensor attn_out = layer.o(attended);
      add_rms_norm(residual.data_ptr<bf16>(), attn_out.data_ptr<bf16>(), layer.post_attention_norm.data_ptr<bf16>(),
                   normed.data_ptr<bf16>(), live_rows, hidden_, eps_);
      mlp_out = layer.down(gated_mlp_input(layer.gate_up, normed));
    }
    if (layers_.empty() && output_rows.has_value()) keep_output_rows();
    add_rms_norm(residual.data_ptr<bf16>(), mlp_out.defined() ? mlp_out.data_ptr<bf16>() : nullptr,
                 final_norm_.data_ptr<bf16>(), normed.data_ptr<bf16>(), live_rows, hidden_, eps_);
    return normed;
  }

 private:
  // q: (rows, num_heads, head_dim); k, v: (rows, num_kv_heads, head_dim), this step's.
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_cache,
                    const StepLayout& layout) const {
    if (!layout.has_prefills())
      return paged_decode_step(q, k, v, kv_cache, layout.slot_mapping, layout.decode_tables, layout.decode_seq_lens,
                               scale_);
    write_kv_cache(kv_cache, k, v, layout.slot_mapping);
    const at::Tensor keys = kv_cache.select(0, 0), values = kv_cache.select(0, 1);
    at::Tensor out = at::empty_like(q);
    const at::Tensor& rows = *layout.decode_rows;
    if (rows.numel() > 0) {
      const at::Tensor decode_q = q.index_select(0, rows);
      at::Tensor decode_out = at::empty_like(decode_q);
      paged_decode_attention(decode_out, decode_q, keys, values, layout.decode_tables, layout.decode_seq_lens, scale_);
      out.index_copy_(0, rows, decode_out);
    }
    paged_prefill_attention(out, q, keys, values, *layout.prefill_tables, *layout.prefill_starts,
                            *layout.prefill_query_lens, *layout.prefill_seq_lens, scale_);
    return out;
  }

  std::vector<Layer> layers_;
  at::Tensor final_norm_, cos_, sin_;
  int64_t hidden_ = 0, num_heads_, num_kv_heads_, head_dim_;
  float eps_;
  double scale_;
};

void bind_decoder_stack(pybind11::module& m) {
  pybind11::class_<StepLayout>(m, "StepLayout", "where a step's rows go in attention (csrc/decoder_stack.cpp)")
      .def(pybind11::init<at::Tensor, c10::optional<at::Tensor>, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
                          c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>(),
           pybind11::arg("slot_mapping"), pybind11::arg("decode_rows"), pybind11::arg("decode_tables"),
           pybind11::arg("decode_seq_lens"), pybind11::arg("prefill_starts"), pybind11::arg("prefill_query_lens"),
           pybind11::arg("prefill_seq_lens"), pybind11::arg("prefill_tables"));
  pybind11::class_<DecoderStack>(m, "DecoderStack",
                                 "A stack of Llama-layout decoder layers on 4-bit group or oneDNN-packed bf16 weights, run "
                                 "for one step in one call (csrc/decoder_stack.cpp)")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<c10::optional<at::Tensor>>&,
                          const std::vector<c10::optional<at::Tensor>>&, at::Tensor,
                          at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double, double>())
      .def("run", &DecoderStack::run, pybind11::arg("hidden"), pybind11::arg("positions"), pybind11::arg("kv_caches"),
           pybind11::arg("layout"), pybind11::arg("output_rows") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
