// Single-query (decode) attention read straight from the paged KV cache, for CPUs.
//
// Every decoding request attends its one new query token to all of its cached tokens. Doing
// that with stock torch ops means gathering each request's blocks into a padded tensor per layer
// and running tiny batched matmuls, which costs far more than the arithmetic. This kernel walks
// the block table instead: a task reads each cached key and value row once, for all the query
// heads that share it (grouped-query attention), with a float32 softmax. Tasks are split over
// torch's intra-op (OpenMP) threads.
//
// The arithmetic is written with GCC/Clang vector types of 16 floats, which the compiler lowers
// to whatever -march=native offers (one AVX-512 register, two AVX2 ones, ...): a row is widened
// to float32 once, then each query head takes one fused multiply-add per 16 dimensions.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// ATen's AVX-512 vector types (torch's own kernels are built per capability the same way): the
// prefill kernel's softmax takes their exp_u20, the fast exp torch's CPU flash attention uses
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <torch/extension.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/cpu/vec/vec.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
typedef float floatv __attribute__((vector_size(kLanes * sizeof(float))));

inline floatv load(const float* p) {
  floatv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, floatv v) { std::memcpy(p, &v, sizeof v); }

// head_dim / kLanes accumulators a head keeps in registers at once (128 dimensions)
constexpr int64_t kMaxHeld = 8;

inline float sum(floatv v) {
  float total = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) total += v[i];  // -ffast-math: a tree of vector adds
  return total;
}

// n values of the cache's dtype -> float32
template <typename scalar_t>
inline void widen(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void widen<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);  // bf16 is the top half of a float32
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &word, sizeof word);
  }
}

// exp() of scores this far below the maximum is ~1e-38, the smallest normal float32: below it
// glibc's vector exp takes a slow scalar path for the whole vector (the causal mask's scores did
// in every prefill tile, before that kernel took ATen's exp: 206 against 143 us a layer for a
// 128-token prompt)
constexpr float kExpFloor = -87.f;

// s[0..n) = softmax(s[0..n)), in float32 (no infinities: the file is built with -ffast-math);
// returns the scores' maximum and the sum of their exponentials less that maximum
inline std::pair<float, float> softmax_in_place(float* s, int64_t n) {
  float max_score = s[0];
  for (int64_t i = 1; i < n; ++i) max_score = std::max(max_score, s[i]);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(std::max(s[i] - max_score, kExpFloor));
    total += s[i];
  }
  const float inv = 1.f / total;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
  return {max_score, total};
}

