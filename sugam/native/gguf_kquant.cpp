// K-quant products (Q4_K, Q5_K, Q6_K: the decode path of most *_K_M files) with integer sub-scales.
//
// A super-block of 256 values has one fp16 d (and dmin) and small integer scales per sub-block
// (Q4_K/Q5_K: 6-bit, per 32, with mins; Q6_K: int8, per 16). With the activations quantized per 256
// values (one scale per super-block, as llama.cpp's Q8_K), a super-block's product is
// d * da * sum_g sc_g * (codes_g . qa_g) minus the offset term (dmin * da * sum_g m_g * sum(qa_g), or
// 32 * sc_g * sum(qa_g) for Q6_K): the sub-scales multiply int32 sums (vpmulld on the 16 lanes of a
// 64-value chunk) and the floats appear once per 256 values. In-cache decode products run ~1.4x
// faster than gguf_matmul.cpp's per-16 float path, which lets decode stream weights at full speed.
// A translation unit of its own: inside gguf_matmul.cpp GCC compiled that file's Q5_0 loop 50 % slower.
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
constexpr int64_t Q5_K = 13, Q6_K = 14;

using sugam::load16;
using sugam::prefetch_distance;
using sugam::prefetch_row;
inline float fp16(const uint8_t* p) { return sugam::fp16_at(p); }

// Activation row -> int8 codes with one scale per 256 values, and the code sums of each 16 and 32.
template <typename T>
void quantize_row_256(const T* x, int64_t k, int8_t* q, float* scale256, int32_t* sum16, int32_t* sum32) {
  for (int64_t b = 0; b < k / 256; ++b) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < 256; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + 256 * b + i)));
    const float d = _mm512_reduce_max_ps(amax) / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    scale256[b] = d;
    for (int64_t g = 0; g < 8; ++g) {
      const int64_t at = 256 * b + 32 * g;
      const __m512i q0 = sugam::quantize16(load16(x + at), inv, q + at), q1 = sugam::quantize16(load16(x + at + 16), inv, q + at + 16);
      sum16[16 * b + 2 * g] = _mm512_reduce_add_epi32(q0);
      sum16[16 * b + 2 * g + 1] = _mm512_reduce_add_epi32(q1);
      sum32[8 * b + g] = sum16[16 * b + 2 * g] + sum16[16 * b + 2 * g + 1];
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
  // chunk j's codes: sub-block 2j in bytes 0-31, 2j+1 in bytes 32-63
  const __m512i pick[4] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                           _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
                           _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
                           _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
  __m512 acc = _mm512_setzero_ps();
  __m256 offset = _mm256_setzero_ps();
  for (int64_t b = 0; b < supers; ++b) {
    prefetch.step();
    const __m512i scales = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 8 * b)));
    __m512i isum = _mm512_setzero_si512();
    for (int64_t j = 0; j < 4; ++j) {  // chunk c: sub-blocks 2j and 2j+1, 16 int32 lanes of 8 each
      const int64_t c = 4 * b + j;
      const __m512i codes = sugam::chunk_codes<FIVE ? 1 : 0>(row, high, c);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(qa + 64 * c));
      isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(dot, _mm512_permutexvar_epi32(pick[j], scales)));
    }
    const float da = a_scale256[b];
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(fp16(s + 2 * b) * da), acc);
    const __m256i mins = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + 8 * b))),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_sum32 + 8 * b)));
    offset = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(-fp16(dmins + 2 * b) * da), offset);
  }
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(offset), _mm256_extractf128_ps(offset, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
  return _mm512_reduce_add_ps(acc) + _mm_cvtss_f32(sum4);
}

