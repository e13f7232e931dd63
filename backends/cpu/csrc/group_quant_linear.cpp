// y = x W^T for bf16 activations and weights in groups of 32 inputs with 4- or 8-bit codes (GGUF
// Q4_0 / Q4_1 layers, a Q8_0 token table), on CPUs with AVX512-BF16 and AVX512-VNNI. Per group,
// w = d q + m with q an unsigned code and d, m in fp16, as GGUF stores them (Q4_0 is m = -8 d;
// Q8_0's signed values become q = value + 128 with m = -128 d).
//
// 4-bit codes (the model's layers) keep the activations in bf16: each code q (0..15) becomes the
// bf16 number 128 + q by placing the byte 0x43 above it (0x4300 is 128.0 in bf16, and 128..143
// are exact), so one unpack instruction turns 32 nibbles into 32 bf16 weights, and `vdpbf16ps`
// multiplies them into fp32 sums:
//   sum_k x_k w_k = d * sum_k x_k (128 + q_k) + (m - 128 d) * sum_k x_k.
// The products are exact (bf16 x bf16 in fp32) and sums fp32, as in a bf16 GEMM. Calls of 48
// rows or more (prompts) dequantize each block to bf16 weights once instead (below,
// kDequantizeFromRows): the weights are then rounded to bf16, as in a bf16 model. Rounding the
// activations to 8 bits instead (what llama.cpp does, and `vpdpbusd` runs twice as many products
// per instruction) was 1.3-2x faster, but its error, compounded over 30 layers, changed the
// default model's answers (the same ones llama.cpp gives) where the dequantized model's were right.
//
// 8-bit codes (the LM head, which only makes the final logits) take 8-bit activations: per row
// and group, x ~ s * xq with xq = round(x / s) in -127..127 and s = max|x| / 127, and
//   sum_k x_k w_k ~ s * (d * sum_k (q_k - 128) xq_k + (m + 128 d) * sum_k xq_k),
// where `vpdpbusd` multiplies 4 unsigned bytes (q) by 4 signed bytes (xq) into each of 16 int32
// lanes: 64 exact products per instruction, with no decoding at all, into sums that start at
// -128 sum_k xq_k. The second term is skipped for a group whose m + 128 d is 0 in every column, as
// in Q8_0: multiplies and FMAs run on the same pipes as `vpdpbusd` (on AVX-512 Zen 4 each takes a
// dot product's slot; conversions, shuffles and adds do not), so each one per row and group costs
// 1/8 of the group's work. The rounding adds ~0.6% relative error to the logits (bf16 inputs: ~0.2%).
//
// Weight layouts (made by backends/cpu/group_quant_linear.py, `repack`): columns in blocks of 16,
// inputs in groups of 32.
// - 4 bits: a group of a block is 256 bytes, four chunks of 64. A chunk holds 4 pairs of inputs
//   (t = 0..3) for the 16 columns, arranged so that AVX-512's byte unpack (which works within
//   128-bit lanes) yields, for pair t, the 32 words [col j, input 2t + u] at position 2j + u: low
//   nibbles carry pairs 0 and 1, high nibbles pairs 2 and 3; pairs 0 and 2 sit in bytes 0-7 of each
//   16-byte lane, pairs 1 and 3 in bytes 8-15.
// - 8 bits: a group of a block is 8 chunks of 64 bytes; byte 4 j + i of chunk c is column j's
//   input 4 c + i: the 16 lanes x 4 bytes `vpdpbusd` takes.

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// ATen's AVX-512 vector types, for exp_u20 (as in csrc/decoder_stack.cpp)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TESSERA_GROUP_QUANT_LINEAR 1
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#endif

bool group_quant_linear_supported() {
#ifdef TESSERA_GROUP_QUANT_LINEAR
  return true;
#else
  return false;
#endif
}