// out[t] = sum of the lanes of v[t], for kLanes vectors: one transposing reduction instead of
// kLanes separate horizontal sums (AVX-512: 15 adds and 30 shuffles for 16 dot products).
inline void sum_each(const floatv* v, float* out) {
#if defined(__AVX512F__)
  __m512 pairs[8], quads[4], octets[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    const __m512 a = (__m512)v[2 * i], b = (__m512)v[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums for vectors 4i..4i+3
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: (4 sums of vectors 8i..8i+3) x 2 halves, then 8i+4..
    octets[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(octets[0], octets[1], 0x88),
                                      _mm512_shuffle_f32x4(octets[0], octets[1], 0xDD)));
#else
  for (int64_t t = 0; t < kLanes; ++t) out[t] = sum(v[t]);
#endif
}

// Runs body(begin, end) over tasks [0, num_tasks), one contiguous range per torch thread, the
// ranges of about equal cost (cost_before[i]: the summed cost of tasks 0..i-1, num_tasks + 1
// entries). A decode step's requests have contexts of different lengths: split by count, one
// thread would finish early and wait for the other at the barrier.
template <typename F>
void for_balanced_ranges(const std::vector<int64_t>& cost_before, const F& body) {
  const int64_t num_tasks = static_cast<int64_t>(cost_before.size()) - 1;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (parts <= 1) {
    if (num_tasks > 0) body(0, num_tasks);
    return;
  }
  const int64_t total = cost_before.back();
  auto bound = [&](int64_t part) -> int64_t {  // the first task of a part
    if (part >= parts) return num_tasks;
    return std::lower_bound(cost_before.begin(), cost_before.end(), total * part / parts) - cost_before.begin();
  };
  at::parallel_for(0, parts, 1, [&](int64_t first_part, int64_t end_part) {
    for (int64_t part = first_part; part < end_part; ++part) {
      const int64_t begin = bound(part), end = bound(part + 1);
      if (begin < end) body(begin, end);
    }
  });
}

// Decode work is cut into pieces: a piece is one request's cached positions [begin, end), for all
// its KV heads, so each cached slot is read in one contiguous pass. The requests are laid end to
// end, each costing its cached tokens plus kQueryCost for its query and output, and the whole is
// cut into one equal share per thread at multiples of kLanes positions. A request that a cut
// falls inside is split: each of its pieces keeps its softmax-weighted values in float32 with its
// scores' maximum and total, and the pieces are merged after (the log-sum-exp merge of
// flash-decoding). So a lone long request uses every thread, and a long request next to short
// ones leaves no thread waiting at the barrier.
constexpr int64_t kQueryCost = 16;

struct DecodePiece {
  int64_t req, begin, end;
  int64_t part;  // the piece's row in the split buffers, or -1 for a whole request
};

struct SplitRequest {
  int64_t req, first_part, parts;  // its pieces are rows [first_part, first_part + parts) of the split buffers
};

struct DecodePlan {
  std::vector<DecodePiece> pieces;    // in request order
  std::vector<int64_t> thread_first;  // thread i's pieces: [thread_first[i], thread_first[i + 1])
  std::vector<SplitRequest> splits;
  int64_t num_parts = 0;  // pieces of split requests
};

inline DecodePlan plan_decode(int64_t num_reqs, const int32_t* lens, int64_t num_threads) {
  std::vector<int64_t> cost_before(num_reqs + 1, 0);
  for (int64_t r = 0; r < num_reqs; ++r) cost_before[r + 1] = cost_before[r] + kQueryCost + lens[r];
  const int64_t shares = std::max<int64_t>(1, std::min(num_threads, num_reqs > 0 ? cost_before.back() : 1));
  // thread i starts at (request, position) cuts[i]; (r, lens[r]) is written (r + 1, 0)
  std::vector<std::pair<int64_t, int64_t>> cuts(shares + 1, {num_reqs, 0});
  cuts[0] = {0, 0};
  for (int64_t i = 1; i < shares; ++i) {
    const int64_t cost = cost_before.back() * i / shares;
    const int64_t r = std::upper_bound(cost_before.begin(), cost_before.end(), cost) - cost_before.begin() - 1;
    int64_t position = (cost - cost_before[r] - kQueryCost + kLanes / 2) / kLanes * kLanes;
    position = std::max<int64_t>(0, position);
    cuts[i] = position >= lens[r] ? std::make_pair(r + 1, int64_t{0}) : std::make_pair(r, position);
    cuts[i] = std::max(cuts[i], cuts[i - 1]);
  }
  DecodePlan plan;
  for (int64_t i = 0; i < shares; ++i) {
    plan.thread_first.push_back(static_cast<int64_t>(plan.pieces.size()));
    const auto [first_req, first_pos] = cuts[i];
    const auto [end_req, end_pos] = cuts[i + 1];
    for (int64_t r = first_req; r < std::min(end_req + 1, num_reqs); ++r) {
      const int64_t begin = r == first_req ? first_pos : 0, end = r == end_req ? end_pos : lens[r];
      if (begin < end) plan.pieces.push_back({r, begin, end, -1});
    }
  }
  plan.thread_first.push_back(static_cast<int64_t>(plan.pieces.size()));
  for (DecodePiece& piece : plan.pieces) {
    if (piece.begin == 0 && piece.end == lens[piece.req]) continue;
    if (piece.begin == 0) plan.splits.push_back({piece.req, plan.num_parts, 0});
    ++plan.splits.back().parts;
    piece.part = plan.num_parts++;
  }
  return plan;
}

// Runs every piece of the plan on its thread through worker(piece, the thread's next piece or
// nullptr, out_rows, maxima, totals), one worker per thread from make_worker(). The worker leaves
// the piece's attention output, its softmax normalized over the piece alone, in out_rows
// (num_heads x head_dim float32), and each query head's score maximum and exponential sum in
// maxima and totals. A whole request's output is written to out; the pieces of a split request
// are merged into it after.
template <typename scalar_t, typename MakeWorker>
void run_decode_plan(const DecodePlan& plan, int64_t num_heads, int64_t head_dim, scalar_t* out_data,
                     const MakeWorker& make_worker) {
  const int64_t row_floats = num_heads * head_dim;
  std::vector<float> part_rows(plan.num_parts * row_floats), part_maxima(plan.num_parts * num_heads),
      part_totals(plan.num_parts * num_heads);
  const int64_t shares = static_cast<int64_t>(plan.thread_first.size()) - 1;
  at::parallel_for(0, shares, 1, [&](int64_t first_share, int64_t end_share) {
    std::vector<float> out_rows(row_floats), maxima(num_heads), totals(num_heads);
    auto worker = make_worker();
    const int64_t last = plan.thread_first[end_share];
    for (int64_t p = plan.thread_first[first_share]; p < last; ++p) {
      const DecodePiece& piece = plan.pieces[p];
      worker(piece, p + 1 < last ? &plan.pieces[p + 1] : nullptr, out_rows.data(), maxima.data(), totals.data());
      if (piece.part < 0) {
        scalar_t* o = out_data + piece.req * row_floats;
        for (int64_t i = 0; i < row_floats; ++i) o[i] = static_cast<scalar_t>(out_rows[i]);
      } else {
        std::copy(out_rows.begin(), out_rows.end(), part_rows.begin() + piece.part * row_floats);
        std::copy(maxima.begin(), maxima.end(), part_maxima.begin() + piece.part * num_heads);
        std::copy(totals.begin(), totals.end(), part_totals.begin() + piece.part * num_heads);
      }
    }
  });
  // each split request: out_h = sum_p w_p o_ph / sum_p w_p, w_p = total_ph * exp(max_ph - max_h)
  if (plan.splits.empty()) return;
  std::vector<float> merged(head_dim);
  for (const auto& [req, first_part, parts] : plan.splits) {
    for (int64_t h = 0; h < num_heads; ++h) {
      auto max_of = [&](int64_t part) { return part_maxima[part * num_heads + h]; };
      float max_score = max_of(first_part);
      for (int64_t p = 1; p < parts; ++p) max_score = std::max(max_score, max_of(first_part + p));
      std::fill(merged.begin(), merged.end(), 0.f);
      float weight_total = 0.f;
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t part = first_part + p;
        const float weight = part_totals[part * num_heads + h] * std::exp(max_of(part) - max_score);
        weight_total += weight;
        const float* rows = part_rows.data() + part * row_floats + h * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) merged[i] += weight * rows[i];
      }
      scalar_t* o = out_data + req * row_floats + h * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) o[i] = static_cast<scalar_t>(merged[i] / weight_total);
    }
  }
}

