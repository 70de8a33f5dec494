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

// codes + value in the bytes whose bit is set in the 8 bytes at bits: one bit plane of higher code
// bits (a bit the codes do not have yet, so the addition is an or).
inline __m512i add_bit_plane(__m512i codes, const uint8_t* bits, int8_t value) {
  uint64_t mask;
  std::memcpy(&mask, bits, 8);
  return _mm512_mask_add_epi8(codes, mask, codes, _mm512_set1_epi8(value));
}

// The 64 unsigned codes of chunk c of a packed row (gguf_matmul.cpp's layout, the AVX-512 build's
// "planes" for the high bits). PLANES: -1 for 8-bit codes (Q8_0, or a row decoded once), else the bit
// planes above the nibbles, 8 bytes each a chunk (Q5_x/Q5_K: bit 4; Q6_K: bits 4 and 5). A plane
// costs one masked add here; the portable builds' "shifts" layout would cost a rotate and a merge.
template <int PLANES>
inline __attribute__((always_inline)) __m512i chunk_codes(const uint8_t* codes, const uint8_t* high, int64_t c) {
  if constexpr (PLANES < 0) {
    return _mm512_loadu_si512(codes + 64 * c);
  } else {
    __m512i v = nibbles64(codes + 32 * c);
    if constexpr (PLANES >= 1) v = add_bit_plane(v, high + 8 * PLANES * c, 16);
    if constexpr (PLANES == 2) v = add_bit_plane(v, high + 16 * c + 8, 32);
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