#ifdef TESSERA_GROUP_QUANT_LINEAR
namespace {

constexpr int kGroup = 32;             // inputs per quantization group
constexpr int kQuads = kGroup / 4;     // 4-byte input lanes per group
constexpr int kBlock = 16;             // output columns per block (one zmm of sums)
constexpr int k4BitGroupBytes = 256;   // one group of one column block, 4-bit codes
constexpr int k8BitGroupBytes = 512;   // the same, 8-bit codes
constexpr int kMaxRows = 8;            // rows sharing each decoded weight register
// While the kernels run a block for its first chunk of rows, they ask for the codes of the block
// this far ahead of it (in the same thread's range) into L2, a group at a time. Every decode step
// streams the model's weights (~76 MB) and the LM head's table (28 MB) from L3 or memory, and the
// hardware's prefetch alone left the kernels waiting: the LM head at 32 rows took ~13% longer,
// the decoder stack's step ~7% longer at 8 requests and ~3% at 32 (docs/benchmarks.md).
constexpr int64_t kPrefetchBlocks = 4;

// The activations in 8 bits: per row and group, x ~ scale * q, arranged for the kernel. Rows go
// in chunks of kMaxRows (the last one may be shorter); within a chunk of n rows, per group, quad c
// (4 inputs) of row r is at [c][r] (index c n + r) and the rows' scales and scaled sums follow the
// same order, so each broadcast in the kernel is one pointer plus a constant (indexed by row and
// group, GCC had spilled the addresses to the stack). One row keeps its quads contiguous.
struct QuantizedRows {
  std::vector<int32_t> quads;      // (chunks, groups, kQuads, n), n rows of a chunk
  std::vector<float> scale;        // (chunks, groups, n), n rows of a chunk
  std::vector<float> scaled_sum;   // (chunks, groups, n), n rows of a chunk: scale * sum of the group's q
  std::vector<int32_t> offset;     // (chunks, groups, n), n rows of a chunk: -128 * sum of the group's q
};

QuantizedRows quantize_rows(const at::BFloat16* x, int64_t rows, int64_t in_features) {
  const int64_t groups = in_features / kGroup;
  const int64_t chunks = (rows + kMaxRows - 1) / kMaxRows;
  QuantizedRows out{std::vector<int32_t>(chunks * groups * kQuads * kMaxRows),
                    std::vector<float>(chunks * groups * kMaxRows), std::vector<float>(chunks * groups * kMaxRows),
                    std::vector<int32_t>(chunks * groups * kMaxRows)};
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t chunk = m / kMaxRows, r = m % kMaxRows;
    const int64_t n = std::min<int64_t>(kMaxRows, rows - chunk * kMaxRows);  // rows in this chunk
    int32_t* quads = out.quads.data() + chunk * groups * kQuads * kMaxRows;
    float* scales = out.scale.data() + chunk * groups * kMaxRows;
    float* sums = out.scaled_sum.data() + chunk * groups * kMaxRows;
    int32_t* offsets = out.offset.data() + chunk * groups * kMaxRows;
    for (int64_t g = 0; g < groups; ++g) {
      const at::BFloat16* src = x + m * in_features + g * kGroup;
      const __m512 lo = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      const __m512 hi = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16)));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));  // rounds to nearest even
      const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
      int32_t group_quads[kQuads];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(group_quads), _mm512_cvtsepi32_epi8(q_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(group_quads + 4), _mm512_cvtsepi32_epi8(q_hi));
      for (int c = 0; c < kQuads; ++c) quads[(g * kQuads + c) * n + r] = group_quads[c];
      const float scale = amax / 127.0f;
      scales[g * n + r] = scale;
      const int32_t q_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
      sums[g * n + r] = scale * static_cast<float>(q_sum);
      offsets[g * n + r] = -128 * q_sum;
    }
  }
  return out;
}

// One row of a block's 16 outputs, in the output's dtype: bf16 for the layers (the model's
// activations), float32 for logits, which bf16 would round to steps of 0.125 at 16-32: enough to
// tie a greedy choice that the float sums had decided.
inline void store_block_row(at::BFloat16* y, __m512 values) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(values));
}
inline void store_block_row(float* y, __m512 values) { _mm512_storeu_ps(y, values); }

// Where the 4-bit kernels put a block's rows (16 columns each, bias added): the output rows, or
// one of the two passes of a gated MLP (gated_linear, below).
template <typename Out>
struct RowStore {
  Out* y;
  int64_t ldy;
  void operator()(int r, __m512 values) const { store_block_row(y + r * ldy, values); }
};

inline __m512 round_to_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

// The gate pass keeps each row's 16 gate values, rounded to bf16 as the layer's output would be.
struct GateStore {
  float* gate;  // (rows, 16)
  void operator()(int r, __m512 values) const { _mm512_storeu_ps(gate + 16 * r, round_to_bf16(values)); }
};

// The up pass writes silu(gate) * up, computed as the decoder stack's silu_mul computes it from
// the bf16 gate and up values (csrc/decoder_stack.cpp), so fusing changes no bit of the output.
struct GatedStore {
  const float* gate;  // (rows, 16), from the gate pass
  at::BFloat16* y;
  int64_t ldy;
  void operator()(int r, __m512 values) const {
    const __m512 g = _mm512_loadu_ps(gate + 16 * r), up = round_to_bf16(values);
    const __m512 e = static_cast<__m512>(at::vec::Vectorized<float>(_mm512_sub_ps(_mm512_setzero_ps(), g)).exp_u20());
    store_block_row(y + r * ldy, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), up));
  }
};