template <typename scalar_t, int64_t kChunks>
void decode_attention_kernel(
    at::Tensor& out,                // (num_reqs, num_heads, head_dim)
    const at::Tensor& query,        // (num_reqs, num_heads, head_dim)
    const at::Tensor& key_cache,    // (num_blocks, block_size, num_kv_heads, head_dim)
    const at::Tensor& value_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const at::Tensor& block_tables, // (num_reqs, max_blocks) int32
    const at::Tensor& seq_lens,     // (num_reqs,) int32
    double scale) {
  const int64_t num_reqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;  // query heads per KV head
  const int64_t max_blocks = block_tables.size(1);
  const int64_t token_stride = num_kv_heads * head_dim;  // between consecutive slots
  // head_dim / kLanes: a compile-time constant for the common head sizes, so each head's
  // accumulators stay in registers; 0 means head_dim is not a multiple of kLanes (scalar tails)
  const int64_t chunks = kChunks > 0 ? kChunks : (head_dim % kLanes == 0 ? head_dim / kLanes : 0);

  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const scalar_t* k_data = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = value_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();

  const DecodePlan plan = plan_decode(num_reqs, lens, at::get_num_threads());
  const int64_t row_len = token_stride;  // floats of one slot: every KV head
  run_decode_plan(plan, num_heads, head_dim, out_data, [&] {  // one worker per thread, with its buffers
    return [&, q = std::vector<float>(num_heads * head_dim), tile = std::vector<float>(kLanes * row_len),
            scores = std::vector<float>()](const DecodePiece& piece, const DecodePiece*, float* out_rows,
                                           float* maxima, float* totals) mutable {
      floatv partial[kLanes];
      const int64_t req = piece.req, length = piece.end - piece.begin;
      const int32_t* table = tables + req * max_blocks;
      widen(q_data + req * num_heads * head_dim, q.data(), num_heads * head_dim);
      for (float& x : q) x *= static_cast<float>(scale);
      scores.resize(num_heads * length);

      // Walk the piece in runs of at most kLanes slots inside one block; `visit(first, count)` gets
      // each run (positions from the piece's start) with its rows widened to float32 in `tile`.
      auto for_each_run = [&](const scalar_t* cache, auto&& visit) {
        for (int64_t position = piece.begin; position < piece.end;) {
          const int64_t count = std::min({kLanes, piece.end - position, block_size - position % block_size});
          const int64_t slot = static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
          const scalar_t* rows = cache + slot * token_stride;
          for (int64_t t = 0; t < count; ++t) widen(rows + t * token_stride, tile.data() + t * row_len, row_len);
          visit(position - piece.begin, count);
          position += count;
        }
    };

    // scores[h * length + j] = q_h . k_j: a run's dot products are summed together
    for_each_run(k_data, [&](int64_t first, int64_t count) {
      for (int64_t h = 0; h < num_heads; ++h) {
        const float* qh = q.data() + h * head_dim;
        const float* kh = tile.data() + (h / group) * head_dim;
        float* sh = scores.data() + h * length + first;
        if (chunks == 0) {
          for (int64_t t = 0; t < count; ++t) {
            float total = 0.f;
            for (int64_t i = 0; i < head_dim; ++i) total += qh[i] * kh[t * row_len + i];
            sh[t] = total;
          }
          continue;
        }
        for (int64_t t = 0; t < count; ++t) {
          floatv acc = {};
          for (int64_t c = 0; c < chunks; ++c) acc += load(qh + c * kLanes) * load(kh + t * row_len + c * kLanes);
          partial[t] = acc;
        }
        for (int64_t t = count; t < kLanes; ++t) partial[t] = floatv{};
        float sums[kLanes];
        sum_each(partial, sums);
        std::copy(sums, sums + count, sh);
      }
    });

    for (int64_t h = 0; h < num_heads; ++h)  // softmax over each query head's scores, in place
      std::tie(maxima[h], totals[h]) = softmax_in_place(scores.data() + h * length, length);

    // out_h = sum_j p_hj v_j, each head's accumulators held across a run
    std::fill(out_rows, out_rows + num_heads * head_dim, 0.f);
    for_each_run(v_data, [&](int64_t first, int64_t count) {
      for (int64_t h = 0; h < num_heads; ++h) {
        const float* ph = scores.data() + h * length + first;
        const float* vh = tile.data() + (h / group) * head_dim;
        float* oh = out_rows + h * head_dim;
        if (chunks == 0) {
          for (int64_t t = 0; t < count; ++t)
            for (int64_t i = 0; i < head_dim; ++i) oh[i] += ph[t] * vh[t * row_len + i];
          continue;
        }
        for (int64_t c0 = 0; c0 < chunks; c0 += kMaxHeld) {  // one pass when chunks <= kMaxHeld
          const int64_t held = std::min(kMaxHeld, chunks - c0);
          floatv acc[kMaxHeld];
          for (int64_t c = 0; c < held; ++c) acc[c] = load(oh + (c0 + c) * kLanes);
          for (int64_t t = 0; t < count; ++t)
            for (int64_t c = 0; c < held; ++c) acc[c] += ph[t] * load(vh + t * row_len + (c0 + c) * kLanes);
          for (int64_t c = 0; c < held; ++c) store(oh + (c0 + c) * kLanes, acc[c]);
        }
      }
    });
    };
  });
}


