// The 256-bit vectors that sugam's portable kernels (core.h) are written in, with one backend per
// instruction set, chosen by the compiler flags of the translation unit:
//   AVX2 + FMA + F16C (x86-64 since Haswell / Zen 1), with the VNNI dot product where present
//   (AVX-VNNI, or AVX-512 VNNI + VL), else vpmaddubsw + vpmaddwd;
//   NEON (every aarch64 CPU), with the dotprod extension's sdot where present;
//   scalar C++ (any CPU): the reference the others are tested against (tests/native_harness.cpp).
// SUGAM_FORCE_SCALAR picks the scalar backend whatever the flags.
//
// Everything sits in namespace sugam::SUGAM_CORE_NS, so that one program can hold two backends (the
// test harness compares them); the default name is `portable`.
//
// Lane conventions (the same on every backend, so that the kernels' integer sums agree exactly):
//   Bytes: 32 bytes; I32 / F32: 8 lanes; dot() adds bytes 4l..4l+3 of its products to lane l.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef SUGAM_CORE_NS
#define SUGAM_CORE_NS portable
#endif

#if !defined(SUGAM_FORCE_SCALAR) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SUGAM_VEC_AVX2 1
#include <immintrin.h>
#elif !defined(SUGAM_FORCE_SCALAR) && defined(__ARM_NEON) && defined(__aarch64__)
#define SUGAM_VEC_NEON 1
#include <arm_neon.h>
#else
#define SUGAM_VEC_SCALAR 1
#endif

namespace sugam {
namespace SUGAM_CORE_NS {

#define SUGAM_INLINE inline __attribute__((always_inline))

struct bf16 {  // bfloat16 storage (the layout of c10::BFloat16)
  uint16_t bits;
};

// IEEE half -> float, exactly (GGUF block scales); half_to_float below uses the hardware's conversion
inline float half_to_float_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400)) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float -> bf16, round to nearest even (NaN stays a quiet NaN), as c10::BFloat16 and .to(bfloat16)
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7FC0};
  return {static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)};
}
inline float from_bf16(bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float load1(const float* x) { return *x; }
inline float load1(const bf16* x) { return from_bf16(*x); }
inline void store1(float* y, float v) { *y = v; }
inline void store1(bf16* y, float v) { *y = to_bf16(v); }

#if SUGAM_VEC_AVX2

struct Bytes { __m256i v; };
struct I32 { __m256i v; };
struct F32 { __m256 v; };

SUGAM_INLINE Bytes load_bytes(const void* p) { return {_mm256_loadu_si256(static_cast<const __m256i*>(p))}; }
SUGAM_INLINE void store_bytes(void* p, Bytes b) { _mm256_storeu_si256(static_cast<__m256i*>(p), b.v); }
// the 32 low (high) nibbles of the 32 bytes at p
SUGAM_INLINE Bytes low_nibbles(const uint8_t* p) { return {_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi8(0x0F))}; }
SUGAM_INLINE Bytes high_nibbles(const uint8_t* p) {
  return {_mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 4), _mm256_set1_epi8(0x0F))};
}
// Q5_x's bit 4 of a chunk's 64 codes from their 8 bytes at bits (bit p of byte i: value 8p + i): a
// shift per 64-bit word moves bit p of each byte into bit 4; lo holds values 0-31, hi 32-63
SUGAM_INLINE void add_bit4(Bytes& lo, Bytes& hi, const uint8_t* bits) {
  int64_t word;
  std::memcpy(&word, bits, 8);
  const __m256i h = _mm256_set1_epi64x(word), mask = _mm256_set1_epi8(0x10);
  lo.v = _mm256_or_si256(lo.v, _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_set_epi64x(1, 2, 3, 4)), mask));
  hi.v = _mm256_or_si256(hi.v, _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_set_epi64x(3, 2, 1, 0)), mask));
}
// Q6_K's bits 4-5 of a chunk's 64 codes from their 16 bytes at pairs (byte i: values i, 16+i, 32+i,
// 48+i in its bit pairs 0-1, 2-3, 4-5, 6-7): a shift per 64-bit word moves the pair of each 16
// values into bits 4-5; lo holds values 0-31, hi 32-63
SUGAM_INLINE void add_bit_pairs(Bytes& lo, Bytes& hi, const uint8_t* pairs) {
  const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs)));
  const __m256i mask = _mm256_set1_epi8(0x30);
  lo.v = _mm256_or_si256(lo.v, _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_set_epi64x(2, 2, 4, 4)), mask));
  hi.v = _mm256_or_si256(hi.v, _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_set_epi64x(2, 2, 0, 0)), mask));
}
SUGAM_INLINE Bytes flip_sign_bit(Bytes b) { return {_mm256_xor_si256(b.v, _mm256_set1_epi8(static_cast<char>(0x80)))}; }

