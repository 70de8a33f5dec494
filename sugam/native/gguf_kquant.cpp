// Q4_K / Q5_K products with integer sub-scales (the decode path of most Q4_K_M files).
//
// Their 8 sub-blocks of 32 share one fp16 d (and dmin) and carry 6-bit integer scales (and mins).
// With the activations quantized per 256 values (one scale per super-block), a super-block's
// product is d * da * sum_g sc_g * (codes_g . qa_g) - dmin * da * sum_g m_g * sum(qa_g): the
// sub-scales multiply int32 sums (one vpmulld per 32 values, in 256-bit registers) and the floats
// appear once per 256 values, about half the instructions of gguf_matmul.cpp's per-16 float path;
// decode streams the weights at full speed only if compute keeps up. A translation unit of its
// own: inside gguf_matmul.cpp GCC compiled that file's Q5_0 loop 50 % slower.
// The row layout is gguf_matmul.cpp's (see there).

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
constexpr int64_t Q5_K = 13;

using sugam::load16;
using sugam::prefetch_distance;
using sugam::prefetch_row;
inline float fp16(const uint8_t* p) { return sugam::fp16_at(p); }

// Activation row -> int8 codes with one scale per 256 values, and the code sum of each 32.
template <typename T>
void quantize_row_256(const T* x, int64_t k, int8_t* q, float* scale256, int32_t* sum32) {
  for (int64_t b = 0; b < k / 256; ++b) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < 256; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + 256 * b + i)));
    const float d = _mm512_reduce_max_ps(amax) / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    scale256[b] = d;
    for (int64_t g = 0; g < 8; ++g) {
      const int64_t at = 256 * b + 32 * g;
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + at), inv));
      __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + at + 16), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + at), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + at + 16), _mm512_cvtsepi32_epi8(q1));
      sum32[8 * b + g] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
  }
}

template <bool FIVE>
SUGAM_INLINE float k4_row_dot(const uint8_t* row, int64_t k, const int8_t* qa, const float* a_scale256, const int32_t* a_sum32,
                              sugam::SpreadPrefetch& prefetch) {
  const int64_t supers = k / 256;
  const uint8_t* high = row + k / 2;
  const uint8_t* s = high + (FIVE ? k / 8 : 0);
  const uint8_t* dmins = s + 2 * supers;
  const uint8_t* sc = s + 4 * supers;
  const uint8_t* mn = sc + k / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.0f;
  for (int64_t b = 0; b < supers; ++b) {
    prefetch.step();
    __m256i isum = _mm256_setzero_si256();
    for (int64_t j = 0; j < 4; ++j) {  // chunk c: sub-block 2j in the low nibbles, 2j+1 in the high
      const int64_t c = 4 * b + j;
      __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c));
      __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      if constexpr (FIVE) {
        uint64_t bits;
        std::memcpy(&bits, high + 8 * c, 8);
        lo = _mm256_or_si256(lo, _mm256_maskz_mov_epi8(static_cast<__mmask32>(bits), _mm256_set1_epi8(16)));
        hi = _mm256_or_si256(hi, _mm256_maskz_mov_epi8(static_cast<__mmask32>(bits >> 32), _mm256_set1_epi8(16)));
      }
      __m256i slo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + 64 * c)));
      __m256i shi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + 64 * c + 32)));
      isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(slo, _mm256_set1_epi32(sc[8 * b + 2 * j])));
      isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(shi, _mm256_set1_epi32(sc[8 * b + 2 * j + 1])));
    }
    int32_t mins = 0;
    for (int64_t g = 0; g < 8; ++g) mins += mn[8 * b + g] * a_sum32[8 * b + g];
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(fp16(s + 2 * b) * a_scale256[b]), acc);
    offset -= fp16(dmins + 2 * b) * a_scale256[b] * static_cast<float>(mins);
  }
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
  return _mm_cvtss_f32(sum4) + offset;
}

template <typename T>
void k4_matmul(const T* x, const uint8_t* w_p, int64_t qtype, int64_t rows, int64_t cols, int64_t n_out,
               int64_t row_bytes, const float* bias_p, float* out_f, c10::BFloat16* out_b) {
  std::vector<int8_t> qa(rows * cols);
  std::vector<float> scale256(rows * (cols / 256));
  std::vector<int32_t> sum32(rows * (cols / 32));
  for (int64_t r = 0; r < rows; ++r)
    quantize_row_256(x + r * cols, cols, qa.data() + r * cols, scale256.data() + r * (cols / 256), sum32.data() + r * (cols / 32));
  const bool five = qtype == Q5_K;
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    const int64_t ahead = prefetch_distance(row_bytes);
    for (int64_t n = n0; n < n0 + ahead && n < n1; ++n) prefetch_row(w_p + n * row_bytes, row_bytes);
    for (int64_t n = n0; n < n1; ++n) {
      // row n + ahead arrives while row n computes (with the first activation row)
      sugam::SpreadPrefetch prefetch(w_p + (n + ahead) * row_bytes, n + ahead < n1 ? row_bytes : 0, cols / 256);
      sugam::SpreadPrefetch none(w_p, 0, 1);
      const float b = bias_p ? bias_p[n] : 0.0f;
      for (int64_t r = 0; r < rows; ++r) {  // the same arithmetic for each row, whatever the batch
        const int8_t* q = qa.data() + r * cols;
        const float* sc = scale256.data() + r * (cols / 256);
        const int32_t* sm = sum32.data() + r * (cols / 32);
        sugam::SpreadPrefetch& pf = r == 0 ? prefetch : none;
        const float y = b + (five ? k4_row_dot<true>(w_p + n * row_bytes, cols, q, sc, sm, pf)
                                  : k4_row_dot<false>(w_p + n * row_bytes, cols, q, sc, sm, pf));
        if (out_b) out_b[r * n_out + n] = c10::BFloat16(y); else out_f[r * n_out + n] = y;
      }
    }
  });
}

}  // namespace

void k4_gguf_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, const float* bias, at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1), n_out = packed.size(0), row_bytes = packed.size(1);
  if (x.scalar_type() == at::kBFloat16)
    k4_matmul(x.data_ptr<c10::BFloat16>(), packed.data_ptr<uint8_t>(), qtype, rows, cols, n_out, row_bytes, bias, nullptr, out.data_ptr<c10::BFloat16>());
  else
    k4_matmul(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), qtype, rows, cols, n_out, row_bytes, bias, out.data_ptr<float>(), nullptr);
}