#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// The same attention for a bf16 cache on CPUs with AVX512-BF16, for head sizes that are a
// multiple of 32 and up to 8 query heads per KV head (compile-time sizes, so every accumulator
// stays in a register). Nothing is widened to a float32 copy first:
// - q.k: `vdpbf16ps` multiplies 32 bf16 pairs of the query and the cached key straight from
//   the cache into 16 float32 sums; the products of two bf16 numbers are exact in float32, so
//   this is the float32 dot product of the same values. The scale is applied to the sums.
// - p.v: each cached value row is widened in registers (16 values, two instructions) and
//   multiplied into float32 accumulators held for all the query heads of its KV head, with the
//   softmax weights in float32.
template <int64_t kDim, int64_t kGroup>
void decode_attention_bf16(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, double scale) {
  constexpr int64_t kPairs = kDim / 32;    // registers of 32 bf16 per head row
  constexpr int64_t kVectors = kDim / 16;  // registers of 16 float32 per head row
  // value dimensions held at once: kGroup heads x kHeld registers of accumulators <= 16
  constexpr int64_t kHeld = std::max<int64_t>(1, std::min<int64_t>(kVectors, 16 / kGroup));
  const int64_t num_reqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t token_stride = num_kv_heads * kDim;
  const auto* q_data = reinterpret_cast<const uint16_t*>(query.data_ptr<c10::BFloat16>());
  const auto* k_data = reinterpret_cast<const uint16_t*>(key_cache.data_ptr<c10::BFloat16>());
  const auto* v_data = reinterpret_cast<const uint16_t*>(value_cache.data_ptr<c10::BFloat16>());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  auto* out_data = out.data_ptr<c10::BFloat16>();
  const float scale_f = static_cast<float>(scale);

  const DecodePlan plan = plan_decode(num_reqs, lens, at::get_num_threads());
  run_decode_plan(plan, num_heads, kDim, out_data, [&] {  // one worker per thread, with its scores
    return [&, scores = std::vector<float>()](const DecodePiece& piece, const DecodePiece* next_piece,
                                              float* out_rows, float* maxima, float* totals) mutable {
      floatv partial[kGroup][kLanes];
      const int64_t req = piece.req, length = piece.end - piece.begin;
      const int32_t* table = tables + req * max_blocks;
      const uint16_t* q_req = q_data + req * num_heads * kDim;
      scores.resize(num_heads * length);

      // Runs of at most kLanes slots inside one block: visit(first, count, slot of the first,
      // next_rows, next_count), `first` counted from the piece's start. The cache comes from memory
      // (a step's weights pass through the caches between two layers), so each run's rows are
      // prefetched into L2 while the run before is read: `visit` prefetches head j's row of slot t
      // of the next run as it reads the same of its own, and for_each_run the slots the next run has
      // beyond this one's. The next run after a pass's last is the first of what follows
      // (`then_rows`, `then_count` slots): the values after the keys, the next piece's keys after
      // the values.
      // Measured per layer in the cold case of benchmarks/attention_kernels.py (interleaved
      // builds in one process): fetching the whole next run before visiting a run made the core
      // wait for most of it (the misses queue up behind the prefetches), so reading ran at
      // ~14 GB/s; spread over the visit, 32 x 100 takes 131-158 against 157-175 us, 32 x 300
      // 338-439 against 435-526, 32 x 600 651-857 against 837-969. Into L1 (T0) was slower
      // than either.
      auto run_length = [&](int64_t position) {
        return std::min({kLanes, piece.end - position, block_size - position % block_size});
    };
    auto slot_of = [&](int64_t position) {
      return static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
    };
    // KV head j's row of slot t of the next run, while the same of this run is read
    auto prefetch_row = [&](const uint16_t* rows, int64_t t, int64_t j) {
      const char* row = reinterpret_cast<const char*>(rows + t * token_stride + j * kDim);
      for (int64_t byte = 0; byte < kDim * 2; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T1);
    };
    auto prefetch_rest = [&](const uint16_t* rows, int64_t from, int64_t count) {
      for (int64_t t = from; t < count; ++t)
        for (int64_t j = 0; j < num_kv_heads; ++j) prefetch_row(rows, t, j);
    };
    auto for_each_run = [&](const uint16_t* cache, const uint16_t* then_rows, int64_t then_count, auto&& visit) {
      for (int64_t position = piece.begin; position < piece.end;) {
        const int64_t count = run_length(position), next = position + count;
        const bool last = next >= piece.end;
        const uint16_t* next_rows = last ? then_rows : cache + slot_of(next) * token_stride;
        const int64_t next_count = last ? then_count : run_length(next);
        visit(position - piece.begin, count, slot_of(position), next_rows, next_count);
        prefetch_rest(next_rows, count, next_count);
        position = next;
      }
    };

    for_each_run(k_data, v_data + slot_of(piece.begin) * token_stride, run_length(piece.begin),
                 [&](int64_t first, int64_t count, int64_t slot, const uint16_t* next_rows, int64_t next_count) {
      for (int64_t j = 0; j < num_kv_heads; ++j) {
        const uint16_t* keys = k_data + slot * token_stride + j * kDim;
        __m512bh q[kGroup][kPairs];
        for (int64_t g = 0; g < kGroup; ++g)
          for (int64_t c = 0; c < kPairs; ++c)
            q[g][c] = (__m512bh)_mm512_loadu_si512(q_req + (j * kGroup + g) * kDim + 32 * c);
        for (int64_t t = 0; t < count; ++t) {
          if (t < next_count) prefetch_row(next_rows, t, j);
          __m512bh k[kPairs];
          for (int64_t c = 0; c < kPairs; ++c)
            k[c] = (__m512bh)_mm512_loadu_si512(keys + t * token_stride + 32 * c);
          for (int64_t g = 0; g < kGroup; ++g) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < kPairs; ++c) acc = _mm512_dpbf16_ps(acc, k[c], q[g][c]);
            partial[g][t] = (floatv)acc;
          }
        }
        for (int64_t g = 0; g < kGroup; ++g) {
          for (int64_t t = count; t < kLanes; ++t) partial[g][t] = floatv{};
          float sums[kLanes];
          sum_each(partial[g], sums);
          float* s = scores.data() + (j * kGroup + g) * length + first;
          for (int64_t t = 0; t < count; ++t) s[t] = sums[t] * scale_f;
        }
      }
    });

    for (int64_t h = 0; h < num_heads; ++h)  // softmax over each query head's scores
      std::tie(maxima[h], totals[h]) = softmax_in_place(scores.data() + h * length, length);

    std::fill(out_rows, out_rows + num_heads * kDim, 0.f);
    const uint16_t* next_piece_rows = nullptr;  // the next piece's first run of keys
    int64_t next_piece_count = 0;
    if (next_piece != nullptr) {
      const int64_t position = next_piece->begin;
      const int64_t block = tables[next_piece->req * max_blocks + position / block_size];
      next_piece_rows = k_data + (block * block_size + position % block_size) * token_stride;
      next_piece_count = std::min({kLanes, next_piece->end - position, block_size - position % block_size});
    }
    for_each_run(v_data, next_piece_rows, next_piece_count, [&](int64_t first, int64_t count, int64_t slot,
                                                              const uint16_t* next_rows, int64_t next_count) {
      for (int64_t j = 0; j < num_kv_heads; ++j) {
        const uint16_t* values = v_data + slot * token_stride + j * kDim;
        const float* p = scores.data() + j * kGroup * length + first;
        float* o = out_rows + j * kGroup * kDim;
        for (int64_t c0 = 0; c0 < kVectors; c0 += kHeld) {
          __m512 acc[kGroup][kHeld];
          for (int64_t g = 0; g < kGroup; ++g)
            for (int64_t c = 0; c < kHeld; ++c) acc[g][c] = _mm512_loadu_ps(o + g * kDim + (c0 + c) * kLanes);
          for (int64_t t = 0; t < count; ++t) {
            if (c0 == 0 && t < next_count) prefetch_row(next_rows, t, j);
            for (int64_t c = 0; c < kHeld; ++c) {
              const __m256i raw = _mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(values + t * token_stride + (c0 + c) * kLanes));
              const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
              for (int64_t g = 0; g < kGroup; ++g)
                acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * length + t]), v, acc[g][c]);
            }
          }
          for (int64_t g = 0; g < kGroup; ++g)
            for (int64_t c = 0; c < kHeld; ++c) _mm512_storeu_ps(o + g * kDim + (c0 + c) * kLanes, acc[g][c]);
        }
      }
    });
    };
  });
}

