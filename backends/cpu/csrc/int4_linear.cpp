// y = x W^T for bf16 activations and 4-bit weights in groups of 32 (GGUF Q4_0 / Q4_1), on CPUs
// with AVX512-BF16 and AVX512-VNNI.
//
// The activations are quantized on the fly, like llama.cpp does for these formats: per row and
// group of 32 inputs, x ~ s * xq with xq = round(x / s) in -127..127 and s = max|x| / 127. With
// GGUF's w = d q + m per group of 32 inputs (q in 0..15; d, m in fp16, as the file stores them),
//   sum_k x_k w_k ~ s * (d * sum_k q_k xq_k + m * sum_k xq_k),
// and `vpdpbusd` multiplies 4 unsigned bytes (q) by 4 signed bytes (xq) into each of 16 int32 lanes
// in one instruction: 64 products, twice what `vdpbf16ps` does on bf16, with no decoding beyond
// splitting the nibbles. The integer dot products are exact; rounding the inputs to 8 bits adds a
// relative error of ~0.6% to a layer's output (bf16 inputs: ~0.2%), small next to the error of
// 4-bit weights themselves.
//
// Weight layout (made by backends/cpu/int4_linear.py, `int4_repack`): columns in blocks of 16,
// inputs in groups of 32; a group of a block is 256 bytes, four chunks of 64. In chunk c, byte
// 4 j + i holds column j's input 4 c + i in its low nibble and input 16 + 4 c + i in its high one,
// so a chunk's low (high) nibbles are the 16 lanes x 4 bytes that `vpdpbusd` takes for inputs
// 4 c .. 4 c + 3 (16 + 4 c ..).

#include <torch/extension.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TESSERA_INT4_LINEAR 1
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#endif

bool int4_linear_supported() {
#ifdef TESSERA_INT4_LINEAR
  return true;
#else
  return false;
#endif
}

#ifdef TESSERA_INT4_LINEAR
namespace {

constexpr int kGroup = 32;        // inputs per quantization group
constexpr int kQuads = kGroup / 4;  // 4-byte input lanes per group
constexpr int kBlock = 16;        // output columns per block (one zmm of sums)
constexpr int kGroupBytes = 256;  // one group of one column block
constexpr int kMaxRows = 8;       // rows sharing each decoded weight register

// The activations in 8 bits: per row and group, x ~ scale * q.
struct QuantizedRows {
  std::vector<int8_t> q;           // (rows, K)
  std::vector<float> scale;        // (rows, groups)
  std::vector<float> scaled_sum;   // (rows, groups): scale * sum of the group's q
};

QuantizedRows quantize_rows(const at::BFloat16* x, int64_t rows, int64_t in_features) {
  const int64_t groups = in_features / kGroup;
  QuantizedRows out{std::vector<int8_t>(rows * in_features), std::vector<float>(rows * groups),
                    std::vector<float>(rows * groups)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const at::BFloat16* src = x + m * in_features + g * kGroup;
      const __m512 lo = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      const __m512 hi = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16)));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));  // rounds to nearest even
      const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
      int8_t* dst = out.q.data() + m * in_features + g * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q_hi));
      const float scale = amax / 127.0f;
      out.scale[m * groups + g] = scale;
      out.scaled_sum[m * groups + g] = scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi)));
    }
  }
  return out;
}

// One block of 16 columns for R rows: y[r, cols] = sum over groups.
template <int R>
inline void block_rows(const int32_t* x_quads, int64_t quads_per_row, const float* x_scale, const float* x_sum,
                       int64_t groups, const uint8_t* weights, const at::Half* scales_mins, const float* bias,
                       at::BFloat16* y, int64_t ldy) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* w = weights + g * kGroupBytes;
    __m512i q[kQuads];
    for (int c = 0; c < 4; ++c) {
      const __m512i bytes = _mm512_loadu_si512(w + 64 * c);
      q[c] = _mm512_and_si512(bytes, low_nibbles);
      q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
    }
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    const int32_t* xg = x_quads + g * kQuads;
    for (int c = 0; c < kQuads; ++c)
      for (int r = 0; r < R; ++r)
        dot[r] = _mm512_dpbusd_epi32(dot[r], q[c], _mm512_set1_epi32(xg[r * quads_per_row + c]));
    const at::Half* dm = scales_mins + g * 2 * kBlock;  // 16 d, then 16 m
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + kBlock)));
    for (int r = 0; r < R; ++r) {
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(x_scale[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), ds, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x_sum[r * groups + g]), acc[r]);
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r], b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), (__m256i)out);
  }
}

