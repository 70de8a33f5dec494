// Small helpers shared by sugam's CPU kernels (AVX-512): loads and stores of 16 values in the
// storage types, rounding as PyTorch's bf16 ops round, and streaming prefetch of weight rows.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sugam {

inline float fp16_at(const uint8_t* p) {  // an unaligned IEEE half in a GGUF block
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}
inline __m512 load16(const int8_t* x) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)))); }

// fp32 -> bf16 bits, rounded to nearest even as .to(bfloat16) rounds. AVX-512 BF16 (Zen 4, Sapphire
// Rapids) has one instruction for it; AVX-512 CPUs without it (Ice Lake, Cascade Lake: most cloud
// x86 VMs) get the same bits from integer arithmetic: add 0x7FFF plus the kept part's lowest bit,
// and keep a NaN quiet instead of letting the carry turn it into infinity.
inline __m256i bf16_bits(__m512 v) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(c10::BFloat16* y, __m512 v) {  // round to nearest even, as .to(bfloat16)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), bf16_bits(v));
}

// The 32 nibble bytes at p as 64 codes: the low nibbles in bytes 0-31, the high ones in bytes 32-63
// (both halves hold the same bytes, shifted by 0 and 4). The layout of every 4-bit chunk (gguf_matmul.cpp).
inline __m512i nibbles64(const uint8_t* p) {
  const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_srlv_epi64(q, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F));
}

// codes | bit 4 of the 64 codes of a Q5_x chunk from their 8 bytes at bits (bit p of byte i: value
// 8p + i): 64-bit word p of the broadcast keeps bit p of each byte, rotated into bit 4 (left by 4-p).
inline __m512i add_bit4(__m512i codes, const uint8_t* bits) {
  uint64_t word;
  std::memcpy(&word, bits, 8);
  const __m512i rotated = _mm512_rolv_epi64(_mm512_set1_epi64(static_cast<long long>(word)),
                                            _mm512_set_epi64(61, 62, 63, 0, 1, 2, 3, 4));
  return _mm512_ternarylogic_epi32(codes, rotated, _mm512_set1_epi8(0x10), 0xF8);  // codes | (rotated & 0x10)
}

// codes | bits 4-5 of Q6_K's 64 codes from their 16 bytes at pairs (byte i: values i, 16+i, 32+i,
// 48+i, two bits each): 128-bit lane L of the broadcast keeps pair L, rotated into bits 4-5 of each
// 64-bit word (rotation left by 4, 2, 0, 62), and one ternary-logic op masks and merges them.
inline __m512i add_bit_pairs(__m512i codes, const uint8_t* pairs) {
  const __m512i h = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs)));
  const __m512i bits = _mm512_rolv_epi64(h, _mm512_set_epi64(62, 62, 0, 0, 2, 2, 4, 4));
  return _mm512_ternarylogic_epi32(codes, bits, _mm512_set1_epi8(0x30), 0xF8);  // codes | (bits & 0x30)
}

// The 64 unsigned codes of chunk c of a packed row (gguf_matmul.cpp's layout). PLANES: -1 for 8-bit
// codes (Q8_0, or a row decoded once), else the high bits above the nibbles: 1, bit 4 in 8 bytes a
// chunk (Q5_x/Q5_K); 2, bits 4 and 5 as pairs in 16 bytes a chunk (Q6_K).
template <int PLANES>
inline __attribute__((always_inline)) __m512i chunk_codes(const uint8_t* codes, const uint8_t* high, int64_t c) {
  if constexpr (PLANES < 0) {
    return _mm512_loadu_si512(codes + 64 * c);
  } else {
    __m512i v = nibbles64(codes + 32 * c);
    if constexpr (PLANES == 1) v = add_bit4(v, high + 8 * c);
    if constexpr (PLANES == 2) v = add_bit_pairs(v, high + 16 * c);
    return v;
  }
}

// 16 activations times inv (1 / their block's scale), rounded to nearest even: stored at q as int8,
// returned as int32 lanes (for the block sums).
inline __m512i quantize16(__m512 v, __m512 inv, int8_t* q) {
  const __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(codes));
  return codes;
}

// Round to the storage type and back, so that a product is taken of the rounded value, as PyTorch
// does when it multiplies two bf16 tensors.
inline __m512 rounded(__m512 v, const float*) { return v; }
inline __m512 rounded(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16));
}

// Ask for a weight row while an earlier one computes: decode alternates between streaming the
// weights and computing, and the hardware prefetcher alone left the two serialized (measured:
// in-model kernel time = compute time + transfer time without it). ~16 KB ahead measured best (8 KB left long rows short).
inline void prefetch_row(const uint8_t* row, int64_t row_bytes) {
  for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row + off), _MM_HINT_T0);
}
inline int64_t prefetch_distance(int64_t row_bytes) { return std::max<int64_t>(1, 16384 / row_bytes); }

// The same request spread over the computation of the current row: a few cache lines each step
// instead of a whole row at once (a burst of ~100 prefetches of a long row fills the core's
// miss queue and stalls the arithmetic behind it).
struct SpreadPrefetch {
  const char* next;
  const char* end;
  int64_t lines_per_step;
  SpreadPrefetch(const uint8_t* row, int64_t row_bytes, int64_t steps)
      : next(reinterpret_cast<const char*>(row)), end(next + row_bytes),
        lines_per_step((row_bytes + 64 * std::max<int64_t>(steps, 1) - 1) / (64 * std::max<int64_t>(steps, 1))) {}
  inline void step() {
    for (int64_t i = 0; i < lines_per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

}  // namespace sugam
