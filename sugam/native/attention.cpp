// Decode attention over the paged KV cache, as the torch op both builds register: every sequence of
// the step brings one query token. The algorithm (parts, GQA, tiles, merge) is portable/core.h's;
// the AVX-512 build compiles it too, in 256-bit vectors, so both builds give the same bits. (A
// 512-bit version with 16-key tiles measured 10-30 % slower on an Ice Lake: the limit is the memory
// and its latency, not the arithmetic.)
//
// Why a kernel: as PyTorch ops this is a gather of the sequence's blocks, two small matmuls and a
// softmax per sequence and layer; their dispatch (~100 µs a layer for one sequence, ~3 ms for 32)
// costs more than the arithmetic, and the gather copies the whole context every token.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"
#include "portable/core.h"

#include <cstdint>

namespace sugam {

// q [n, heads, dim]; caches [blocks, block_size, kv_heads, dim]; scales [blocks, block_size, kv_heads]
// (int8 caches only); block_tables [n, max_blocks] int64; context_lens [n] int64 (each >= 1).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  namespace core = SUGAM_CORE_NS;
  check_decode_attention(q, k_cache, v_cache, k_scales, v_scales, block_tables, context_lens, 8);
  const core::AttentionShape shape{q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1),
                                   static_cast<float>(scale)};
  const bool int8 = k_cache.scalar_type() == at::kChar;
  const float* ks = int8 ? k_scales->data_ptr<float>() : nullptr;
  const float* vs = int8 ? v_scales->data_ptr<float>() : nullptr;
  at::Tensor out = at::empty_like(q);
  auto threads = [](int64_t begin, int64_t end, auto&& body) { at::parallel_for(begin, end, 1, body); };
  auto run = [&](auto* qp, auto* op) {
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    switch (k_cache.scalar_type()) {
      case at::kFloat:
        core::decode_attention(qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), ks, vs, tables, lens, op, q.size(0), shape, threads);
        break;
      case at::kBFloat16:
        core::decode_attention(qp, reinterpret_cast<const core::bf16*>(k_cache.data_ptr<c10::BFloat16>()),
                               reinterpret_cast<const core::bf16*>(v_cache.data_ptr<c10::BFloat16>()), ks, vs, tables, lens, op,
                               q.size(0), shape, threads);
        break;
      case at::kChar:
        core::decode_attention(qp, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), ks, vs, tables, lens, op, q.size(0), shape, threads);
        break;
      default: TORCH_CHECK(false, "sugam decode_attention: cache dtype ", k_cache.scalar_type());
    }
  };
  if (q.scalar_type() == at::kFloat) {
    run(static_cast<const float*>(q.data_ptr<float>()), out.data_ptr<float>());
  } else if (q.scalar_type() == at::kBFloat16) {
    run(reinterpret_cast<const core::bf16*>(q.data_ptr<c10::BFloat16>()), reinterpret_cast<core::bf16*>(out.data_ptr<c10::BFloat16>()));
  } else {
    TORCH_CHECK(false, "sugam decode_attention: query dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace sugam

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_scales, Tensor? v_scales, "
        "Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) { m.impl("decode_attention", &sugam::decode_attention); }