using BlockFn = void (*)(const int32_t*, int64_t, const float*, const float*, int64_t, const uint8_t*,
                         const at::Half*, const float*, at::BFloat16*, int64_t);
constexpr BlockFn kBlockFns[kMaxRows + 1] = {nullptr,       block_rows<1>, block_rows<2>,
                                             block_rows<3>, block_rows<4>, block_rows<5>,
                                             block_rows<6>, block_rows<7>, block_rows<8>};

}  // namespace

// x: (..., K) bf16; packed: (N/16, K/32, 256) uint8; scales_mins: (N/16, K/32, 32) fp16, per
// block and group the 16 columns' d, then their m; bias: (N,) or none. Returns (..., N) bf16.
torch::Tensor int4_linear(const torch::Tensor& input, const torch::Tensor& packed, const torch::Tensor& scales_mins,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1 && input.scalar_type() == at::kBFloat16 && input.device().is_cpu(),
              "int4_linear: x must be a bf16 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kGroupBytes && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous(),
              "int4_linear: packed must be a contiguous (N/16, K/32, 256) uint8 tensor");
  const int64_t in_features = input.size(-1);
  const torch::Tensor x = input.reshape({-1, in_features}).contiguous();
  const int64_t rows = x.size(0);
  const int64_t blocks = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(groups * kGroup == in_features, "int4_linear: x has ", in_features, " inputs, the weight ",
              groups * kGroup);
  TORCH_CHECK(scales_mins.scalar_type() == at::kHalf && scales_mins.is_contiguous() &&
                  scales_mins.numel() == blocks * groups * 2 * kBlock,
              "int4_linear: scales_mins must be a contiguous (N/16, K/32, 32) fp16 tensor");
  const int64_t out_features = blocks * kBlock;
  torch::Tensor bias_fp32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "int4_linear: bias must have ", out_features, " values");
    bias_fp32 = bias->to(at::kFloat).contiguous();
  }
  const float* bias_data = bias_fp32.defined() ? bias_fp32.data_ptr<float>() : nullptr;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features;
  auto y = torch::empty(out_shape, x.options());
  if (rows == 0) return y;

  const QuantizedRows xq = quantize_rows(x.data_ptr<at::BFloat16>(), rows, in_features);
  const auto* x_quads = reinterpret_cast<const int32_t*>(xq.q.data());
  const int64_t quads_per_row = in_features / 4;
  const uint8_t* wd = packed.data_ptr<uint8_t>();
  const at::Half* dm = scales_mins.data_ptr<at::Half>();
  at::BFloat16* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < rows; m += kMaxRows) {
        const int64_t count = std::min<int64_t>(kMaxRows, rows - m);
        kBlockFns[count](x_quads + m * quads_per_row, quads_per_row, xq.scale.data() + m * groups,
                         xq.scaled_sum.data() + m * groups, groups, wd + b * groups * kGroupBytes,
                         dm + b * groups * 2 * kBlock, bias_data ? bias_data + b * kBlock : nullptr,
                         yd + m * out_features + b * kBlock, out_features);
      }
    }
  });
  return y;
}

#else

torch::Tensor int4_linear(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                          const c10::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "int4_linear needs a CPU with AVX512-BF16 and AVX512-VNNI (and a build for it)");
}

#endif  // TESSERA_INT4_LINEAR

// The op is called from compiled graphs, so it is registered with the dispatcher here rather than
// wrapped in Python (which costs ~10 us a call, 1-2 ms a decode step). Its shape function (for
// the compiler) is registered in backends/cpu/int4_linear.py.
TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales_mins, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera, CPU, m) { m.impl("int4_linear", &int4_linear); }