// acc + sums of 4 products of unsigned codes (< 128) and int8 activations
SUGAM_INLINE I32 dot(I32 acc, Bytes codes, Bytes acts) {
#if defined(__AVXVNNI__)
  return {_mm256_dpbusd_avx_epi32(acc.v, codes.v, acts.v)};
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return {_mm256_dpbusd_epi32(acc.v, codes.v, acts.v)};
#else
  // pairs of products fit int16: 2 * 127 * 128 < 32768
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(_mm256_maddubs_epi16(codes.v, acts.v), _mm256_set1_epi16(1)))};
#endif
}
// the same for signed codes: |w| times a with w's sign
SUGAM_INLINE I32 dot_signed(I32 acc, Bytes w, Bytes acts) {
  return dot(acc, Bytes{_mm256_sign_epi8(w.v, w.v)}, Bytes{_mm256_sign_epi8(acts.v, w.v)});
}
// acc + scale x the 4-sums of dot(), codes < 64 and |scale| <= 128 (the K-quants' integer sub-scales):
// vpmaddwd multiplies the pair sums by the scale where dot() multiplies them by one, so the scale
// costs nothing. dot_scaled2: lanes 0-3 (bytes 0-15) by lo, lanes 4-7 by hi.
SUGAM_INLINE I32 dot_scaled2(I32 acc, Bytes codes, Bytes acts, int16_t lo, int16_t hi) {
  const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(_mm256_maddubs_epi16(codes.v, acts.v), scale))};
}
SUGAM_INLINE I32 dot_scaled(I32 acc, Bytes codes, Bytes acts, int16_t scale) {
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(_mm256_maddubs_epi16(codes.v, acts.v), _mm256_set1_epi16(scale)))};
}
// Eight integer sub-scales held as int16 in a register (each 128-bit half a copy), loaded once per
// super-block; dot_scales<LO, HI> is dot_scaled2 with scales LO and HI of the set, picked by one
// vpshufb instead of a scalar load and broadcast per block.
struct ScaleSet { __m256i v; };
SUGAM_INLINE ScaleSet load_scales(const uint8_t* p) {
  return {_mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
SUGAM_INLINE ScaleSet load_scales(const int8_t* p) {
  return {_mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
template <int LO, int HI>
SUGAM_INLINE I32 dot_scales(I32 acc, Bytes codes, Bytes acts, ScaleSet s) {
  const __m256i pick = _mm256_setr_epi8(2 * LO, 2 * LO + 1, 2 * LO, 2 * LO + 1, 2 * LO, 2 * LO + 1, 2 * LO, 2 * LO + 1,
                                        2 * LO, 2 * LO + 1, 2 * LO, 2 * LO + 1, 2 * LO, 2 * LO + 1, 2 * LO, 2 * LO + 1,
                                        2 * HI, 2 * HI + 1, 2 * HI, 2 * HI + 1, 2 * HI, 2 * HI + 1, 2 * HI, 2 * HI + 1,
                                        2 * HI, 2 * HI + 1, 2 * HI, 2 * HI + 1, 2 * HI, 2 * HI + 1, 2 * HI, 2 * HI + 1);
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(_mm256_maddubs_epi16(codes.v, acts.v), _mm256_shuffle_epi8(s.v, pick)))};
}

SUGAM_INLINE I32 zero_i32() { return {_mm256_setzero_si256()}; }
SUGAM_INLINE I32 load_i32(const int32_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
SUGAM_INLINE F32 to_f32(I32 a) { return {_mm256_cvtepi32_ps(a.v)}; }
SUGAM_INLINE int32_t reduce_add(I32 a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a.v), _mm256_extracti128_si256(a.v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
// round to nearest even, saturate to int8, store 8 bytes; returns the rounded lanes
SUGAM_INLINE I32 round_store_i8(F32 v, int8_t* q) {
  const __m256i r = _mm256_cvtps_epi32(v.v);  // MXCSR's default: nearest even
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w, w));
  return {r};
}

SUGAM_INLINE F32 zero_f32() { return {_mm256_setzero_ps()}; }
SUGAM_INLINE F32 set1(float x) { return {_mm256_set1_ps(x)}; }
SUGAM_INLINE F32 load(const float* p) { return {_mm256_loadu_ps(p)}; }
SUGAM_INLINE F32 load(const bf16* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16))};
}
SUGAM_INLINE F32 load_halfs(const uint8_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
// The first n (< 8) values, zeros after; nothing past them is read. Masked loads: a vector built from
// scalar stores would stall on store forwarding. load_halfs_partial: n even.
SUGAM_INLINE __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
}
SUGAM_INLINE F32 load_partial(const float* p, int64_t n) { return {_mm256_maskload_ps(p, first_lanes(n))}; }
SUGAM_INLINE I32 load_partial(const int32_t* p, int64_t n) { return {_mm256_maskload_epi32(p, first_lanes(n))}; }
SUGAM_INLINE F32 load_halfs_partial(const uint8_t* p, int64_t n) {
  return {_mm256_cvtph_ps(_mm_maskload_epi32(reinterpret_cast<const int*>(p), _mm256_castsi256_si128(first_lanes(n / 2))))};
}
SUGAM_INLINE F32 load_u8(const uint8_t* p) { return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))}; }
SUGAM_INLINE F32 load_i8(const int8_t* p) { return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))}; }
SUGAM_INLINE void store(float* p, F32 v) { _mm256_storeu_ps(p, v.v); }
SUGAM_INLINE void store(bf16* p, F32 v) {  // round to nearest even (NaN -> quiet NaN)
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
SUGAM_INLINE F32 add(F32 a, F32 b) { return {_mm256_add_ps(a.v, b.v)}; }
SUGAM_INLINE F32 sub(F32 a, F32 b) { return {_mm256_sub_ps(a.v, b.v)}; }
SUGAM_INLINE F32 mul(F32 a, F32 b) { return {_mm256_mul_ps(a.v, b.v)}; }
SUGAM_INLINE F32 div(F32 a, F32 b) { return {_mm256_div_ps(a.v, b.v)}; }
SUGAM_INLINE F32 fma(F32 a, F32 b, F32 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
SUGAM_INLINE F32 max(F32 a, F32 b) { return {_mm256_max_ps(a.v, b.v)}; }
SUGAM_INLINE F32 min(F32 a, F32 b) { return {_mm256_min_ps(a.v, b.v)}; }
SUGAM_INLINE F32 abs(F32 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
SUGAM_INLINE F32 round_even(F32 a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// a * 2^n for integral n in [-127, 127]
SUGAM_INLINE F32 times_pow2(F32 a, F32 n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(a.v, _mm256_castsi256_ps(e))};
}
SUGAM_INLINE float reduce_add(F32 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
SUGAM_INLINE float reduce_max(F32 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// lane i = the sum of v[i]'s lanes, added ((0+1)+(2+3))+((4+5)+(6+7)) on every backend
SUGAM_INLINE F32 reduce_add8(const F32* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0].v, v[1].v), _mm256_hadd_ps(v[2].v, v[3].v));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4].v, v[5].v), _mm256_hadd_ps(v[6].v, v[7].v));
  return {_mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31))};
}
SUGAM_INLINE void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