// Asks for one group of a block's codes (bytes long) into L2.
inline void prefetch_group(const uint8_t* codes, int bytes) {
  for (int line = 0; line < bytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(codes + line), _MM_HINT_T1);
}

// 8-bit codes, 8-bit activations: one block of 16 columns for R rows of one chunk of QuantizedRows.
// prefetch: a later block's codes (kPrefetchBlocks), or null.
template <int R, typename Out>
inline void int8_block_rows(const int32_t* x_quads, const float* x_scale, const float* x_sum, const int32_t* x_offset,
                            int64_t groups, const uint8_t* weights, const at::Half* scales_mins, const float* bias,
                            Out* y, int64_t ldy, const uint8_t* prefetch) {
  const __m512 shift = _mm512_set1_ps(128.0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* w = weights + g * k8BitGroupBytes;
    if (prefetch != nullptr) prefetch_group(prefetch + g * k8BitGroupBytes, k8BitGroupBytes);
    const int32_t* xg = x_quads + g * kQuads * R;
    const int32_t* og = x_offset + g * R;
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_set1_epi32(og[r]);
#pragma GCC unroll 8
    for (int c = 0; c < kQuads; ++c) {
      const __m512i q = _mm512_loadu_si512(w + 64 * c);
      for (int r = 0; r < R; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], q, _mm512_set1_epi32(xg[c * R + r]));
    }
    const at::Half* dm = scales_mins + g * 2 * kBlock;  // 16 d, then 16 m
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + kBlock)));
    const float* sg = x_scale + g * R;
    const float* mg = x_sum + g * R;
    for (int r = 0; r < R; ++r) {
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(sg[r]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), ds, acc[r]);
    }
    const __m512 rest = _mm512_fmadd_ps(shift, d, m);  // m + 128 d
    if (_mm512_cmp_ps_mask(rest, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0) {
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(rest, _mm512_set1_ps(mg[r]), acc[r]);
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) store_block_row(y + r * ldy, _mm512_add_ps(acc[r], b));
}

// One 64-byte chunk of a 4-bit group as its 4 pair vectors (layout above): each code q becomes
// the bf16 number 128 + q, the byte 0x43 placed above it.
inline void unpack_4bit_chunk(const uint8_t* chunk, __m512i pair[4]) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512i bf16_128 = _mm512_set1_epi8(0x43);
  const __m512i bytes = _mm512_loadu_si512(chunk);
  const __m512i lo = _mm512_and_si512(bytes, low_nibbles);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
  pair[0] = _mm512_unpacklo_epi8(lo, bf16_128);
  pair[1] = _mm512_unpackhi_epi8(lo, bf16_128);
  pair[2] = _mm512_unpacklo_epi8(hi, bf16_128);
  pair[3] = _mm512_unpackhi_epi8(hi, bf16_128);
}

// 4-bit codes, bf16 activations: one block of 16 columns for R rows, y[r, cols] = sum over groups.
// prefetch: a later block's codes (kPrefetchBlocks), or null.
template <int R, typename Store>
inline void bf16_block_rows(const uint32_t* x_pairs, int64_t pairs_per_row, const float* x_group_sums,
                       int64_t groups, const uint8_t* weights, const at::Half* scales_mins,
                       const float* bias, const Store& store, const uint8_t* prefetch) {
  const __m512 shift = _mm512_set1_ps(128.0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  // One pointer per row, advanced a group at a time: each broadcast below is then that pointer
  // plus a constant. Indexing x_pairs by row and pair instead had the compiler keep 128 addresses,
  // spilled to the stack and reloaded before every broadcast.
  const uint32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x_pairs + r * pairs_per_row;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_ps();
    const uint8_t* w = weights + g * k4BitGroupBytes;
    if (prefetch != nullptr) prefetch_group(prefetch + g * k4BitGroupBytes, k4BitGroupBytes);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      __m512i pair[4];
      unpack_4bit_chunk(w + 64 * c, pair);
      for (int t = 0; t < 4; ++t) {
        for (int r = 0; r < R; ++r) {
          const __m512bh xx = (__m512bh)_mm512_set1_epi32(xr[r][4 * c + t]);
          dot[r] = _mm512_dpbf16_ps(dot[r], (__m512bh)pair[t], xx);
        }
      }
    }
    for (int r = 0; r < R; ++r) xr[r] += kGroup / 2;
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
  for (int r = 0; r < R; ++r) store(r, _mm512_add_ps(acc[r], b));
}

template <typename Store>
using Bf16BlockFn = void (*)(const uint32_t*, int64_t, const float*, int64_t, const uint8_t*, const at::Half*,
                            const float*, const Store&, const uint8_t*);
