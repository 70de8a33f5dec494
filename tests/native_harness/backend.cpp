// One backend of sugam's portable kernels (sugam/native/portable/core.h) behind plain functions, for
// the harness (main.cpp). Compiled twice into one program: once as the scalar reference
// (-DSUGAM_FORCE_SCALAR -DSUGAM_CORE_NS=ref) and once for the target's vectors (-DSUGAM_CORE_NS=simd).

#include "../../sugam/native/portable/core.h"

#include <vector>

namespace sugam {
namespace SUGAM_CORE_NS {

// y [rows, n_out] = x [rows, k] W^T + bias, T the activations' and outputs' type
template <typename T>
static void matmul(int64_t qtype, const T* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n_out, const float* bias, T* y) {
  std::vector<uint8_t> memory(ActsBuffer::bytes(rows, k)), scratch(matmul_scratch_bytes(k));
  const ActsBuffer acts(memory.data(), rows, k, activation_block(qtype));
  for (int64_t r = 0; r < rows; ++r)
    acts.quantize(r, x + r * k);
  // two ranges of output rows, as two threads would split them
  const int64_t row_bytes = layout_of(qtype, k).row_bytes(), half = n_out / 2;
  matmul_rows(acts, rows, w, row_bytes, qtype, k, 0, half, bias, y, n_out, scratch.data());
  matmul_rows(acts, rows, w, row_bytes, qtype, k, half, n_out, bias, y, n_out, scratch.data());
}

void api_matmul_f32(int64_t qtype, const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n_out, const float* bias, float* y) {
  matmul(qtype, x, rows, k, w, n_out, bias, y);
}
void api_matmul_bf16(int64_t qtype, const uint16_t* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n_out, const float* bias, uint16_t* y) {
  matmul(qtype, reinterpret_cast<const bf16*>(x), rows, k, w, n_out, bias, reinterpret_cast<bf16*>(y));
}

void api_dequantize(int64_t qtype, const uint8_t* w, int64_t n, int64_t k, float* y) {
  std::vector<uint8_t> codes(k);
  const int64_t row_bytes = layout_of(qtype, k).row_bytes();
  for (int64_t i = 0; i < n; ++i) dequantize_row(qtype, w + i * row_bytes, k, codes.data(), y + i * k);
}

// cache: 0 fp32, 1 bf16, 2 int8 (with scales); q and out fp32. The tasks run in two ranges, as two
// threads would take them.
void api_attention(const float* q, const void* k_cache, const void* v_cache, int cache, const float* k_scales, const float* v_scales,
                   const int64_t* tables, const int64_t* lens, float* out, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim,
                   int64_t block_size, int64_t max_blocks, float scale) {
  const AttentionShape shape{heads, kv_heads, dim, block_size, max_blocks, scale};
  auto two_threads = [](int64_t begin, int64_t end, auto&& body) {
    const int64_t half = begin + (end - begin) / 2;
    body(half, end);
    if (half > begin) body(begin, half);
  };
  if (cache == 0) {
    decode_attention(q, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), k_scales, v_scales, tables, lens, out, n, shape, two_threads);
  } else if (cache == 1) {
    decode_attention(q, static_cast<const bf16*>(k_cache), static_cast<const bf16*>(v_cache), k_scales, v_scales, tables, lens, out, n, shape, two_threads);
  } else {
    decode_attention(q, static_cast<const int8_t*>(k_cache), static_cast<const int8_t*>(v_cache), k_scales, v_scales, tables, lens, out, n, shape, two_threads);
  }
}

template <typename T>
static void layers(const T* x, const T* weight, const T* gate_up, const T* cos, const T* sin, int64_t h, T* norm_out, T* silu_out, T* rot_out) {
  rms_norm_row(x, weight, norm_out, h, 1e-6f);
  silu_mul_row(gate_up, silu_out, h);
  rotary_row(x, cos, sin, rot_out, h);
}
void api_layers_f32(const float* x, const float* w, const float* gu, const float* c, const float* s, int64_t h, float* a, float* b, float* r) {
  layers(x, w, gu, c, s, h, a, b, r);
}
void api_layers_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* gu, const uint16_t* c, const uint16_t* s, int64_t h,
                     uint16_t* a, uint16_t* b, uint16_t* r) {
  auto p = [](const uint16_t* v) { return reinterpret_cast<const bf16*>(v); };
  auto o = [](uint16_t* v) { return reinterpret_cast<bf16*>(v); };
  layers(p(x), p(w), p(gu), p(c), p(s), h, o(a), o(b), o(r));
}

}  // namespace SUGAM_CORE_NS
}  // namespace sugam

namespace sugam {
namespace SUGAM_CORE_NS {

const char* api_backend() {
#if SUGAM_VEC_AVX2 && defined(__AVXVNNI__)
  return "avx2 + AVX-VNNI dot products";
#elif SUGAM_VEC_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx2 + AVX-512 VNNI (256-bit) dot products";
#elif SUGAM_VEC_AVX2
  return "avx2 (vpmaddubsw)";
#elif SUGAM_VEC_NEON && defined(__ARM_FEATURE_DOTPROD)
  return "neon + dotprod (sdot)";
#elif SUGAM_VEC_NEON
  return "neon (smull)";
#else
  return "scalar";
#endif
}

}  // namespace SUGAM_CORE_NS
}  // namespace sugam