// The compile-time instance for a head size and group, or nullptr (then the generic kernel runs).
using Bf16AttentionFn = void (*)(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double);
template <int64_t kDim>
Bf16AttentionFn bf16_attention_for_group(int64_t group) {
  switch (group) {
    case 1: return decode_attention_bf16<kDim, 1>;
    case 2: return decode_attention_bf16<kDim, 2>;
    case 3: return decode_attention_bf16<kDim, 3>;
    case 4: return decode_attention_bf16<kDim, 4>;
    case 5: return decode_attention_bf16<kDim, 5>;
    case 6: return decode_attention_bf16<kDim, 6>;
    case 7: return decode_attention_bf16<kDim, 7>;
    case 8: return decode_attention_bf16<kDim, 8>;
    default: return nullptr;
  }
}

Bf16AttentionFn bf16_attention(int64_t head_dim, int64_t group) {
  switch (head_dim) {
    case 64: return bf16_attention_for_group<64>(group);
    case 128: return bf16_attention_for_group<128>(group);
    default: return nullptr;
  }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Prefill attention for bf16 caches on CPUs with AVX512-BF16: the query rows of several prompts
// (or chunks of prompts) attend causally to their requests' cached tokens, read through the
// block tables (the step's own keys and values are stored before). The queries that share a KV
// head, (row, query head) pairs of one request taken row by row, are the lanes of every vector,
// 16 to a task; so a short chunk after many cached tokens (a prefix-cache hit, a turn of a chat)
// fills its lanes with the group's heads rather than leaving most of them empty:
// - q.k: the task's queries are transposed once into pairs of dimensions x 16 lanes, and
//   `vdpbf16ps` multiplies each pair with the matching pair of a cached key (broadcast from the
//   cache): 32 exact products per instruction, 16 lanes' scores of one key per register, and
//   no horizontal sums;
// - softmax: per key, one vector holds the 16 lanes' scores, so the maximum, exp and sum are
//   plain vector operations (exp: ATen's exp_u20, inlined, 12-15% faster in all than a call of
//   glibc's vector exp per key); keys after a lane's position are masked out;
// - p.v: `vdpbf16ps` again, over pairs of keys: the softmax weights (exponentials, before
//   the division by their sum) are rounded to bf16, as flash attention does for its second
//   product, and paired per lane; the value rows are interleaved into pairs of keys per
//   dimension, kept for the next task of the same request and KV head, which extends them to its
//   own keys; each lane accumulates in float32 (4 or 2 lanes at a time, to stay in registers).
//   Half the instructions of widening the values and multiplying in float32.
template <int64_t kDim>
void prefill_attention_bf16(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& query_starts, const at::Tensor& query_lens,
                            const at::Tensor& seq_lens, double scale) {
  constexpr int64_t kPairs = kDim / 2;          // bf16 pairs per head row
  constexpr int64_t kVectors = kDim / 16;       // float32 registers per head row
  constexpr int64_t kLanesHeld = 16 / kVectors; // p.v lanes accumulated at once
  constexpr float kMasked = -1e30f;             // a masked score (no infinities: -ffast-math)
  const int64_t num_heads = query.size(1);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t token_stride = num_kv_heads * kDim;  // between consecutive cache slots
  const int64_t row_stride = num_heads * kDim;       // between consecutive query rows
  const auto* q_data = reinterpret_cast<const uint16_t*>(query.data_ptr<c10::BFloat16>());
  const auto* k_data = reinterpret_cast<const uint16_t*>(key_cache.data_ptr<c10::BFloat16>());
  const auto* v_data = reinterpret_cast<const uint16_t*>(value_cache.data_ptr<c10::BFloat16>());
  auto* out_data = out.data_ptr<c10::BFloat16>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int32_t* q_lens = query_lens.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float scale_f = static_cast<float>(scale);

  struct Task {
    int64_t request, kv_head, first_lane;  // lane i of the request: row i / group, head i % group
  };
  std::vector<Task> task_list;
  std::vector<int64_t> cost_before{0};
  for (int64_t r = 0; r < query_starts.size(0); ++r) {
    const int64_t lanes = q_lens[r] * group;
    for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
      for (int64_t lane = 0; lane < lanes; lane += kLanes) {
        task_list.push_back({r, kv_head, lane});
        const int64_t keys = lens[r] - q_lens[r] + (std::min(lane + kLanes, lanes) - 1) / group + 1;
        cost_before.push_back(cost_before.back() + keys + 32);
      }
    }
  }

  for_balanced_ranges(cost_before, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> q_pairs(kPairs * kLanes);  // [pair][lane]
    std::vector<float> scores;                       // [key][lane]
    std::vector<uint32_t> p_pairs, v_pairs;          // [key pair][lane], [key pair][dim]
    std::vector<const uint16_t*> key_rows;
    // key_rows and v_pairs hold keys [0, built_keys) of this request's KV head
    int64_t built_request = -1, built_kv_head = -1, built_keys = 0;
    for (int64_t index = begin; index < end; ++index) {
      const Task& task = task_list[index];
      const int64_t q_len = q_lens[task.request], seq_len = lens[task.request];
      const int64_t context = seq_len - q_len;  // the position of the request's first query row
      const int64_t count = std::min<int64_t>(kLanes, q_len * group - task.first_lane);  // lanes in use
      alignas(64) int32_t lane_position[kLanes];  // unused lanes repeat the last used one
      const uint16_t* lane_query[kLanes];
      c10::BFloat16* lane_out[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t lane = task.first_lane + std::min(l, count - 1);
        const int64_t row = lane / group, head = task.kv_head * group + lane % group;
        lane_position[l] = static_cast<int32_t>(context + row);
        lane_query[l] = q_data + (starts[task.request] + row) * row_stride + head * kDim;
        lane_out[l] = out_data + (starts[task.request] + row) * row_stride + head * kDim;
      }
      const int64_t num_keys = lane_position[kLanes - 1] + 1;
      const int64_t num_pairs = (num_keys + 1) / 2;

      // the cached keys' rows and the paired values, extended to this task's keys
      if (task.request != built_request || task.kv_head != built_kv_head) {
        built_request = task.request;
        built_kv_head = task.kv_head;
        built_keys = 0;
      }
      if (num_keys > built_keys) {
        const int32_t* table = tables + task.request * max_blocks;
        key_rows.resize(num_keys);
        for (int64_t key = built_keys; key < num_keys; ++key) {
          const int64_t slot = static_cast<int64_t>(table[key / block_size]) * block_size + key % block_size;
          key_rows[key] = k_data + slot * token_stride + task.kv_head * kDim;
        }
        // v_pairs[pair][dim]: the two keys' values of a dimension, as `vdpbf16ps` takes them (a
        // key past the last is 0; the pair that held one is paired again)
        v_pairs.resize(num_pairs * kDim);
        const __m512i pair_dims_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i pair_dims_hi = _mm512_add_epi16(pair_dims_lo, _mm512_set1_epi16(16));
        for (int64_t pair = built_keys / 2; pair < num_pairs; ++pair) {
          const int64_t key = 2 * pair;
          const uint16_t* v_even = v_data + (key_rows[key] - k_data);  // the same slot and head
          const uint16_t* v_odd = key + 1 < num_keys ? v_data + (key_rows[key + 1] - k_data) : nullptr;
          for (int64_t half = 0; half < kDim / 32; ++half) {
            const __m512i a = _mm512_loadu_si512(v_even + 32 * half);
            const __m512i b = v_odd ? _mm512_loadu_si512(v_odd + 32 * half) : _mm512_setzero_si512();
            uint32_t* dst = v_pairs.data() + pair * kDim + 32 * half;
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, pair_dims_lo, b));
            _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(a, pair_dims_hi, b));
          }
        }
        built_keys = num_keys;
      }

      // the task's queries as [pair][lane] (unused lanes stay 0)
      std::fill(q_pairs.begin(), q_pairs.end(), 0u);
      for (int64_t l = 0; l < count; ++l) {
        const auto* pairs = reinterpret_cast<const uint32_t*>(lane_query[l]);
        for (int64_t p = 0; p < kPairs; ++p) q_pairs[p * kLanes + l] = pairs[p];
      }

      // scores[key][lane] = scale * q_lane . k_key, 8 keys at a time, and each lane's maximum
      scores.resize(num_keys * kLanes);
      __m512 running_max = _mm512_set1_ps(kMasked);
      const __m512 scale_v = _mm512_set1_ps(scale_f);
      const __m512i positions = _mm512_load_si512(lane_position);
      const int64_t first_masked = lane_position[0] + 1;  // keys from here are masked in some lanes
      for (int64_t key0 = 0; key0 < num_keys; key0 += 8) {
        const int64_t keys = std::min<int64_t>(8, num_keys - key0);
        __m512 acc[8];
        for (int64_t k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();
        const uint32_t* kp[8];
        for (int64_t k = 0; k < 8; ++k) kp[k] = reinterpret_cast<const uint32_t*>(key_rows[key0 + std::min(k, keys - 1)]);
        for (int64_t p = 0; p < kPairs; ++p) {
          const __m512bh q = (__m512bh)_mm512_loadu_si512(q_pairs.data() + p * kLanes);
          for (int64_t k = 0; k < 8; ++k) acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_set1_epi32(kp[k][p]), q);
        }
        for (int64_t k = 0; k < keys; ++k) {
          const int64_t key = key0 + k;
          __m512 s = _mm512_mul_ps(acc[k], scale_v);
          if (key >= first_masked) {  // causal: a lane sees the keys up to its position
            const __mmask16 hidden = _mm512_cmplt_epi32_mask(positions, _mm512_set1_epi32(static_cast<int32_t>(key)));
            s = _mm512_mask_mov_ps(s, hidden, _mm512_set1_ps(kMasked));
          }
          _mm512_storeu_ps(scores.data() + key * kLanes, s);
          running_max = _mm512_max_ps(running_max, s);
        }
      }
      const __m512 max_v = running_max;

      // softmax over the keys, per lane (the maximum is above): the exponentials and their sums,
      // as they are paired
      __m512 total_v = _mm512_setzero_ps();
      auto weights = [&](int64_t key) {  // exp(score - max); masked scores give 0
        const at::vec::Vectorized<float> x(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + key * kLanes), max_v));
        return static_cast<__m512>(x.exp_u20());
      };

      // p.v in bf16 pairs of keys: p_pairs[pair][lane] holds the two keys' weights of a lane
      p_pairs.resize(num_pairs * kLanes);
      const __m512i pair_lanes = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                  23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      for (int64_t pair = 0; pair < num_pairs; ++pair) {
        const int64_t key = 2 * pair;
        const __m512 even = weights(key);
        const __m512 odd = key + 1 < num_keys ? weights(key + 1) : _mm512_setzero_ps();
        total_v = _mm512_add_ps(total_v, _mm512_add_ps(even, odd));
        _mm512_storeu_si512(p_pairs.data() + pair * kLanes,
                            _mm512_permutexvar_epi16(pair_lanes, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
      }

      alignas(64) float totals[kLanes];
      _mm512_store_ps(totals, total_v);

      // out_lane = sum_key p[key][lane] v_key / total[lane]
      for (int64_t lane0 = 0; lane0 < count; lane0 += kLanesHeld) {
        __m512 acc[kLanesHeld][kVectors];
        for (int64_t l = 0; l < kLanesHeld; ++l)
          for (int64_t c = 0; c < kVectors; ++c) acc[l][c] = _mm512_setzero_ps();
        const int64_t last_pair = (lane_position[std::min(lane0 + kLanesHeld, kLanes) - 1] + 2) / 2;
        for (int64_t pair = 0; pair < last_pair; ++pair) {
          const uint32_t* p = p_pairs.data() + pair * kLanes + lane0;
          for (int64_t c = 0; c < kVectors; ++c) {
            const __m512bh v = (__m512bh)_mm512_loadu_si512(v_pairs.data() + pair * kDim + c * 16);
            for (int64_t l = 0; l < kLanesHeld; ++l)
              acc[l][c] = _mm512_dpbf16_ps(acc[l][c], v, (__m512bh)_mm512_set1_epi32(p[l]));
          }
        }
        for (int64_t l = 0; l < kLanesHeld && lane0 + l < count; ++l) {
          const __m512 inv = _mm512_set1_ps(1.f / totals[lane0 + l]);
          for (int64_t c = 0; c < kVectors; ++c) {
            const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[l][c], inv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_out[lane0 + l] + c * 16), (__m256i)o);
          }
        }
      }
    }
  });
}
#endif

}  // namespace