template <typename Store>
constexpr Bf16BlockFn<Store> kBf16BlockFns[kMaxRows + 1] = {
    nullptr,                   bf16_block_rows<1, Store>, bf16_block_rows<2, Store>, bf16_block_rows<3, Store>,
    bf16_block_rows<4, Store>, bf16_block_rows<5, Store>, bf16_block_rows<6, Store>, bf16_block_rows<7, Store>,
    bf16_block_rows<8, Store>};

template <typename Out>
using Int8BlockFn = void (*)(const int32_t*, const float*, const float*, const int32_t*, int64_t, const uint8_t*,
                             const at::Half*, const float*, Out*, int64_t, const uint8_t*);
template <typename Out>
constexpr Int8BlockFn<Out> kInt8BlockFns[kMaxRows + 1] = {
    nullptr,                 int8_block_rows<1, Out>, int8_block_rows<2, Out>, int8_block_rows<3, Out>,
    int8_block_rows<4, Out>, int8_block_rows<5, Out>, int8_block_rows<6, Out>, int8_block_rows<7, Out>,
    int8_block_rows<8, Out>};

// From 48 rows (prompts) a thread first dequantizes each of its blocks of 4-bit codes to bf16
// weights, once, and every chunk of rows then runs plain bf16 dot products over them, with no
// per-group epilogue: in bf16_block_rows the two FMAs per row and group take a dot product's slot
// each (on AVX-512 Zen 4 multiplies share the dot products' pipes), 17 of every 145, while
// dequantizing costs 32 FMAs per group and block once per call, plus its stores and the reloads
// of a block (18-48 KiB). Measured over the default model's 120 matrices (docs/benchmarks.md):
// 6-10% faster at 128 rows, even at 48 and 64, slower at 24 and no faster at 32, hence the
// threshold. Each weight is then rounded to bf16 (relative error 2^-9), which left the default
// model's top-1 agreement with its float32 model unchanged (benchmarks/weight_rounding_agreement.py).
constexpr int64_t kDequantizeFromRows = 6 * kMaxRows;

// One block's weights as bf16 pairs: for group g, pair p (inputs 2p, 2p + 1 of the group), the 16
// columns' pairs at out[(g * 16 + p) * 16 + j], the order the rows' input pairs come in.
inline void dequantize_block(const uint8_t* weights, const at::Half* scales_mins, int64_t groups, uint32_t* out) {
  const __m512i high_words = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 shift = _mm512_set1_ps(128.0f);
  // words of cvtne2ps(odd, even) are even[0..15], odd[0..15]; word 2j + u of a pair vector is
  // column j's input u: even[j] at 2j, odd[j] at 2j + 1
  alignas(64) int16_t order[32];
  for (int j = 0; j < 16; ++j) order[2 * j] = static_cast<int16_t>(j), order[2 * j + 1] = static_cast<int16_t>(16 + j);
  const __m512i interleave = _mm512_load_si512(order);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* w = weights + g * k4BitGroupBytes;
    const at::Half* dm = scales_mins + g * 2 * kBlock;
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + kBlock)));
    const __m512 offset = _mm512_fnmadd_ps(shift, scale, min);  // m - 128 d
    for (int c = 0; c < 4; ++c) {
      __m512i pair[4];
      unpack_4bit_chunk(w + 64 * c, pair);
      for (int t = 0; t < 4; ++t) {  // 128 + q as bf16 words -> d (128 + q) + m - 128 d, rounded to bf16
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pair[t], 16));
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pair[t], high_words));
        const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(odd, scale, offset), _mm512_fmadd_ps(even, scale, offset));
        _mm512_storeu_si512(out + (g * 16 + 4 * c + t) * 16, _mm512_permutexvar_epi16(interleave, (__m512i)both));
      }
    }
  }
}

// Plain bf16 dot products of R rows against a dequantized block (16 columns).
template <int R, typename Store>
inline void dense_block_rows(const uint32_t* x_pairs, int64_t pairs_per_row, const uint32_t* weights, int64_t pairs,
                             const float* bias, const Store& store) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x_pairs + r * pairs_per_row;
#pragma GCC unroll 4
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(weights + p * 16);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], w, (__m512bh)_mm512_set1_epi32(xr[r][p]));
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) store(r, _mm512_add_ps(acc[r], b));
}

template <typename Store>
using DenseBlockFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, const float*, const Store&);
template <typename Store>
constexpr DenseBlockFn<Store> kDenseBlockFns[kMaxRows + 1] = {
    nullptr,                    dense_block_rows<1, Store>, dense_block_rows<2, Store>, dense_block_rows<3, Store>,
    dense_block_rows<4, Store>, dense_block_rows<5, Store>, dense_block_rows<6, Store>, dense_block_rows<7, Store>,
    dense_block_rows<8, Store>};