// Q6_K: 16 groups of 16 a super-block, int8 scales, codes 0-63 with an offset of -32. The offset
// term, -32 * sum_g sc_g * sum(qa_g), starts each super-block's integer sum.
SUGAM_INLINE float q6_row_dot(const uint8_t* row, int64_t k, const int8_t* qa, const float* a_scale256, const int32_t* a_sum16,
                              sugam::SpreadPrefetch& prefetch) {
  const int64_t supers = k / 256;
  const uint8_t* high = row + k / 2;  // bits 4 and 5: 8 bytes of each a chunk
  const uint8_t* s = high + k / 4;
  const int8_t* sc = reinterpret_cast<const int8_t*>(s + 2 * supers);
  // int32 lane l of chunk j covers group 4j + l/4
  const __m512i pick[4] = {_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                           _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
                           _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8),
                           _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < supers; ++b) {
    prefetch.step();
    const __m512i scales = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * b)));
    __m512i isum = _mm512_sub_epi32(_mm512_setzero_si512(),
                                    _mm512_slli_epi32(_mm512_mullo_epi32(scales, _mm512_loadu_si512(a_sum16 + 16 * b)), 5));
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t c = 4 * b + j;
      const __m512i codes = sugam::chunk_codes<2>(row, high, c);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(qa + 64 * c));
      isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(dot, _mm512_permutexvar_epi32(pick[j], scales)));
    }
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(fp16(s + 2 * b) * a_scale256[b]), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The same products for R activation rows at once (a verification or batch step): each chunk's
// codes and picked sub-scales are unpacked once and serve every row; each row's integer and float
// operations, and their order, are those of k4_row_dot / q6_row_dot, so its result is identical.
template <bool FIVE, int R>
SUGAM_INLINE void k4_rows_dot(const uint8_t* row, int64_t k, const int8_t* const* qa, const float* const* a_scale256,
                              const int32_t* const* a_sum32, sugam::SpreadPrefetch& prefetch, float* out) {
  const int64_t supers = k / 256;
  const uint8_t* high = row + k / 2;
  const uint8_t* s = high + (FIVE ? k / 8 : 0);
  const uint8_t* dmins = s + 2 * supers;
  const uint8_t* sc = s + 4 * supers;
  const uint8_t* mn = sc + k / 32;
  const __m512i pick[4] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                           _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
                           _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
                           _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
  __m512 acc[R];
  __m256 offset[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), offset[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < supers; ++b) {
    prefetch.step();
    const __m512i scales = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 8 * b)));
    __m512i codes[4], picked[4];
    for (int64_t j = 0; j < 4; ++j) {
      codes[j] = sugam::chunk_codes<FIVE ? 1 : 0>(row, high, 4 * b + j);
      picked[j] = _mm512_permutexvar_epi32(pick[j], scales);
    }
    const __m256i m8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + 8 * b)));
    const float d = fp16(s + 2 * b), dmin = fp16(dmins + 2 * b);
    for (int r = 0; r < R; ++r) {
      __m512i isum = _mm512_setzero_si512();
      for (int64_t j = 0; j < 4; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[j], _mm512_loadu_si512(qa[r] + 64 * (4 * b + j)));
        isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(dot, picked[j]));
      }
      const float da = a_scale256[r][b];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * da), acc[r]);
      const __m256i mins = _mm256_mullo_epi32(m8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_sum32[r] + 8 * b)));
      offset[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(-dmin * da), offset[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(offset[r]), _mm256_extractf128_ps(offset[r], 1));
    sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
    out[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(sum4);
  }
}