void paged_decode_attention(
    at::Tensor out,
    const at::Tensor& query,
    const at::Tensor& key_cache,
    const at::Tensor& value_cache,
    const at::Tensor& block_tables,
    const at::Tensor& seq_lens,
    double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() && out.is_contiguous(),
              "tensors must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables and lengths");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "tables must be contiguous");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(), "one dtype");
  TORCH_CHECK(seq_lens.size(0) == query.size(0) && block_tables.size(0) == query.size(0),
              "one block table and length per query");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < seq_lens.size(0); ++i)
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= block_tables.size(1) * key_cache.size(1),
                "paged_decode_attention: request ", i, " has ", lens[i], " tokens, outside its block table");
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (query.scalar_type() == at::kBFloat16) {
    if (const Bf16AttentionFn kernel = bf16_attention(query.size(2), query.size(1) / key_cache.size(2))) {
      kernel(out, query, key_cache, value_cache, block_tables, seq_lens, scale);
      return;
    }
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    switch (query.size(2)) {  // the common head sizes get their loops unrolled
      case 64:
        decode_attention_kernel<scalar_t, 4>(out, query, key_cache, value_cache, block_tables, seq_lens, scale);
        break;
      case 128:
        decode_attention_kernel<scalar_t, 8>(out, query, key_cache, value_cache, block_tables, seq_lens, scale);
        break;
      default:
        decode_attention_kernel<scalar_t, 0>(out, query, key_cache, value_cache, block_tables, seq_lens, scale);
    }
  });
}