// Per row and group of 32 inputs, the sum of the (bf16) inputs: the exact kernel's zero-point term.
std::vector<float> input_group_sums(const at::BFloat16* xd, int64_t rows, int64_t in_features) {
  const int64_t groups = in_features / kGroup;
  std::vector<float> sums(rows * groups);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const at::BFloat16* src = xd + m * in_features + g * kGroup;
      const __m512 lo = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      const __m512 hi = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16)));
      sums[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  }
  return sums;
}

// The 4-bit kernel over one block for the chunk of up to kMaxRows rows starting at row m: on the
// dequantized block (prompt-sized calls) or on its codes, with the rows' group sums.
struct BlockChunks {
  const uint32_t* x_pairs;
  int64_t rows, pairs_per_row, groups;
  const float* group_sums;  // null: the block comes dequantized

  template <typename Store>
  void operator()(int64_t m, const uint8_t* codes, const at::Half* scales_mins, const uint32_t* dequantized,
                  const float* bias, const Store& store, const uint8_t* prefetch = nullptr) const {
    const int64_t count = std::min<int64_t>(kMaxRows, rows - m);
    if (group_sums == nullptr)
      kDenseBlockFns<Store>[count](x_pairs + m * pairs_per_row, pairs_per_row, dequantized, pairs_per_row, bias, store);
    else
      kBf16BlockFns<Store>[count](x_pairs + m * pairs_per_row, pairs_per_row, group_sums + m * groups, groups, codes,
                                  scales_mins, bias, store, m == 0 ? prefetch : nullptr);
  }
};

// y = x W^T for 4-bit codes, bf16 activations.
template <typename Out>
void bf16_linear(const at::BFloat16* xd, int64_t rows, int64_t in_features, int64_t blocks, const uint8_t* wd,
                 const at::Half* dm, const float* bias, Out* yd, int64_t out_features) {
  const int64_t groups = in_features / kGroup, pairs_per_row = in_features / 2;
  const bool dequantize = rows >= kDequantizeFromRows;
  const std::vector<float> group_sums = dequantize ? std::vector<float>() : input_group_sums(xd, rows, in_features);
  const BlockChunks chunk{reinterpret_cast<const uint32_t*>(xd), rows, pairs_per_row, groups,
                          dequantize ? nullptr : group_sums.data()};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> block(dequantize ? pairs_per_row * kBlock : 0);
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* codes = wd + b * groups * k4BitGroupBytes;
      const at::Half* scales_mins = dm + b * groups * 2 * kBlock;
      if (dequantize) dequantize_block(codes, scales_mins, groups, block.data());
      const uint8_t* ahead = b + kPrefetchBlocks < end ? wd + (b + kPrefetchBlocks) * groups * k4BitGroupBytes : nullptr;
      for (int64_t m = 0; m < rows; m += kMaxRows)
        chunk(m, codes, scales_mins, block.data(), bias ? bias + b * kBlock : nullptr,
              RowStore<Out>{yd + m * out_features + b * kBlock, out_features}, ahead);
    }
  });
}

// y = silu(x W_gate^T) * (x W_up^T) for a 4-bit [gate | up] weight with 2 width outputs; y is
// (rows, width) bf16. Block j of the gate and block j of the up projection run one after the
// other on each chunk of rows, the gate's values kept in a 512-byte buffer, so the activation
// needs no pass of its own over a (rows, 2 width) product written out and read back.
void gated_linear(const at::BFloat16* xd, int64_t rows, int64_t in_features, int64_t blocks, const uint8_t* wd,
                  const at::Half* dm, const float* bias, at::BFloat16* yd) {
  const int64_t groups = in_features / kGroup, pairs_per_row = in_features / 2;
  const int64_t half = blocks / 2, width = half * kBlock;
  const bool dequantize = rows >= kDequantizeFromRows;
  const std::vector<float> group_sums = dequantize ? std::vector<float>() : input_group_sums(xd, rows, in_features);
  const BlockChunks chunk{reinterpret_cast<const uint32_t*>(xd), rows, pairs_per_row, groups,
                          dequantize ? nullptr : group_sums.data()};
  at::parallel_for(0, half, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> gate_block(dequantize ? pairs_per_row * kBlock : 0), up_block(gate_block.size());
    alignas(64) float gate[kMaxRows * kBlock];
    for (int64_t j = begin; j < end; ++j) {
      const uint8_t* gate_codes = wd + j * groups * k4BitGroupBytes;
      const uint8_t* up_codes = wd + (j + half) * groups * k4BitGroupBytes;
      const at::Half* gate_scales = dm + j * groups * 2 * kBlock;
      const at::Half* up_scales = dm + (j + half) * groups * 2 * kBlock;
      if (dequantize) {
        dequantize_block(gate_codes, gate_scales, groups, gate_block.data());
        dequantize_block(up_codes, up_scales, groups, up_block.data());
      }
      const bool has_ahead = j + kPrefetchBlocks < end;
      const uint8_t* gate_ahead = has_ahead ? gate_codes + kPrefetchBlocks * groups * k4BitGroupBytes : nullptr;
      const uint8_t* up_ahead = has_ahead ? up_codes + kPrefetchBlocks * groups * k4BitGroupBytes : nullptr;
      for (int64_t m = 0; m < rows; m += kMaxRows) {
        chunk(m, gate_codes, gate_scales, gate_block.data(), bias ? bias + j * kBlock : nullptr, GateStore{gate},
              gate_ahead);
        chunk(m, up_codes, up_scales, up_block.data(), bias ? bias + (j + half) * kBlock : nullptr,
              GatedStore{gate, yd + m * width + j * kBlock, width}, up_ahead);
      }
    }
  });
}