#elif SUGAM_VEC_NEON

struct Bytes { uint8x16_t lo, hi; };
struct I32 { int32x4_t lo, hi; };
struct F32 { float32x4_t lo, hi; };

SUGAM_INLINE Bytes load_bytes(const void* p) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  return {vld1q_u8(b), vld1q_u8(b + 16)};
}
SUGAM_INLINE void store_bytes(void* p, Bytes v) {
  uint8_t* b = static_cast<uint8_t*>(p);
  vst1q_u8(b, v.lo);
  vst1q_u8(b + 16, v.hi);
}
SUGAM_INLINE Bytes low_nibbles(const uint8_t* p) {
  const uint8x16_t m = vdupq_n_u8(0x0F);
  return {vandq_u8(vld1q_u8(p), m), vandq_u8(vld1q_u8(p + 16), m)};
}
SUGAM_INLINE Bytes high_nibbles(const uint8_t* p) { return {vshrq_n_u8(vld1q_u8(p), 4), vshrq_n_u8(vld1q_u8(p + 16), 4)}; }
SUGAM_INLINE void add_bit4(Bytes& lo, Bytes& hi, const uint8_t* bits) {  // as on AVX2, a shift per byte
  static const int8_t shift[4][16] = {{4, 4, 4, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3},
                                      {2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1},
                                      {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1},
                                      {-2, -2, -2, -2, -2, -2, -2, -2, -3, -3, -3, -3, -3, -3, -3, -3}};
  const uint8x8_t b = vld1_u8(bits);
  const uint8x16_t h = vcombine_u8(b, b), mask = vdupq_n_u8(0x10);
  lo.lo = vorrq_u8(lo.lo, vandq_u8(vshlq_u8(h, vld1q_s8(shift[0])), mask));
  lo.hi = vorrq_u8(lo.hi, vandq_u8(vshlq_u8(h, vld1q_s8(shift[1])), mask));
  hi.lo = vorrq_u8(hi.lo, vandq_u8(vshlq_u8(h, vld1q_s8(shift[2])), mask));
  hi.hi = vorrq_u8(hi.hi, vandq_u8(vshlq_u8(h, vld1q_s8(shift[3])), mask));
}
SUGAM_INLINE void add_bit_pairs(Bytes& lo, Bytes& hi, const uint8_t* pairs) {  // as on AVX2
  const uint8x16_t h = vld1q_u8(pairs), mask = vdupq_n_u8(0x30);
  lo.lo = vorrq_u8(lo.lo, vandq_u8(vshlq_n_u8(h, 4), mask));
  lo.hi = vorrq_u8(lo.hi, vandq_u8(vshlq_n_u8(h, 2), mask));
  hi.lo = vorrq_u8(hi.lo, vandq_u8(h, mask));
  hi.hi = vorrq_u8(hi.hi, vandq_u8(vshrq_n_u8(h, 2), mask));
}
SUGAM_INLINE Bytes flip_sign_bit(Bytes b) {
  const uint8x16_t m = vdupq_n_u8(0x80);
  return {veorq_u8(b.lo, m), veorq_u8(b.hi, m)};
}
SUGAM_INLINE int32x4_t dot4(int32x4_t acc, int8x16_t w, int8x16_t a) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, w, a);
#else
  const int16x8_t p0 = vmull_s8(vget_low_s8(w), vget_low_s8(a)), p1 = vmull_high_s8(w, a);
  return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)));