// kv_cache[0] and kv_cache[1] at slot s (block s / block_size, row s % block_size) get token t's
// key and value, for s = slot_mapping[t]. kv_cache: (2, num_blocks, block_size, num_kv_heads,
// head_dim); key, value: (num_tokens, num_kv_heads, head_dim) of the cache's dtype. The same as
// two index_copy_ calls on the flattened cache, without their per-call set-up (which costs more
// than the copy: 15-50 us a layer against ~1 us).
void write_kv_cache(at::Tensor kv_cache, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "write_kv_cache: kv_cache must be a contiguous (2, blocks, block_size, kv_heads, head_dim) tensor");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "write_kv_cache: key and value must be (tokens, kv_heads, head_dim)");
  TORCH_CHECK(key.size(1) == kv_cache.size(3) && key.size(2) == kv_cache.size(4),
              "write_kv_cache: key rows do not match the cache's heads and head size");
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() && value.scalar_type() == kv_cache.scalar_type(),
              "write_kv_cache: key and value must have the cache's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0),
              "write_kv_cache: slot_mapping must be one int64 slot per token");
  const at::Tensor k = key.contiguous(), v = value.contiguous(), slots = slot_mapping.contiguous();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  const int64_t num_tokens = k.size(0);
  const auto* src_k = static_cast<const char*>(k.data_ptr());
  const auto* src_v = static_cast<const char*>(v.data_ptr());
  auto* keys = static_cast<char*>(kv_cache.data_ptr());
  char* values = keys + num_slots * row_bytes;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "write_kv_cache: slot ", slot[t], " is outside the cache");
    std::memcpy(keys + slot[t] * row_bytes, src_k + t * row_bytes, row_bytes);
    std::memcpy(values + slot[t] * row_bytes, src_v + t * row_bytes, row_bytes);
  }
}