// y = x W^T for 8-bit codes, 8-bit activations.
template <typename Out>
void int8_linear(const at::BFloat16* xd, int64_t rows, int64_t in_features, int64_t blocks, const uint8_t* wd,
                 const at::Half* dm, const float* bias, Out* yd, int64_t out_features) {
  const int64_t groups = in_features / kGroup;
  const QuantizedRows xq = quantize_rows(xd, rows, in_features);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* ahead = b + kPrefetchBlocks < end ? wd + (b + kPrefetchBlocks) * groups * k8BitGroupBytes : nullptr;
      for (int64_t m = 0; m < rows; m += kMaxRows) {
        const int64_t count = std::min<int64_t>(kMaxRows, rows - m);
        const int64_t chunk = m / kMaxRows;
        kInt8BlockFns<Out>[count](xq.quads.data() + chunk * groups * kQuads * kMaxRows,
                                  xq.scale.data() + chunk * groups * kMaxRows,
                                  xq.scaled_sum.data() + chunk * groups * kMaxRows,
                                  xq.offset.data() + chunk * groups * kMaxRows, groups,
                                  wd + b * groups * k8BitGroupBytes, dm + b * groups * 2 * kBlock,
                                  bias ? bias + b * kBlock : nullptr, yd + m * out_features + b * kBlock, out_features,
                                  m == 0 ? ahead : nullptr);
      }
    }
  });
}

}  // namespace

template <typename Out>
void run_linear(int bits, const at::BFloat16* xd, int64_t rows, int64_t in_features, int64_t blocks,
                const uint8_t* wd, const at::Half* dm, const float* bias, Out* yd, int64_t out_features) {
  const auto linear = bits == 4 ? bf16_linear<Out> : int8_linear<Out>;
  linear(xd, rows, in_features, blocks, wd, dm, bias, yd, out_features);
}

namespace {

// A call's inputs, checked: x: (..., K) bf16; packed: (N/16, K/32, 256) uint8 for 4-bit codes,
// (N/16, K/32, 512) for 8-bit; scales_mins: (N/16, K/32, 32) fp16, per block and group the 16
// columns' d, then their m; bias: (N,) or none.
struct GroupQuantCall {
  torch::Tensor x, bias_fp32;  // x as (rows, K), contiguous
  int bits;
  int64_t rows, in_features, blocks;

  GroupQuantCall(const char* op, const torch::Tensor& input, const torch::Tensor& packed,
                 const torch::Tensor& scales_mins, const c10::optional<torch::Tensor>& bias) {
    TORCH_CHECK(input.dim() >= 1 && input.scalar_type() == at::kBFloat16 && input.device().is_cpu(), op,
                ": x must be a bf16 CPU tensor");
    TORCH_CHECK(packed.dim() == 3 && (packed.size(2) == 256 || packed.size(2) == 512) &&
                    packed.scalar_type() == at::kByte && packed.is_contiguous(),
                op, ": packed must be a contiguous (N/16, K/32, 256 or 512) uint8 tensor");
    bits = packed.size(2) == k4BitGroupBytes ? 4 : 8;
    in_features = input.size(-1);
    x = input.reshape({-1, in_features}).contiguous();
    rows = x.size(0);
    blocks = packed.size(0);
    const int64_t groups = packed.size(1);
    TORCH_CHECK(groups * kGroup == in_features, op, ": x has ", in_features, " inputs, the weight ", groups * kGroup);
    TORCH_CHECK(scales_mins.scalar_type() == at::kHalf && scales_mins.is_contiguous() &&
                    scales_mins.numel() == blocks * groups * 2 * kBlock,
                op, ": scales_mins must be a contiguous (N/16, K/32, 32) fp16 tensor");
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->numel() == blocks * kBlock, op, ": bias must have ", blocks * kBlock, " values");
      bias_fp32 = bias->to(at::kFloat).contiguous();
    }
  }
  const float* bias_data() const { return bias_fp32.defined() ? bias_fp32.data_ptr<float>() : nullptr; }
  torch::Tensor empty_output(const torch::Tensor& input, int64_t features, at::ScalarType dtype) const {
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
    shape.back() = features;
    return torch::empty(shape, x.options().dtype(dtype));
  }
};

}  // namespace