#endif
}
// codes < 128 are the same bytes signed: one signed dot product serves both
SUGAM_INLINE I32 dot_signed(I32 acc, Bytes w, Bytes a) {
  return {dot4(acc.lo, vreinterpretq_s8_u8(w.lo), vreinterpretq_s8_u8(a.lo)),
          dot4(acc.hi, vreinterpretq_s8_u8(w.hi), vreinterpretq_s8_u8(a.hi))};
}
SUGAM_INLINE I32 dot(I32 acc, Bytes codes, Bytes acts) { return dot_signed(acc, codes, acts); }
SUGAM_INLINE I32 dot_scaled2(I32 acc, Bytes codes, Bytes acts, int16_t lo, int16_t hi) {
  const I32 d = dot_signed(I32{vdupq_n_s32(0), vdupq_n_s32(0)}, codes, acts);
  return {vmlaq_n_s32(acc.lo, d.lo, lo), vmlaq_n_s32(acc.hi, d.hi, hi)};
}
SUGAM_INLINE I32 dot_scaled(I32 acc, Bytes codes, Bytes acts, int16_t scale) { return dot_scaled2(acc, codes, acts, scale, scale); }
struct ScaleSet { int16x8_t v; };
SUGAM_INLINE ScaleSet load_scales(const uint8_t* p) { return {vreinterpretq_s16_u16(vmovl_u8(vld1_u8(p)))}; }
SUGAM_INLINE ScaleSet load_scales(const int8_t* p) { return {vmovl_s8(vld1_s8(p))}; }
template <int LO, int HI>
SUGAM_INLINE I32 dot_scales(I32 acc, Bytes codes, Bytes acts, ScaleSet s) {
  return dot_scaled2(acc, codes, acts, vgetq_lane_s16(s.v, LO), vgetq_lane_s16(s.v, HI));
}

