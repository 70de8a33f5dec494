// Q4_0 / Q5_0 / Q8_0 products: blocks of 32 codes with one fp16 scale and a fixed offset (-8, -16,
// -128), the bulk of files whose rows are not a multiple of 256 (Qwen2.5-0.5B: 896).
//
// A block's product is d * da * (codes . qa - offset * sum(qa)). The offset term is an integer, so
// it is computed once per activation row and enters the vpdpbusd accumulator of the block's first
// lane; the weight scales of 16 blocks are converted and multiplied by the activation scales with
// one instruction each, and a chunk of 64 values then costs one permute and one fma beyond its dot
// product. In-cache decode: 31 -> ~40 GB/s of weights on a Q5_0 4864x896 matrix (gguf_matmul.cpp's
// per-16 float path, which Q4_1/Q5_1 keep for their float offsets).
// A translation unit of its own, for the reason gguf_kquant.cpp gives. Row layout: gguf_matmul.cpp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#define SUGAM_INLINE inline __attribute__((always_inline))
constexpr int64_t Q4_0 = 2, Q5_0 = 6, Q8_0 = 8;

using sugam::load16;

// Activation row -> int8 codes per 32-block (scale max|x|/127), the block scales, and per int32 lane
// the offset term: -offset * sum(block's codes) on the block's first lane, 0 on the others.
template <typename T>
void quantize_row_32(const T* x, int64_t k, int32_t offset, int8_t* q, float* block_scale, int32_t* lane_offset) {
  std::memset(lane_offset, 0, sizeof(int32_t) * (k / 4));
  for (int64_t b = 0; b < k / 32; ++b) {
    const __m512 v0 = load16(x + 32 * b), v1 = load16(x + 32 * b + 16);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    const __m512i q0 = sugam::quantize16(v0, inv, q + 32 * b), q1 = sugam::quantize16(v1, inv, q + 32 * b + 16);
    block_scale[b] = d;
    lane_offset[8 * b] = -offset * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

using sugam::chunk_codes;  // PLANES -1: Q8_0 (or a row decoded once), 0: Q4_0, 1: Q5_0

// One weight row . one activation row. d16: the row's fp16 block scales.
template <int PLANES>
SUGAM_INLINE float row_dot(const uint8_t* codes, const uint8_t* high, const uint8_t* d16, const int8_t* qa, const float* a_scale,
                           const int32_t* a_offset, int64_t k, sugam::SpreadPrefetch& prefetch) {
  // lanes 0-7 of chunk j of a group take block 2j's scale, lanes 8-15 block 2j+1's
  alignas(64) static const int32_t pick[8][16] = {
      {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
      {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
      {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
      {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13}, {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};
  const int64_t chunks = k / 64;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  auto dot = [&](int64_t c) {
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_loadu_si512(a_offset + 16 * c), chunk_codes<PLANES>(codes, high, c),
                                                  _mm512_loadu_si512(qa + 64 * c)));
  };
  for (int64_t c0 = 0; c0 < chunks; c0 += 8) {  // 8 chunks = 16 blocks share one scale conversion
    const int64_t n = std::min<int64_t>(8, chunks - c0);
    const __mmask16 m = n == 8 ? __mmask16(0xFFFF) : __mmask16((1u << (2 * n)) - 1);
    const __m512 scales = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, d16 + 4 * c0)),
                                        _mm512_maskz_loadu_ps(m, a_scale + 2 * c0));
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {  // two chains: the fma latency is 4 cycles
      prefetch.step();
      acc0 = _mm512_fmadd_ps(dot(c0 + j), _mm512_permutexvar_ps(_mm512_load_si512(pick[j]), scales), acc0);
      acc1 = _mm512_fmadd_ps(dot(c0 + j + 1), _mm512_permutexvar_ps(_mm512_load_si512(pick[j + 1]), scales), acc1);
    }
    if (j < n) acc0 = _mm512_fmadd_ps(dot(c0 + j), _mm512_permutexvar_ps(_mm512_load_si512(pick[j]), scales), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <int PLANES, typename T>
void matmul(const T* x, const uint8_t* w_p, int64_t qtype, int64_t rows, int64_t cols, int64_t n_out, int64_t row_bytes,
            const float* bias_p, float* out_f, c10::BFloat16* out_b) {
  const int32_t offset = qtype == Q8_0 ? 128 : qtype == Q5_0 ? 16 : 8;
  std::vector<int8_t> qa(rows * cols);
  std::vector<float> a_scale(rows * (cols / 32));
  std::vector<int32_t> a_offset(rows * (cols / 4));
  for (int64_t r = 0; r < rows; ++r)
    quantize_row_32(x + r * cols, cols, offset, qa.data() + r * cols, a_scale.data() + r * (cols / 32), a_offset.data() + r * (cols / 4));
  const int64_t code_bytes = PLANES < 0 ? cols : cols / 2;
  const int64_t high_bytes = PLANES == 1 ? cols / 8 : 0;
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    const int64_t ahead = sugam::prefetch_distance(row_bytes);
    for (int64_t n = n0; n < n0 + ahead && n < n1; ++n) sugam::prefetch_row(w_p + n * row_bytes, row_bytes);
    std::vector<uint8_t> decoded(rows > 1 && PLANES >= 0 ? cols : 0);
    sugam::SpreadPrefetch none(w_p, 0, 1);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w_p + n * row_bytes;
      const uint8_t* d16 = row + code_bytes + high_bytes;
      sugam::SpreadPrefetch prefetch(w_p + (n + ahead) * row_bytes, n + ahead < n1 ? row_bytes : 0, cols / 128);
      const float b = bias_p ? bias_p[n] : 0.0f;
      auto store = [&](int64_t r, float y) {
        if (out_b) out_b[r * n_out + n] = c10::BFloat16(y); else out_f[r * n_out + n] = y;
      };
      if (rows == 1 || PLANES < 0) {  // codes decoded in registers (decode) or read as they are (Q8_0)
        for (int64_t r = 0; r < rows; ++r)
          store(r, b + row_dot<PLANES>(row, row + code_bytes, d16, qa.data() + r * cols, a_scale.data() + r * (cols / 32),
                                       a_offset.data() + r * (cols / 4), cols, r == 0 ? prefetch : none));
        continue;
      }
      // several activation rows: the weight row's codes once as bytes, the same integers for each
      for (int64_t c = 0; c < cols / 64; ++c)
        _mm512_storeu_si512(decoded.data() + 64 * c, chunk_codes<PLANES>(row, row + code_bytes, c));
      for (int64_t r = 0; r < rows; ++r)
        store(r, b + row_dot<-1>(decoded.data(), nullptr, d16, qa.data() + r * cols, a_scale.data() + r * (cols / 32),
                                 a_offset.data() + r * (cols / 4), cols, r == 0 ? prefetch : none));
    }
  });
}

template <typename T>
void dispatch(const T* x, const uint8_t* w_p, int64_t qtype, int64_t rows, int64_t cols, int64_t n_out, int64_t row_bytes,
              const float* bias_p, float* out_f, c10::BFloat16* out_b) {
  if (qtype == Q8_0) matmul<-1>(x, w_p, qtype, rows, cols, n_out, row_bytes, bias_p, out_f, out_b);
  else if (qtype == Q5_0) matmul<1>(x, w_p, qtype, rows, cols, n_out, row_bytes, bias_p, out_f, out_b);
  else matmul<0>(x, w_p, qtype, rows, cols, n_out, row_bytes, bias_p, out_f, out_b);
}

}  // namespace

// Q4_0 / Q5_0 / Q8_0 products into out [rows, n_out] of x's dtype; x contiguous fp32 or bf16, bias
// (fp32) may be null. Shapes are checked by the caller (gguf_matmul.cpp).
void block32_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, const float* bias, at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1), n_out = packed.size(0), row_bytes = packed.size(1);
  if (x.scalar_type() == at::kBFloat16)
    dispatch(x.data_ptr<c10::BFloat16>(), packed.data_ptr<uint8_t>(), qtype, rows, cols, n_out, row_bytes, bias, nullptr, out.data_ptr<c10::BFloat16>());
  else
    dispatch(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), qtype, rows, cols, n_out, row_bytes, bias, out.data_ptr<float>(), nullptr);
}