template <int R>
SUGAM_INLINE void q6_rows_dot(const uint8_t* row, int64_t k, const int8_t* const* qa, const float* const* a_scale256,
                              const int32_t* const* a_sum16, sugam::SpreadPrefetch& prefetch, float* out) {
  const int64_t supers = k / 256;
  const uint8_t* high = row + k / 2;
  const uint8_t* s = high + k / 4;
  const int8_t* sc = reinterpret_cast<const int8_t*>(s + 2 * supers);
  const __m512i pick[4] = {_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                           _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
                           _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8),
                           _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < supers; ++b) {
    prefetch.step();
    const __m512i scales = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * b)));
    __m512i codes[4], picked[4];
    for (int64_t j = 0; j < 4; ++j) {
      codes[j] = sugam::chunk_codes<2>(row, high, 4 * b + j);
      picked[j] = _mm512_permutexvar_epi32(pick[j], scales);
    }
    const float d = fp16(s + 2 * b);
    for (int r = 0; r < R; ++r) {
      __m512i isum = _mm512_sub_epi32(_mm512_setzero_si512(),
                                      _mm512_slli_epi32(_mm512_mullo_epi32(scales, _mm512_loadu_si512(a_sum16[r] + 16 * b)), 5));
      for (int64_t j = 0; j < 4; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[j], _mm512_loadu_si512(qa[r] + 64 * (4 * b + j)));
        isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(dot, picked[j]));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * a_scale256[r][b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Rows r0 .. r0 + R of the activations against weight row w.
template <int R>
SUGAM_INLINE void kquant_rows_dot(int64_t qtype, const uint8_t* w, int64_t cols, int64_t r0, const int8_t* qa,
                                  const float* scale256, const int32_t* sum16, const int32_t* sum32,
                                  sugam::SpreadPrefetch& prefetch, float* out) {
  const int8_t* q[R];
  const float* sc[R];
  const int32_t* sums[R];
  for (int r = 0; r < R; ++r) {
    q[r] = qa + (r0 + r) * cols;
    sc[r] = scale256 + (r0 + r) * (cols / 256);
    sums[r] = qtype == Q6_K ? sum16 + (r0 + r) * (cols / 16) : sum32 + (r0 + r) * (cols / 32);
  }
  if (qtype == Q6_K) q6_rows_dot<R>(w, cols, q, sc, sums, prefetch, out);
  else if (qtype == Q5_K) k4_rows_dot<true, R>(w, cols, q, sc, sums, prefetch, out);
  else k4_rows_dot<false, R>(w, cols, q, sc, sums, prefetch, out);
}

template <typename T>
void kquant_rows_matmul(const T* x, const uint8_t* w_p, int64_t qtype, int64_t rows, int64_t cols, int64_t n_out,
               int64_t row_bytes, const float* bias_p, float* out_f, c10::BFloat16* out_b) {
  std::vector<int8_t> qa(rows * cols);
  std::vector<float> scale256(rows * (cols / 256));
  std::vector<int32_t> sum16(rows * (cols / 16)), sum32(rows * (cols / 32));
  for (int64_t r = 0; r < rows; ++r)
    quantize_row_256(x + r * cols, cols, qa.data() + r * cols, scale256.data() + r * (cols / 256), sum16.data() + r * (cols / 16),
                     sum32.data() + r * (cols / 32));
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    const int64_t ahead = prefetch_distance(row_bytes);
    for (int64_t n = n0; n < n0 + ahead && n < n1; ++n) prefetch_row(w_p + n * row_bytes, row_bytes);
    for (int64_t n = n0; n < n1; ++n) {
      // row n + ahead arrives while row n computes (with the first activation row)
      sugam::SpreadPrefetch prefetch(w_p + (n + ahead) * row_bytes, n + ahead < n1 ? row_bytes : 0, cols / 256);
      sugam::SpreadPrefetch none(w_p, 0, 1);
      const float b = bias_p ? bias_p[n] : 0.0f;
      const uint8_t* w = w_p + n * row_bytes;
      auto store = [&](int64_t r, float y) {
        if (out_b) out_b[r * n_out + n] = c10::BFloat16(b + y); else out_f[r * n_out + n] = b + y;
      };
      if (rows == 1) {  // decode: codes decoded in registers, one pass
        const float y = qtype == Q6_K ? q6_row_dot(w, cols, qa.data(), scale256.data(), sum16.data(), prefetch)
                        : qtype == Q5_K ? k4_row_dot<true>(w, cols, qa.data(), scale256.data(), sum32.data(), prefetch)
                                        : k4_row_dot<false>(w, cols, qa.data(), scale256.data(), sum32.data(), prefetch);
        store(0, y);
        continue;
      }
      // Several rows (the same arithmetic for each row, whatever the batch): up to six at a time
      // share the unpacked codes (a speculative step of 1 + 5 rows is one group; more registers would
      // spill); the weight row stays in L1 between groups.
      float y[6];
      for (int64_t r = 0; r < rows;) {
        const int64_t group = rows - r <= 6 ? rows - r : 4;
        sugam::SpreadPrefetch& pf = r == 0 ? prefetch : none;
        switch (group) {
          case 6: kquant_rows_dot<6>(qtype, w, cols, r, qa.data(), scale256.data(), sum16.data(), sum32.data(), pf, y); break;
          case 5: kquant_rows_dot<5>(qtype, w, cols, r, qa.data(), scale256.data(), sum16.data(), sum32.data(), pf, y); break;
          case 4: kquant_rows_dot<4>(qtype, w, cols, r, qa.data(), scale256.data(), sum16.data(), sum32.data(), pf, y); break;
          case 3: kquant_rows_dot<3>(qtype, w, cols, r, qa.data(), scale256.data(), sum16.data(), sum32.data(), pf, y); break;
          case 2: kquant_rows_dot<2>(qtype, w, cols, r, qa.data(), scale256.data(), sum16.data(), sum32.data(), pf, y); break;
          default: kquant_rows_dot<1>(qtype, w, cols, r, qa.data(), scale256.data(), sum16.data(), sum32.data(), pf, y); break;
        }
        for (int64_t i = 0; i < group; ++i) store(r + i, y[i]);
        r += group;
      }
    }
  });
}

}  // namespace

void kquant_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, const float* bias, at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1), n_out = packed.size(0), row_bytes = packed.size(1);
  if (x.scalar_type() == at::kBFloat16)
    kquant_rows_matmul(x.data_ptr<c10::BFloat16>(), packed.data_ptr<uint8_t>(), qtype, rows, cols, n_out, row_bytes, bias, nullptr, out.data_ptr<c10::BFloat16>());
  else
    kquant_rows_matmul(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), qtype, rows, cols, n_out, row_bytes, bias, out.data_ptr<float>(), nullptr);
}