SUGAM_INLINE I32 zero_i32() { return {vdupq_n_s32(0), vdupq_n_s32(0)}; }
SUGAM_INLINE I32 load_i32(const int32_t* p) { return {vld1q_s32(p), vld1q_s32(p + 4)}; }
SUGAM_INLINE F32 to_f32(I32 a) { return {vcvtq_f32_s32(a.lo), vcvtq_f32_s32(a.hi)}; }
SUGAM_INLINE int32_t reduce_add(I32 a) { return vaddvq_s32(vaddq_s32(a.lo, a.hi)); }
SUGAM_INLINE I32 round_store_i8(F32 v, int8_t* q) {
  const int32x4_t lo = vcvtnq_s32_f32(v.lo), hi = vcvtnq_s32_f32(v.hi);
  vst1_s8(q, vqmovn_s16(vcombine_s16(vqmovn_s32(lo), vqmovn_s32(hi))));
  return {lo, hi};
}

SUGAM_INLINE F32 zero_f32() { return {vdupq_n_f32(0), vdupq_n_f32(0)}; }
SUGAM_INLINE F32 set1(float x) { return {vdupq_n_f32(x), vdupq_n_f32(x)}; }
SUGAM_INLINE F32 load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
SUGAM_INLINE F32 load(const bf16* p) {
  const uint16x8_t b = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(b, 16))};
}
SUGAM_INLINE F32 load_halfs(const uint8_t* p) {
  const float16x8_t h = vreinterpretq_f16_u8(vld1q_u8(p));
  return {vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
}
// the first n (< 8) values, zeros after; nothing past them is read
SUGAM_INLINE F32 load_partial(const float* p, int64_t n) {
  float tmp[8] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return {vld1q_f32(tmp), vld1q_f32(tmp + 4)};
}
SUGAM_INLINE I32 load_partial(const int32_t* p, int64_t n) {
  int32_t tmp[8] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return {vld1q_s32(tmp), vld1q_s32(tmp + 4)};
}
SUGAM_INLINE F32 load_halfs_partial(const uint8_t* p, int64_t n) {
  uint8_t tmp[16] = {};
  std::memcpy(tmp, p, 2 * n);
  return load_halfs(tmp);
}
SUGAM_INLINE F32 load_u8(const uint8_t* p) {
  const uint16x8_t w = vmovl_u8(vld1_u8(p));
  return {vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), vcvtq_f32_u32(vmovl_high_u16(w))};
}
SUGAM_INLINE F32 load_i8(const int8_t* p) {
  const int16x8_t w = vmovl_s8(vld1_s8(p));
  return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), vcvtq_f32_s32(vmovl_high_s16(w))};
}
SUGAM_INLINE void store(float* p, F32 v) {
  vst1q_f32(p, v.lo);
  vst1q_f32(p + 4, v.hi);
}
SUGAM_INLINE uint16x4_t bf16_round(float32x4_t v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t bias = vaddq_u32(vdupq_n_u32(0x7FFF), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(u, bias), 16);
  r = vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7FC0));
  return vmovn_u32(r);
}
SUGAM_INLINE void store(bf16* p, F32 v) { vst1q_u16(reinterpret_cast<uint16_t*>(p), vcombine_u16(bf16_round(v.lo), bf16_round(v.hi))); }
SUGAM_INLINE F32 add(F32 a, F32 b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
SUGAM_INLINE F32 sub(F32 a, F32 b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
SUGAM_INLINE F32 mul(F32 a, F32 b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
SUGAM_INLINE F32 div(F32 a, F32 b) { return {vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)}; }
SUGAM_INLINE F32 fma(F32 a, F32 b, F32 c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
SUGAM_INLINE F32 max(F32 a, F32 b) { return {vmaxq_f32(a.lo, b.lo), vmaxq_f32(a.hi, b.hi)}; }
SUGAM_INLINE F32 min(F32 a, F32 b) { return {vminq_f32(a.lo, b.lo), vminq_f32(a.hi, b.hi)}; }
SUGAM_INLINE F32 abs(F32 a) { return {vabsq_f32(a.lo), vabsq_f32(a.hi)}; }
SUGAM_INLINE F32 round_even(F32 a) { return {vrndnq_f32(a.lo), vrndnq_f32(a.hi)}; }
SUGAM_INLINE F32 times_pow2(F32 a, F32 n) {
  auto scale = [](float32x4_t e) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(e), vdupq_n_s32(127)), 23));
  };
  return {vmulq_f32(a.lo, scale(n.lo)), vmulq_f32(a.hi, scale(n.hi))};
}
SUGAM_INLINE float reduce_add(F32 a) {  // paired as the other backends pair the lanes
  const float32x4_t s = vaddq_f32(a.lo, a.hi), t = vaddq_f32(s, vextq_f32(s, s, 2));
  return vgetq_lane_f32(t, 0) + vgetq_lane_f32(t, 1);
}
SUGAM_INLINE float reduce_max(F32 a) { return vmaxvq_f32(vmaxq_f32(a.lo, a.hi)); }
SUGAM_INLINE F32 reduce_add8(const F32* v) {  // lane i: v[i]'s lanes added as on the other backends
  auto four = [v](int k) {  // vectors k..k+3
    const float32x4_t lo = vpaddq_f32(vpaddq_f32(v[k].lo, v[k + 1].lo), vpaddq_f32(v[k + 2].lo, v[k + 3].lo));
    const float32x4_t hi = vpaddq_f32(vpaddq_f32(v[k].hi, v[k + 1].hi), vpaddq_f32(v[k + 2].hi, v[k + 3].hi));
    return vaddq_f32(lo, hi);
  };
  return {four(0), four(4)};
}
SUGAM_INLINE void prefetch(const void* p) { __builtin_prefetch(p); }