// y = x W^T (+ bias), (..., N) in out_dtype: bf16 (the default) or float32.
torch::Tensor group_quant_linear(const torch::Tensor& input, const torch::Tensor& packed,
                                 const torch::Tensor& scales_mins, const c10::optional<torch::Tensor>& bias,
                                 c10::optional<at::ScalarType> out_dtype) {
  const GroupQuantCall call("group_quant_linear", input, packed, scales_mins, bias);
  const at::ScalarType y_dtype = out_dtype.value_or(at::kBFloat16);
  TORCH_CHECK(y_dtype == at::kBFloat16 || y_dtype == at::kFloat, "group_quant_linear: out_dtype must be bf16 or float32");
  const int64_t out_features = call.blocks * kBlock;
  torch::Tensor y = call.empty_output(input, out_features, y_dtype);
  if (call.rows == 0) return y;
  const auto* xd = call.x.data_ptr<at::BFloat16>();
  const auto* wd = packed.data_ptr<uint8_t>();
  const auto* dm = scales_mins.data_ptr<at::Half>();
  if (y_dtype == at::kFloat)
    run_linear(call.bits, xd, call.rows, call.in_features, call.blocks, wd, dm, call.bias_data(), y.data_ptr<float>(),
               out_features);
  else
    run_linear(call.bits, xd, call.rows, call.in_features, call.blocks, wd, dm, call.bias_data(),
               y.data_ptr<at::BFloat16>(), out_features);
  return y;
}

// y = silu(x W_gate^T) * (x W_up^T) for 4-bit codes of [W_gate | W_up] (N outputs, gate first):
// (..., N/2) bf16, bit for bit the bf16 product of group_quant_linear followed by the decoder
// stack's silu_mul, without the (..., N) product in between.
torch::Tensor group_quant_gated_linear(const torch::Tensor& input, const torch::Tensor& packed,
                                       const torch::Tensor& scales_mins, const c10::optional<torch::Tensor>& bias) {
  const GroupQuantCall call("group_quant_gated_linear", input, packed, scales_mins, bias);
  TORCH_CHECK(call.bits == 4 && call.blocks % 2 == 0,
              "group_quant_gated_linear: packed must hold 4-bit codes of an even number of 16-column blocks");
  torch::Tensor y = call.empty_output(input, call.blocks / 2 * kBlock, at::kBFloat16);
  if (call.rows == 0) return y;
  gated_linear(call.x.data_ptr<at::BFloat16>(), call.rows, call.in_features, call.blocks, packed.data_ptr<uint8_t>(),
               scales_mins.data_ptr<at::Half>(), call.bias_data(), y.data_ptr<at::BFloat16>());
  return y;
}

#else

torch::Tensor group_quant_linear(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 const c10::optional<torch::Tensor>&, c10::optional<at::ScalarType>) {
  TORCH_CHECK(false, "group_quant_linear needs a CPU with AVX512-BF16 and AVX512-VNNI (and a build for it)");
}

torch::Tensor group_quant_gated_linear(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                       const c10::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "group_quant_gated_linear needs a CPU with AVX512-BF16 and AVX512-VNNI (and a build for it)");
}

#endif  // TESSERA_GROUP_QUANT_LINEAR

