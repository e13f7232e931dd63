// Single-query (decode) attention read straight from the paged KV cache, for CPUs.
//
// Every decoding request attends its one new query token to all of its cached tokens. Doing
// that with stock torch ops means gathering each request's blocks into a padded tensor per layer
// and running tiny batched matmuls, which costs far more than the arithmetic. This kernel walks
// the block table instead: one task per request reads each cached key and value row once, for
// all query heads (grouped-query heads share their KV head's row), with a float32 softmax.
// Requests are split over torch's intra-op (OpenMP) threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename scalar_t>
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

  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const scalar_t* k_data = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = value_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();

  // One task per request: each cached token's row (all KV heads) is read once, contiguously.
  at::parallel_for(0, num_reqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(num_heads * head_dim), acc(num_heads * head_dim), row(token_stride), scores;
    for (int64_t req = begin; req < end; ++req) {
      const int64_t seq_len = lens[req];
      const int32_t* table = tables + req * max_blocks;
      const scalar_t* q_req = q_data + req * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) q[i] = static_cast<float>(q_req[i]) * static_cast<float>(scale);

      // scores[h * seq_len + j] = q_h . k_j, walking the block table block by block
      scores.resize(num_heads * seq_len);
      for (int64_t first = 0; first < seq_len; first += block_size) {
        const scalar_t* block = k_data + static_cast<int64_t>(table[first / block_size]) * block_size * token_stride;
        const int64_t count = std::min(block_size, seq_len - first);
        for (int64_t t = 0; t < count; ++t) {
          const scalar_t* k = block + t * token_stride;
          for (int64_t i = 0; i < token_stride; ++i) row[i] = static_cast<float>(k[i]);
          for (int64_t h = 0; h < num_heads; ++h) {
            const float* qh = q.data() + h * head_dim;
            const float* kh = row.data() + (h / group) * head_dim;
            float dot = 0.f;
            for (int64_t i = 0; i < head_dim; ++i) dot += qh[i] * kh[i];
            scores[h * seq_len + first + t] = dot;
          }
        }
      }
      // softmax over each head's scores, in place
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = scores.data() + h * seq_len;
        float max_score = s[0];  // no infinities: the file is built with -ffast-math
        for (int64_t j = 1; j < seq_len; ++j) max_score = std::max(max_score, s[j]);
        float total = 0.f;
        for (int64_t j = 0; j < seq_len; ++j) {
          s[j] = std::exp(s[j] - max_score);
          total += s[j];
        }
        const float inv = 1.f / total;
        for (int64_t j = 0; j < seq_len; ++j) s[j] *= inv;
      }
      // acc_h = sum_j p_hj v_j
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0; first < seq_len; first += block_size) {
        const scalar_t* block = v_data + static_cast<int64_t>(table[first / block_size]) * block_size * token_stride;
        const int64_t count = std::min(block_size, seq_len - first);
        for (int64_t t = 0; t < count; ++t) {
          const scalar_t* v = block + t * token_stride;
          for (int64_t i = 0; i < token_stride; ++i) row[i] = static_cast<float>(v[i]);
          for (int64_t h = 0; h < num_heads; ++h) {
            const float p = scores[h * seq_len + first + t];
            const float* vh = row.data() + (h / group) * head_dim;
            float* a = acc.data() + h * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) a[i] += p * vh[i];
          }
        }
      }
      scalar_t* o = out_data + req * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) o[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode_attention_kernel<scalar_t>(out, query, key_cache, value_cache, block_tables, seq_lens, scale);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "out[r] = softmax(q[r] K_r^T * scale) V_r over request r's cached tokens (decode)");
}