#else  // scalar: the reference

struct Bytes { uint8_t v[32]; };
struct I32 { int32_t v[8]; };
struct F32 { float v[8]; };

inline Bytes load_bytes(const void* p) { Bytes b; std::memcpy(b.v, p, 32); return b; }
inline void store_bytes(void* p, Bytes b) { std::memcpy(p, b.v, 32); }
inline Bytes low_nibbles(const uint8_t* p) { Bytes b; for (int i = 0; i < 32; ++i) b.v[i] = p[i] & 0x0F; return b; }
inline Bytes high_nibbles(const uint8_t* p) { Bytes b; for (int i = 0; i < 32; ++i) b.v[i] = p[i] >> 4; return b; }
inline void add_bit4(Bytes& lo, Bytes& hi, const uint8_t* bits) {  // value 8p + i: bit p of byte i
  for (int i = 0; i < 32; ++i) {
    lo.v[i] = static_cast<uint8_t>(lo.v[i] | (((bits[i % 8] >> (i / 8)) & 1) << 4));
    hi.v[i] = static_cast<uint8_t>(hi.v[i] | (((bits[i % 8] >> (i / 8 + 4)) & 1) << 4));
  }
}
inline void add_bit_pairs(Bytes& lo, Bytes& hi, const uint8_t* pairs) {  // value 16p + i: pair p of byte i
  for (int i = 0; i < 32; ++i) {
    lo.v[i] = static_cast<uint8_t>(lo.v[i] | (((pairs[i % 16] >> (2 * (i / 16))) & 3) << 4));
    hi.v[i] = static_cast<uint8_t>(hi.v[i] | (((pairs[i % 16] >> (2 * (i / 16) + 4)) & 3) << 4));
  }
}
inline Bytes flip_sign_bit(Bytes b) { for (auto& x : b.v) x ^= 0x80; return b; }
inline I32 dot(I32 acc, Bytes codes, Bytes acts) {
  for (int i = 0; i < 32; ++i) acc.v[i / 4] += static_cast<int32_t>(codes.v[i]) * static_cast<int8_t>(acts.v[i]);
  return acc;
}
inline I32 dot_signed(I32 acc, Bytes w, Bytes acts) {
  for (int i = 0; i < 32; ++i) acc.v[i / 4] += static_cast<int8_t>(w.v[i]) * static_cast<int8_t>(acts.v[i]);
  return acc;
}
inline I32 dot_scaled2(I32 acc, Bytes codes, Bytes acts, int16_t lo, int16_t hi) {
  const I32 d = dot(I32{}, codes, acts);
  for (int l = 0; l < 8; ++l) acc.v[l] += (l < 4 ? lo : hi) * d.v[l];
  return acc;
}
inline I32 dot_scaled(I32 acc, Bytes codes, Bytes acts, int16_t scale) { return dot_scaled2(acc, codes, acts, scale, scale); }
struct ScaleSet { int16_t v[8]; };
inline ScaleSet load_scales(const uint8_t* p) { ScaleSet s; for (int i = 0; i < 8; ++i) s.v[i] = p[i]; return s; }
inline ScaleSet load_scales(const int8_t* p) { ScaleSet s; for (int i = 0; i < 8; ++i) s.v[i] = p[i]; return s; }
template <int LO, int HI>
inline I32 dot_scales(I32 acc, Bytes codes, Bytes acts, ScaleSet s) { return dot_scaled2(acc, codes, acts, s.v[LO], s.v[HI]); }
inline I32 zero_i32() { return I32{}; }
inline I32 load_i32(const int32_t* p) { I32 a; std::memcpy(a.v, p, 32); return a; }
inline F32 to_f32(I32 a) { F32 f; for (int i = 0; i < 8; ++i) f.v[i] = static_cast<float>(a.v[i]); return f; }
inline int32_t reduce_add(I32 a) { int32_t s = 0; for (int32_t x : a.v) s += x; return s; }
inline I32 round_store_i8(F32 v, int8_t* q) {
  I32 r;
  for (int i = 0; i < 8; ++i) {
    r.v[i] = static_cast<int32_t>(std::nearbyint(v.v[i]));
    q[i] = static_cast<int8_t>(r.v[i] < -128 ? -128 : r.v[i] > 127 ? 127 : r.v[i]);
  }
  return r;
}
inline F32 zero_f32() { return F32{}; }
inline F32 set1(float x) { F32 f; for (auto& v : f.v) v = x; return f; }
template <typename T>
inline F32 load(const T* p) { F32 f; for (int i = 0; i < 8; ++i) f.v[i] = load1(p + i); return f; }
inline F32 load_halfs(const uint8_t* p) {
  F32 f;
  for (int i = 0; i < 8; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    f.v[i] = half_to_float_soft(h);
  }
  return f;
}
inline F32 load_u8(const uint8_t* p) { F32 f; for (int i = 0; i < 8; ++i) f.v[i] = p[i]; return f; }
inline F32 load_partial(const float* p, int64_t n) { F32 f{}; for (int64_t i = 0; i < n; ++i) f.v[i] = p[i]; return f; }
inline I32 load_partial(const int32_t* p, int64_t n) { I32 a{}; for (int64_t i = 0; i < n; ++i) a.v[i] = p[i]; return a; }
inline F32 load_halfs_partial(const uint8_t* p, int64_t n) {
  uint8_t tmp[16] = {};
  std::memcpy(tmp, p, 2 * n);
  return load_halfs(tmp);
}
inline F32 load_i8(const int8_t* p) { F32 f; for (int i = 0; i < 8; ++i) f.v[i] = p[i]; return f; }
template <typename T>
inline void store(T* p, F32 v) { for (int i = 0; i < 8; ++i) store1(p + i, v.v[i]); }
#define SUGAM_LANEWISE(name, expr) \
  inline F32 name(F32 a, F32 b) { F32 r; for (int i = 0; i < 8; ++i) { const float x = a.v[i], y = b.v[i]; r.v[i] = (expr); } return r; }