namespace {

// Where input k (0..31) of column j (0..15) sits in one group of a block: its byte among the
// group's and, for 4-bit codes, whether it is the byte's high nibble. The inverse of the layouts
// at the top of this file (made by `repack`, backends/cpu/group_quant_linear.py).
struct CodePlace {
  int byte;
  bool high;
};

CodePlace code_place(int bits, int k, int j) {
  if (bits == 8) return {(k / 4) * 64 + 4 * j + k % 4, false};
  // chunk k / 8 holds inputs 8c..8c+7 as pairs 0-3: pairs 0 and 1 in the low nibbles, 2 and 3 in
  // the high ones; pair p's word for column j and input u is 2 j + u, and word w of 16-byte lane
  // w / 8 comes from byte w % 8 of it (pairs 0 and 2) or byte 8 + w % 8 (pairs 1 and 3)
  const int pair = (k % 8) / 2, word = 2 * j + k % 2;
  return {(k / 8) * 64 + 16 * (word / 8) + 8 * (pair % 2) + word % 8, pair >= 2};
}

// Rows `ids` of W, decoded: w = d q + m in float32, rounded once to Out, as the dequantized
// table holds it (q d is exact in float32: a code of at most 8 bits times an fp16 scale).
template <typename Out>
void decode_rows(const int64_t* ids, int64_t count, int bits, int64_t groups, const uint8_t* packed,
                 const at::Half* scales_mins, Out* out) {
  const int64_t group_bytes = bits * 64, in_features = groups * 32;
  CodePlace places[16][32];
  for (int j = 0; j < 16; ++j)
    for (int k = 0; k < 32; ++k) places[j][k] = code_place(bits, k, j);
  // a row's codes are cache misses more than work (the table is read a few rows a step), so
  // the threads share even a decode step's rows
  at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = ids[t] / 16;
      const int j = static_cast<int>(ids[t] % 16);
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* codes = packed + (block * groups + g) * group_bytes;
        const at::Half* dm = scales_mins + (block * groups + g) * 32;  // 16 d, then 16 m
        const float d = float(dm[j]), m = float(dm[16 + j]);
        for (int k = 0; k < 32; ++k) {
          const CodePlace place = places[j][k];
          const int q = place.high ? codes[place.byte] >> 4 : bits == 4 ? codes[place.byte] & 0x0F : codes[place.byte];
          out[t * in_features + g * 32 + k] = Out(float(q) * d + m);
        }
      }
    }
  });
}

}  // namespace

// Rows `ids` (any shape, int64) of the weight packed for group_quant_linear: (..., K) in out_dtype
// (bf16, the default, or float32). The embedding lookup of a token table kept in this layout.
torch::Tensor group_quant_embedding(const torch::Tensor& ids, const torch::Tensor& packed,
                                    const torch::Tensor& scales_mins, c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.device().is_cpu(), "group_quant_embedding: ids must be int64 on the CPU");
  TORCH_CHECK(packed.dim() == 3 && (packed.size(2) == 256 || packed.size(2) == 512) &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "group_quant_embedding: packed must be a contiguous (N/16, K/32, 256 or 512) uint8 tensor");
  const int64_t rows = packed.size(0) * 16, groups = packed.size(1);
  TORCH_CHECK(scales_mins.scalar_type() == at::kHalf && scales_mins.is_contiguous() &&
                  scales_mins.numel() == packed.size(0) * groups * 32,
              "group_quant_embedding: scales_mins must be a contiguous (N/16, K/32, 32) fp16 tensor");
  const at::ScalarType dtype = out_dtype.value_or(at::kBFloat16);
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "group_quant_embedding: out_dtype must be bf16 or float32");
  const torch::Tensor flat = ids.reshape(-1).contiguous();
  const int64_t* index = flat.data_ptr<int64_t>();
  for (int64_t t = 0; t < flat.numel(); ++t)
    TORCH_CHECK(index[t] >= 0 && index[t] < rows, "group_quant_embedding: id ", index[t], " is outside the table's ",
                rows, " rows");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(groups * 32);
  torch::Tensor out = torch::empty(shape, packed.options().dtype(dtype));
  const int bits = packed.size(2) == 256 ? 4 : 8;
  if (dtype == at::kFloat)
    decode_rows(index, flat.numel(), bits, groups, packed.data_ptr<uint8_t>(), scales_mins.data_ptr<at::Half>(),
                out.data_ptr<float>());
  else
    decode_rows(index, flat.numel(), bits, groups, packed.data_ptr<uint8_t>(), scales_mins.data_ptr<at::Half>(),
                out.data_ptr<at::BFloat16>());
  return out;
}

// The ops are called from compiled graphs, so they are registered with the dispatcher here rather
// than wrapped in Python (which costs ~10 us a call, 1-2 ms a decode step). Their shape functions
// (for the compiler) are registered in backends/cpu/group_quant_linear.py.
TORCH_LIBRARY_FRAGMENT(tessera, m) {
  m.def("group_quant_linear(Tensor x, Tensor packed, Tensor scales_mins, Tensor? bias, ScalarType? out_dtype=None) -> Tensor");
  m.def("group_quant_embedding(Tensor ids, Tensor packed, Tensor scales_mins, ScalarType? out_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera, CPU, m) {
  m.impl("group_quant_linear", &group_quant_linear);
  m.impl("group_quant_embedding", &group_quant_embedding);
}
