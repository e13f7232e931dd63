// y = x W^T for bf16 activations and 4-bit weights in groups of 32 (GGUF Q4_0 / Q4_1), on CPUs
// with AVX512-BF16.
//
// Each 4-bit value q (0..15) becomes the bf16 number 128 + q by placing the byte 0x43 above it
// (0x4300 is 128.0 in bf16, and 128..143 are exact), so one unpack instruction turns 32 nibbles
// into 32 bf16 weights, and `vdpbf16ps` multiplies them into fp32 sums. With GGUF's w = d q + m
// per group of 32 inputs (d, m in fp16, as the file stores them),
//   sum_k x_k w_k = d * sum_k x_k (128 + q_k) + (m - 128 d) * sum_k x_k,
// so each group needs its dot product with the shifted weights, the sum of its inputs, and two
// multiply-adds with per-column constants. The products are exact (bf16 x bf16 in fp32) and sums
// are fp32, as in a bf16 GEMM.
//
// Weight layout (made by tessera/plugins/quantization/gguf.py, `int4_repack`): columns in blocks
// of 16, inputs in groups of 32; a group of a block is 256 bytes, four chunks of 64 bytes. A chunk
// holds 4 pairs of inputs (t = 0..3) for the 16 columns, arranged so that AVX-512's byte unpack
// (which works within 128-bit lanes) yields, for pair t, the 32 words [col j, input 2t + u] at
// position 2j + u: low nibbles carry pairs 0 and 1, high nibbles pairs 2 and 3; pairs 0 and 2
// sit in bytes 0-7 of each 16-byte lane, pairs 1 and 3 in bytes 8-15.

#include <torch/extension.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
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

constexpr int kGroup = 32;       // inputs per quantization group
constexpr int kBlock = 16;       // output columns per block (one zmm of fp32 sums)
constexpr int kGroupBytes = 256;  // one group of one column block
constexpr int kMaxRows = 8;      // rows sharing each unpacked weight register

// One block of 16 columns for R rows: y[r, cols] = sum over groups.
template <int R>
inline void block_rows(const uint32_t* x_pairs, int64_t pairs_per_row, const float* x_group_sums,
                       int64_t groups, const uint8_t* weights, const at::Half* scales_mins,
                       const float* bias, at::BFloat16* y, int64_t ldy) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512i bf16_128 = _mm512_set1_epi8(0x43);
  const __m512 shift = _mm512_set1_ps(128.0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_ps();
    const uint8_t* w = weights + g * kGroupBytes;
    const uint32_t* xg = x_pairs + g * (kGroup / 2);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i bytes = _mm512_loadu_si512(w + 64 * c);
      const __m512i lo = _mm512_and_si512(bytes, low_nibbles);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
      const __m512bh pair[4] = {
          (__m512bh)_mm512_unpacklo_epi8(lo, bf16_128), (__m512bh)_mm512_unpackhi_epi8(lo, bf16_128),
          (__m512bh)_mm512_unpacklo_epi8(hi, bf16_128), (__m512bh)_mm512_unpackhi_epi8(hi, bf16_128)};
      for (int t = 0; t < 4; ++t) {
        for (int r = 0; r < R; ++r) {
          const __m512bh xx = (__m512bh)_mm512_set1_epi32(xg[r * pairs_per_row + 4 * c + t]);
          dot[r] = _mm512_dpbf16_ps(dot[r], pair[t], xx);
        }
      }
    }
    const at::Half* dm = scales_mins + g * 2 * kBlock;  // 16 d, then 16 m
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + kBlock)));
    const __m512 offset = _mm512_fnmadd_ps(shift, scale, min);  // m - 128 d
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(dot[r], scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x_group_sums[r * groups + g]), offset, acc[r]);
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r], b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), (__m256i)out);
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const float*, int64_t, const uint8_t*, const at::Half*,
                         const float*, at::BFloat16*, int64_t);
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

  // Per row and group, the sum of the (bf16) inputs.
  std::vector<float> group_sums(rows * groups);
  const at::BFloat16* xd = x.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 lo = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xd + m * in_features + g * kGroup)));
      const __m512 hi = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xd + m * in_features + g * kGroup + 16)));
      group_sums[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  }

  const auto* x_pairs = reinterpret_cast<const uint32_t*>(xd);
  const int64_t pairs_per_row = in_features / 2;
  const uint8_t* wd = packed.data_ptr<uint8_t>();
  const at::Half* dm = scales_mins.data_ptr<at::Half>();
  at::BFloat16* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < rows; m += kMaxRows) {
        const int64_t count = std::min<int64_t>(kMaxRows, rows - m);
        kBlockFns[count](x_pairs + m * pairs_per_row, pairs_per_row, group_sums.data() + m * groups, groups,
                         wd + b * groups * kGroupBytes, dm + b * groups * 2 * kBlock,
                         bias_data ? bias_data + b * kBlock : nullptr, yd + m * out_features + b * kBlock,
                         out_features);
      }
    }
  });
  return y;
}

#else

torch::Tensor int4_linear(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                          const c10::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "int4_linear needs a CPU with AVX512-BF16 (and a build for it)");
}

#endif  // TESSERA_INT4_LINEAR

// The op is called from compiled graphs, so it is registered with the dispatcher here rather than
// wrapped in Python (which costs ~10 us a call, 1-2 ms a decode step). Its shape function (for
// the compiler) is registered in backends/cpu/int4_linear.py.
TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales_mins, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera, CPU, m) { m.impl("int4_linear", &int4_linear); }