SUGAM_LANEWISE(add, x + y)
SUGAM_LANEWISE(sub, x - y)
SUGAM_LANEWISE(mul, x * y)
SUGAM_LANEWISE(div, x / y)
SUGAM_LANEWISE(max, x > y ? x : y)
SUGAM_LANEWISE(min, x < y ? x : y)
SUGAM_LANEWISE(times_pow2, std::ldexp(x, static_cast<int>(y)))
#undef SUGAM_LANEWISE
inline F32 fma(F32 a, F32 b, F32 c) { F32 r; for (int i = 0; i < 8; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r; }
inline F32 abs(F32 a) { for (auto& v : a.v) v = std::fabs(v); return a; }
inline F32 round_even(F32 a) { for (auto& v : a.v) v = std::nearbyint(v); return a; }
// the lanes summed pairwise, as the vector backends' reductions pair them (same result for sums of
// exact products; close otherwise)
inline float reduce_add(F32 a) {
  const float s0 = a.v[0] + a.v[4], s1 = a.v[1] + a.v[5], s2 = a.v[2] + a.v[6], s3 = a.v[3] + a.v[7];
  return (s0 + s2) + (s1 + s3);
}
inline float reduce_max(F32 a) { float m = a.v[0]; for (float v : a.v) m = v > m ? v : m; return m; }
// lane i = the sum of v[i]'s lanes, in the vector backends' order
inline F32 reduce_add8(const F32* v) {
  F32 r;
  for (int i = 0; i < 8; ++i) {
    const float* x = v[i].v;
    r.v[i] = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
  }
  return r;
}
inline void prefetch(const void*) {}

#endif

inline float half_to_float(uint16_t h) {
#if SUGAM_VEC_AVX2
  return _cvtsh_ss(h);
#elif SUGAM_VEC_NEON
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
#else
  return half_to_float_soft(h);
#endif
}
inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

}  // namespace SUGAM_CORE_NS
}  // namespace sugam
