// Decode attention over the paged KV cache: every sequence of the step brings one query token.
//
// Why: as PyTorch ops this is a gather of the sequence's blocks, two small matmuls and a softmax
// per sequence and layer; their dispatch (~100 µs a layer for one sequence, ~3 ms for 32) costs more
// than the arithmetic. Here one call per layer reads the keys and values in place through the
// block tables, in fp32, with the query heads that share a KV head computed together (each cached
// vector is read once).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using sugam::load16;
using sugam::store16;

// Q: query type (fp32/bf16), C: cache element type (fp32/bf16/int8 with per-vector scales).
template <typename Q, typename C>
void attend(const Q* q, const C* k_cache, const C* v_cache, const float* k_scales, const float* v_scales,
            const int64_t* tables, const int64_t* lens, Q* out, int64_t n, int64_t heads, int64_t kv_heads,
            int64_t dim, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = heads / kv_heads, vecs = dim / 16;
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, acc(group * dim), query(group * dim);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t seq = task / kv_heads, kvh = task % kv_heads, len = lens[seq];
      const int64_t* table = tables + seq * max_blocks;
      scores.resize(group * len);
      for (int64_t g = 0; g < group; ++g)  // this KV head's query heads, in fp32, pre-scaled
        for (int64_t v = 0; v < vecs; ++v)
          _mm512_storeu_ps(&query[g * dim + 16 * v], _mm512_mul_ps(load16(q + (seq * heads + kvh * group + g) * dim + 16 * v), _mm512_set1_ps(scale)));
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const C* key = k_cache + (slot * kv_heads + kvh) * dim;
        const float ks = k_scales ? k_scales[slot * kv_heads + kvh] : 1.0f;
        for (int64_t g = 0; g < group; ++g) {
          __m512 s = _mm512_setzero_ps();
          for (int64_t v = 0; v < vecs; ++v) s = _mm512_fmadd_ps(load16(key + 16 * v), _mm512_loadu_ps(&query[g * dim + 16 * v]), s);
          scores[g * len + t] = _mm512_reduce_add_ps(s) * ks;
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax, then the weighted sum of values
        float* row = &scores[g * len];
        const float peak = *std::max_element(row, row + len);
        float total = 0;
        for (int64_t t = 0; t < len; ++t) total += (row[t] = std::exp(row[t] - peak));
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < len; ++t) row[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const C* value = v_cache + (slot * kv_heads + kvh) * dim;
        const float vs = v_scales ? v_scales[slot * kv_heads + kvh] : 1.0f;
        for (int64_t v = 0; v < vecs; ++v) {
          const __m512 x = _mm512_mul_ps(load16(value + 16 * v), _mm512_set1_ps(vs));
          for (int64_t g = 0; g < group; ++g)
            _mm512_storeu_ps(&acc[g * dim + 16 * v], _mm512_fmadd_ps(x, _mm512_set1_ps(scores[g * len + t]), _mm512_loadu_ps(&acc[g * dim + 16 * v])));
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t v = 0; v < vecs; ++v)
          store16(out + (seq * heads + kvh * group + g) * dim + 16 * v, _mm512_loadu_ps(&acc[g * dim + 16 * v]));
    }
  });
}

}  // namespace

namespace sugam {

// q [n, heads, dim]; caches [blocks, block_size, kv_heads, dim]; scales [blocks, block_size, kv_heads]
// (int8 caches only); block_tables [n, max_blocks] int64; context_lens [n] int64 (each >= 1).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  check_decode_attention(q, k_cache, v_cache, k_scales, v_scales, block_tables, context_lens, 16);
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), max_blocks = block_tables.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const bool int8 = k_cache.scalar_type() == at::kChar;
  const float* ks = int8 ? k_scales->data_ptr<float>() : nullptr;
  const float* vs = int8 ? v_scales->data_ptr<float>() : nullptr;
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  auto run = [&](auto* qp, auto* op) {
    using Q = std::remove_pointer_t<decltype(qp)>;
    switch (k_cache.scalar_type()) {
      case at::kFloat: attend<Q, float>(qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), ks, vs, tables, lens, op, n, heads, kv_heads, dim, block_size, max_blocks, s); break;
      case at::kBFloat16: attend<Q, c10::BFloat16>(qp, k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), ks, vs, tables, lens, op, n, heads, kv_heads, dim, block_size, max_blocks, s); break;
      case at::kChar: attend<Q, int8_t>(qp, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), ks, vs, tables, lens, op, n, heads, kv_heads, dim, block_size, max_blocks, s); break;
      default: TORCH_CHECK(false, "sugam decode_attention: cache dtype ", k_cache.scalar_type());
    }
  };
  if (q.scalar_type() == at::kFloat) run(q.data_ptr<float>(), out.data_ptr<float>());
  else if (q.scalar_type() == at::kBFloat16) run(q.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  else TORCH_CHECK(false, "sugam decode_attention: query dtype ", q.scalar_type());
  return out;
}

}  // namespace sugam

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_scales, Tensor? v_scales, "
        "Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) { m.impl("decode_attention", &sugam::decode_attention); }