// One layer of a decode-only step: store the step's keys and values, then attend. The same as
// write_kv_cache followed by paged_decode_attention, in one call from Python: at one request the
// Python around the two calls (cache views, the output's allocation) cost as much as the kernels.
at::Tensor paged_decode_step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             at::Tensor kv_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale) {
  write_kv_cache(kv_cache, key, value, slot_mapping);
  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty_like(q);
  paged_decode_attention(out, q, kv_cache.select(0, 0), kv_cache.select(0, 1), block_tables, seq_lens, scale);
  return out;
}


std::vector<int64_t> prefill_attention_head_dims() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return {64, 128};
#else
  return {};
#endif
}

// Causal attention of several requests' query rows (a prompt, or a chunk of one after cached
// tokens) to their cached keys and values, which already hold this step's rows. Request i's
// rows are query[query_starts[i] : query_starts[i] + query_lens[i]], at positions
// seq_lens[i] - query_lens[i] .. seq_lens[i] - 1. bf16 only, head sizes from
// prefill_attention_head_dims().
void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_starts, const at::Tensor& query_lens, const at::Tensor& seq_lens,
                             double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4 && out.sizes() == query.sizes(),
              "paged_prefill_attention: bad ranks");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() && out.is_contiguous(),
              "paged_prefill_attention: tensors must be contiguous");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key_cache.scalar_type() == at::kBFloat16 &&
                  value_cache.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "paged_prefill_attention: bf16 only");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0 && query.size(2) == key_cache.size(3),
              "paged_prefill_attention: heads do not match the cache");
  const int64_t num = query_starts.size(0);
  for (const at::Tensor* t : {&block_tables, &query_starts, &query_lens, &seq_lens})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->size(0) == num,
                "paged_prefill_attention: int32 tables and lengths, one row per request");
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int32_t* q_lens = query_lens.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < num; ++i) {
    TORCH_CHECK(q_lens[i] >= 1 && q_lens[i] <= lens[i] && starts[i] >= 0 && starts[i] + q_lens[i] <= query.size(0),
                "paged_prefill_attention: request ", i, "'s rows are outside the query");
    TORCH_CHECK((lens[i] + key_cache.size(1) - 1) / key_cache.size(1) <= block_tables.size(1),
                "paged_prefill_attention: request ", i, " has more tokens than its block table holds");
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  switch (query.size(2)) {
    case 64:
      return prefill_attention_bf16<64>(out, query, key_cache, value_cache, block_tables, query_starts, query_lens,
                                        seq_lens, scale);
    case 128:
      return prefill_attention_bf16<128>(out, query, key_cache, value_cache, block_tables, query_starts, query_lens,
                                         seq_lens, scale);
  }
#endif
  TORCH_CHECK(false, "paged_prefill_attention: head size ", query.size(2), " is not built on this CPU");
}
