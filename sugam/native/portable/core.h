// sugam's portable CPU kernels: the GGUF block products, their exact dequantization, decode attention
// over the paged KV cache and the small per-token layers, written once in vec.h's 256-bit vectors
// and compiled for AVX2, NEON or plain C++ (the scalar reference). Plain C++ on raw pointers, no
// PyTorch: ops.cpp binds them to torch ops, tests/native_harness.cpp runs them alone (under
// qemu-aarch64 for ARM) and compares every backend with the scalar one, bit for bit.
//
// The weights are in sugam's packed GGUF row layout (gguf_matmul.cpp says it in full): per row the
// codes (Q8_0: one byte each, code + 128; others: 64 values in 32 bytes, value j in the low nibble of
// byte j and value 32 + j in its high one), then the bits above the nibbles (Q5_x: bit 4, 8 bytes
// per 64 values; Q6_K: bits 4 and 5 in pairs, 16 bytes per 64 values), then the scales. So the low nibbles of a 32-byte
// load are one block of 32 values and the high nibbles the next: exactly one 256-bit vector each.
//
// Products: activations are quantized to int8 once per call (scale max|x| / 127 per 32 values, or
// per 256 for the K-quants); a weight block's codes times them are integer dot products. Q4_0 to
// Q8_0: a block's sum is scaled by (weight scale x activation scale) in fp32 and the offsets (-8,
// -16, m) enter once per row through the activations' integer block sums. K-quants: the integer
// sub-scales multiply the sums in integers, one fp32 scale per 256 values (kquant_dot). Decode
// takes two weight rows at a time; batches decode each tile of weight rows to bytes once and reuse
// it for every activation row, four weight rows at a time (tiled int8 GEMM).
#pragma once

#include "../gguf_layout.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace sugam {
namespace SUGAM_CORE_NS {

inline int planes_of(int64_t qtype) {
  switch (qtype) {
    case Q8_0: return -1;
    case Q5_0: case Q5_1: case Q5_K: return 1;
    case Q6_K: return 2;
    default: return 0;
  }
}

// ---- activations ----

// One quantized activation row: codes, the scale of each 32 values and the code sums of each 16
// and each 32 values.
struct Acts {
  const int8_t* q;
  const float* scale;
  const int32_t* sum16;
  const int32_t* sum32;
};

// One activation row -> int8 codes with one scale (max|x| / 127) per `block` values (32, or 256 for
// the K-quants, whose integer sub-scales then apply to integer sums); the scale is stored per 32
// values whatever the block, with the code sums of each 16 and 32.
template <typename T>
void quantize_row(const T* x, int64_t k, int64_t block, int8_t* q, float* scale, int32_t* sum16, int32_t* sum32) {
  for (int64_t start = 0; start < k; start += block) {
    F32 amax = zero_f32();
    for (int64_t i = start; i < start + block; i += 8) amax = max(amax, abs(load(x + i)));
    const float d = reduce_max(amax) / 127.0f;
    const F32 inv = set1(d > 0 ? 1.0f / d : 0.0f);
    for (int64_t b = start / 32; b < (start + block) / 32; ++b) {
      int8_t* qb = q + 32 * b;
      const T* xb = x + 32 * b;
      const int32_t s0 = reduce_add(round_store_i8(mul(load(xb), inv), qb)) + reduce_add(round_store_i8(mul(load(xb + 8), inv), qb + 8));
      const int32_t s1 = reduce_add(round_store_i8(mul(load(xb + 16), inv), qb + 16)) + reduce_add(round_store_i8(mul(load(xb + 24), inv), qb + 24));
      scale[b] = d;
      sum16[2 * b] = s0;
      sum16[2 * b + 1] = s1;
      sum32[b] = s0 + s1;
    }
  }
}

inline bool is_kquant(int64_t qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K; }

// Activations share one int8 scale per this many values in products with the type.
inline int64_t activation_block(int64_t qtype) { return is_kquant(qtype) ? 256 : 32; }

// Storage of `rows` quantized activation rows of k values (k % 64 == 0; k % 256 == 0 for block 256).
struct ActsBuffer {
  int64_t k, block;
  int8_t* q;
  float* scale;
  int32_t *sum16, *sum32;
  static int64_t bytes(int64_t rows, int64_t k) { return rows * (k + 4 * (k / 32 + k / 16 + k / 32)); }
  ActsBuffer(void* memory, int64_t rows, int64_t k_, int64_t block_) : k(k_), block(block_) {
    q = static_cast<int8_t*>(memory);
    scale = reinterpret_cast<float*>(q + rows * k);
    sum16 = reinterpret_cast<int32_t*>(scale + rows * (k / 32));
    sum32 = sum16 + rows * (k / 16);
  }
  template <typename T>
  void quantize(int64_t r, const T* x) const {
    quantize_row(x, k, block, q + r * k, scale + r * (k / 32), sum16 + r * (k / 16), sum32 + r * (k / 32));
  }
  Acts row(int64_t r) const {
    return {q + r * k, scale + r * (k / 32), sum16 + r * (k / 16), sum32 + r * (k / 32)};
  }
};

// ---- one weight row . one activation row ----

// Calls f(b, dw, ow) for each vector of 8 blocks b.. of a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 row (the
// K-quants take kquant_dot), its weights being dw * code + ow in each block of 32, decoded from the
// scales region s; the last vector is zero past the row's blocks.
template <typename F>
SUGAM_INLINE void for_each_scales(int64_t qtype, const uint8_t* s, int64_t k, F&& f) {
  const int64_t blocks = k / 32;
  const bool has_min = qtype == Q4_1 || qtype == Q5_1;
  // Q8_0's codes are read signed (no offset); Q4_0 / Q5_0 are codes - 8 / - 16; Q4_1 / Q5_1 add m
  const F32 fixed = set1(qtype == Q8_0 ? 0.0f : qtype == Q4_0 ? -8.0f : -16.0f);
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    const F32 d = load_halfs(s + 2 * b);
    f(b, d, has_min ? load_halfs(s + 2 * blocks + 2 * b) : mul(d, fixed));
  }
  if (b < blocks) {  // the last blocks (fewer than 8, an even number) as one zero-padded vector
    const F32 d = load_halfs_partial(s + 2 * b, blocks - b);
    f(b, d, has_min ? load_halfs_partial(s + 2 * blocks + 2 * b, blocks - b) : mul(d, fixed));
  }
}

// floats of a row's per-block scale arrays: one per 32 values and room for a padded vector
inline int64_t scale_slots(int64_t k) { return k / 32 + 8; }

// The row's dw and ow as arrays of scale_slots(k) floats (the batched path decodes them once a tile).
inline void weight_scales(int64_t qtype, const uint8_t* s, int64_t k, float* dw, float* ow) {
  for_each_scales(qtype, s, k, [&](int64_t b, F32 d, F32 o) {
    store(dw + b, d);
    store(ow + b, o);
  });
}

// Scales of a weight row times one activation row's: ds[b] = dw[b] * da[b] (into scale_slots(k)
// floats) and the offset term sum_b ow[b] * da[b] * sum(qa in b).
struct ScaleProduct {
  const float* da;
  const int32_t* sums;
  int64_t blocks;
  float* ds;
  F32 off = zero_f32();
  ScaleProduct(const Acts& a, int64_t k, float* ds_) : da(a.scale), sums(a.sum32), blocks(k / 32), ds(ds_) {}
  SUGAM_INLINE void operator()(int64_t b, F32 dw, F32 ow) {
    F32 sa;
    I32 sum;
    if (b + 8 <= blocks) {
      sa = load(da + b);
      sum = load_i32(sums + b);
    } else {  // past the last block: zeros, as dw and ow are there
      sa = load_partial(da + b, blocks - b);
      sum = load_partial(sums + b, blocks - b);
    }
    store(ds + b, mul(dw, sa));
    off = fma(mul(ow, sa), to_f32(sum), off);
  }
};

// ds and the offset term from a row's decoded dw / ow (weight_scales)
inline float combine_scales(const float* dw, const float* ow, int64_t k, const Acts& a, float* ds) {
  ScaleProduct product(a, k, ds);
  for (int64_t b = 0; b < product.blocks; b += 8) product(b, load(dw + b), load(ow + b));
  return reduce_add(product.off);
}

// The same straight from the row's scales region, in one pass (decode: each row is used once)
inline float row_scales(int64_t qtype, const uint8_t* s, int64_t k, const Acts& a, float* ds) {
  ScaleProduct product(a, k, ds);
  for_each_scales(qtype, s, k, product);
  return reduce_add(product.off);
}

// Requests the next weight row a few cache lines a step while the current one computes (decode
// streams the weights; the prefetcher alone left transfer and arithmetic serialized).
struct SpreadPrefetch {
  const char* next;
  const char* end;
  int64_t lines_per_step;
  SpreadPrefetch(const uint8_t* row, int64_t bytes, int64_t steps)
      : next(reinterpret_cast<const char*>(row)), end(next + bytes),
        lines_per_step((bytes + 64 * std::max<int64_t>(steps, 1) - 1) / (64 * std::max<int64_t>(steps, 1))) {}
  SUGAM_INLINE void step() {
    for (int64_t i = 0; i < lines_per_step && next < end; ++i, next += 64) prefetch(next);
  }
};
inline int64_t prefetch_distance(int64_t row_bytes) { return std::max<int64_t>(1, 16384 / row_bytes); }

template <int PLANES>
SUGAM_INLINE void chunk_codes(const uint8_t* codes, const uint8_t* high, int64_t c, Bytes& lo, Bytes& hi) {
  if constexpr (PLANES < 0) {
    lo = load_bytes(codes + 64 * c);
    hi = load_bytes(codes + 64 * c + 32);
  } else {
    lo = low_nibbles(codes + 32 * c);
    hi = high_nibbles(codes + 32 * c);
    if constexpr (PLANES == 1) add_bit4(lo, hi, high + 8 * c);         // Q5_x: bit 4
    if constexpr (PLANES == 2) add_bit_pairs(lo, hi, high + 16 * c);  // Q6_K: bits 4-5 in pairs
  }
}

// For R weight rows j at once: out[j] = sum over blocks of ds[j][block] * (codes[j] . qa), each
// activation chunk loaded once for the R rows (more independent work in flight, fewer loads).
// PLANES as chunk_codes (-1: bytes, as Q8_0 rows and decoded rows hold them); SIGNED: the bytes are
// code + 128 (Q8_0). A row's arithmetic does not depend on R (two accumulators, summed at the end),
// so a row's result is the same in any batch.
template <int PLANES, bool SIGNED, int R>
SUGAM_INLINE void blocks_dot(const uint8_t* const codes[R], const uint8_t* const high[R], const float* const ds[R],
                             const int8_t* qa, int64_t k, SpreadPrefetch* pf, float out[R]) {
  SpreadPrefetch prefetch = pf ? *pf : SpreadPrefetch(nullptr, 0, 1);  // a local copy lives in registers
  F32 acc0[R], acc1[R];
  for (int j = 0; j < R; ++j) acc0[j] = acc1[j] = zero_f32();
  for (int64_t c = 0; c < k / 64; ++c) {
    prefetch.step();
    const Bytes a0 = load_bytes(qa + 64 * c), a1 = load_bytes(qa + 64 * c + 32);
    for (int j = 0; j < R; ++j) {
      Bytes lo, hi;
      chunk_codes<PLANES>(codes[j], high[j], c, lo, hi);
      I32 d0, d1;
      if constexpr (SIGNED) {
        d0 = dot_signed(zero_i32(), flip_sign_bit(lo), a0);
        d1 = dot_signed(zero_i32(), flip_sign_bit(hi), a1);
      } else {
        d0 = dot(zero_i32(), lo, a0);
        d1 = dot(zero_i32(), hi, a1);
      }
      acc0[j] = fma(to_f32(d0), set1(ds[j][2 * c]), acc0[j]);
      acc1[j] = fma(to_f32(d1), set1(ds[j][2 * c + 1]), acc1[j]);
    }
  }
  for (int j = 0; j < R; ++j) out[j] = reduce_add(add(acc0[j], acc1[j]));
}

// R rows of a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 matrix: packed (decoded = false) or decoded to bytes
// by decode_codes.
template <int R>
inline void rows_dot(int64_t qtype, const uint8_t* const codes[R], bool decoded, int64_t k, const float* const ds[R],
                     const int8_t* qa, SpreadPrefetch* pf, float out[R]) {
  const uint8_t* high[R];
  for (int j = 0; j < R; ++j) high[j] = decoded ? nullptr : codes[j] + layout_of(qtype, k).code_bytes;
  if (qtype == Q8_0) blocks_dot<-1, true, R>(codes, high, ds, qa, k, pf, out);
  else if (decoded) blocks_dot<-1, false, R>(codes, high, ds, qa, k, pf, out);
  else if (qtype == Q5_0 || qtype == Q5_1) blocks_dot<1, false, R>(codes, high, ds, qa, k, pf, out);
  else blocks_dot<0, false, R>(codes, high, ds, qa, k, pf, out);
}

// K-quant rows (Q4_K, Q5_K, Q6_K) times one activation row quantized per 256 values, R rows at once.
// A super-block's sub-scales (6-bit per 32, or int8 per 16) multiply the int16 pair sums of its dot
// products (dot_scaled: free on AVX2), so a super-block is one int32 vector, converted and scaled once
// per 256 values; the offsets (the mins, Q6_K's -32) are integer sums of the sub-scales times the
// activations' block sums. PLANES as chunk_codes (-1: codes decoded to bytes); scales: the rows'
// scales regions.
template <int PLANES, bool Q6, int R>
SUGAM_INLINE void kquant_dot(const uint8_t* const codes[R], const uint8_t* const high[R], const uint8_t* const scales[R],
                             const Acts& a, int64_t k, SpreadPrefetch* pf, float out[R]) {
  SpreadPrefetch prefetch = pf ? *pf : SpreadPrefetch(nullptr, 0, 1);
  const int64_t supers = k / 256;
  F32 acc[R], off[R];
  for (int j = 0; j < R; ++j) acc[j] = off[j] = zero_f32();
  for (int64_t b = 0; b < supers; ++b) {
    I32 isum[R];
    ScaleSet sets[R][2];  // Q4_K/Q5_K: the 8 sub-scales; Q6_K: the 16, in two sets
    for (int j = 0; j < R; ++j) {
      isum[j] = zero_i32();
      if constexpr (Q6) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(scales[j] + 2 * supers) + 16 * b;
        sets[j][0] = load_scales(sc);
        sets[j][1] = load_scales(sc + 8);
      } else {
        sets[j][0] = load_scales(scales[j] + 4 * supers + 8 * b);
      }
    }
    // chunk CC of the super-block: Q4_K/Q5_K sub-blocks 2CC, 2CC+1; Q6_K groups 4CC .. 4CC+3
    auto chunk = [&](auto cc_constant) {
      constexpr int CC = decltype(cc_constant)::value;
      const int64_t c = 4 * b + CC;
      prefetch.step();
      const Bytes a0 = load_bytes(a.q + 64 * c), a1 = load_bytes(a.q + 64 * c + 32);
      for (int j = 0; j < R; ++j) {
        Bytes lo, hi;
        chunk_codes<PLANES>(codes[j], high[j], c, lo, hi);
        if constexpr (Q6) {
          constexpr int G = 4 * (CC % 2);
          isum[j] = dot_scales<G, G + 1>(isum[j], lo, a0, sets[j][CC / 2]);
          isum[j] = dot_scales<G + 2, G + 3>(isum[j], hi, a1, sets[j][CC / 2]);
        } else {
          isum[j] = dot_scales<2 * CC, 2 * CC>(isum[j], lo, a0, sets[j][0]);
          isum[j] = dot_scales<2 * CC + 1, 2 * CC + 1>(isum[j], hi, a1, sets[j][0]);
        }
      }
    };
    chunk(std::integral_constant<int, 0>{});
    chunk(std::integral_constant<int, 1>{});
    chunk(std::integral_constant<int, 2>{});
    chunk(std::integral_constant<int, 3>{});
    const float da = a.scale[8 * b];
    for (int j = 0; j < R; ++j) {
      const float d = half_at(scales[j] + 2 * b) * da;
      acc[j] = fma(to_f32(isum[j]), set1(d), acc[j]);
      // the offsets in vector lanes, summed across lanes once a row (a horizontal sum per
      // super-block cost as much as a chunk's products)
      if constexpr (Q6) {  // -32 * d * sum_g sc_g * sum(qa in g); sc_g * sum is exact in fp32
        const int8_t* sc = reinterpret_cast<const int8_t*>(scales[j] + 2 * supers) + 16 * b;
        const F32 terms = fma(load_i8(sc + 8), to_f32(load_i32(a.sum16 + 16 * b + 8)),
                              mul(load_i8(sc), to_f32(load_i32(a.sum16 + 16 * b))));
        off[j] = fma(terms, set1(-32.0f * d), off[j]);
      } else {  // - dmin * da * sum_j m_j * sum(qa in j)
        const uint8_t* mins = scales[j] + 4 * supers + k / 32 + 8 * b;
        const F32 terms = mul(load_u8(mins), to_f32(load_i32(a.sum32 + 8 * b)));
        off[j] = fma(terms, set1(-half_at(scales[j] + 2 * supers + 2 * b) * da), off[j]);
      }
    }
  }
  for (int j = 0; j < R; ++j) out[j] = reduce_add(acc[j]) + reduce_add(off[j]);
}

template <int R>
inline void kquant_rows(int64_t qtype, const uint8_t* const codes[R], const uint8_t* const rows[R], bool decoded, int64_t k,
                        const Acts& a, SpreadPrefetch* pf, float out[R]) {
  const Layout L = layout_of(qtype, k);
  const uint8_t* high[R];
  const uint8_t* scales[R];
  for (int j = 0; j < R; ++j) {
    high[j] = rows[j] + L.code_bytes;
    scales[j] = rows[j] + L.code_bytes + L.high_bytes;
  }
  if (decoded) {
    if (qtype == Q6_K) kquant_dot<-1, true, R>(codes, high, scales, a, k, pf, out);
    else kquant_dot<-1, false, R>(codes, high, scales, a, k, pf, out);
  } else if (qtype == Q6_K) {
    kquant_dot<2, true, R>(codes, high, scales, a, k, pf, out);
  } else if (qtype == Q5_K) {
    kquant_dot<1, false, R>(codes, high, scales, a, k, pf, out);
  } else {
    kquant_dot<0, false, R>(codes, high, scales, a, k, pf, out);
  }
}

// The codes region of a row decoded to one byte per value (the layout of PLANES = -1).
inline void decode_codes(int64_t qtype, const uint8_t* row, int64_t k, uint8_t* out) {
  const uint8_t* high = row + layout_of(qtype, k).code_bytes;
  Bytes lo, hi;
  for (int64_t c = 0; c < k / 64; ++c) {
    switch (planes_of(qtype)) {
      case -1: chunk_codes<-1>(row, high, c, lo, hi); break;
      case 0: chunk_codes<0>(row, high, c, lo, hi); break;
      case 1: chunk_codes<1>(row, high, c, lo, hi); break;
      default: chunk_codes<2>(row, high, c, lo, hi); break;
    }
    store_bytes(out + 64 * c, lo);
    store_bytes(out + 64 * c + 32, hi);
  }
}

// Weight rows a decode step (one activation row) multiplies at once: more independent work in flight
// for the out-of-order core (single-core Q5_0 decode on a Zen 4 in AVX2, 1 / 2 / 4 rows in turns:
// medians 14.4 / 15.3 / 13.7 G multiply-adds/s; 4 rows run out of the 16 vector registers)
constexpr int kDecodeRows = 2;

// Rows of weights the batched path decodes at a time: their codes stay in L2 while every activation
// row of the call passes over them.
constexpr int64_t kTileRows = 8;

// Scratch of one thread for matmul_rows: ds for 4 rows, the scales and codes of a tile of rows.
inline int64_t matmul_scratch_bytes(int64_t k) { return 4 * scale_slots(k) * (4 + 2 * kTileRows) + kTileRows * k + 64; }

// Output rows [n0, n1) of y = x W^T + bias for `rows` quantized activation rows. out [rows, n_out].
template <typename T>
void matmul_rows(const ActsBuffer& acts, int64_t rows, const uint8_t* w, int64_t row_bytes, int64_t qtype, int64_t k,
                 int64_t n0, int64_t n1, const float* bias, T* out, int64_t n_out, uint8_t* scratch) {
  const Layout L = layout_of(qtype, k);
  const int64_t slots = scale_slots(k);
  float* ds4 = reinterpret_cast<float*>(scratch);  // the scales of up to 4 rows, slots each
  float* dw = ds4 + 4 * slots;                     // kTileRows x slots
  float* ow = dw + kTileRows * slots;              // kTileRows x slots
  uint8_t* tile = reinterpret_cast<uint8_t*>(ow + kTileRows * slots);
  const int64_t ahead = prefetch_distance(row_bytes);
  if (rows == 1) {  // decode: stream each row once, codes decoded in registers, kDecodeRows rows at a time
    const Acts a = acts.row(0);
    int64_t n = n0;
    auto run = [&](auto rows_at_once) {
      constexpr int R = decltype(rows_at_once)::value;
      SpreadPrefetch pf(w + (n + ahead) * row_bytes, n + R - 1 + ahead < n1 ? R * row_bytes : 0, k / 64);
      const uint8_t* codes[R];
      const float* scales[R];
      float offset[R] = {}, dot[R];
      for (int j = 0; j < R; ++j) codes[j] = w + (n + j) * row_bytes;
      if (is_kquant(qtype)) {
        kquant_rows<R>(qtype, codes, codes, false, k, a, &pf, dot);
      } else {
        for (int j = 0; j < R; ++j) {
          scales[j] = ds4 + j * slots;
          offset[j] = row_scales(qtype, codes[j] + L.code_bytes + L.high_bytes, k, a, ds4 + j * slots);
        }
        rows_dot<R>(qtype, codes, false, k, scales, a.q, &pf, dot);
      }
      for (int j = 0; j < R; ++j) store1(out + n + j, dot[j] + offset[j] + (bias ? bias[n + j] : 0.0f));
      n += R;
    };
    while (n + kDecodeRows <= n1) run(std::integral_constant<int, kDecodeRows>{});
    while (n < n1) run(std::integral_constant<int, 1>{});
    return;
  }
  // batches: a tile of rows decoded once (codes and scales), then every activation row against it,
  // four weight rows at a time
  const bool decode = qtype != Q8_0;  // Q8_0 rows are bytes already
  for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
    const int64_t t1 = std::min(n1, t0 + kTileRows);
    for (int64_t n = t0; n < t1; ++n) {
      const uint8_t* row = w + n * row_bytes;
      if (!is_kquant(qtype))
        weight_scales(qtype, row + L.code_bytes + L.high_bytes, k, dw + (n - t0) * slots, ow + (n - t0) * slots);
      if (decode) decode_codes(qtype, row, k, tile + (n - t0) * k);
    }
    auto codes_of = [&](int64_t n) { return decode ? tile + (n - t0) * k : w + n * row_bytes; };
    for (int64_t r = 0; r < rows; ++r) {
      const Acts a = acts.row(r);
      int64_t n = t0;
      auto run = [&](auto rows_at_once) {
        constexpr int R = decltype(rows_at_once)::value;
        const uint8_t* codes[R];
        const uint8_t* packed[R];
        const float* scales[R];
        float offset[R] = {}, dot[R];
        for (int j = 0; j < R; ++j) {
          codes[j] = codes_of(n + j);
          packed[j] = w + (n + j) * row_bytes;
        }
        if (is_kquant(qtype)) {
          kquant_rows<R>(qtype, codes, packed, true, k, a, nullptr, dot);
        } else {
          for (int j = 0; j < R; ++j) {
            offset[j] = combine_scales(dw + (n + j - t0) * slots, ow + (n + j - t0) * slots, k, a, ds4 + j * slots);
            scales[j] = ds4 + j * slots;
          }
          rows_dot<R>(qtype, codes, true, k, scales, a.q, nullptr, dot);
        }
        for (int j = 0; j < R; ++j) store1(out + r * n_out + n + j, dot[j] + offset[j] + (bias ? bias[n + j] : 0.0f));
        n += R;
      };
      while (n + 4 <= t1) run(std::integral_constant<int, 4>{});
      while (n < t1) run(std::integral_constant<int, 1>{});
    }
  }
}

// ---- exact dequantization ----

// Row n's values (scale * code + offset, one rounding, as the GGUF reference computes them).
template <typename T>
void dequantize_row(int64_t qtype, const uint8_t* row, int64_t k, uint8_t* codes, T* out) {
  const Layout L = layout_of(qtype, k);
  const uint8_t* s = row + L.code_bytes + L.high_bytes;
  decode_codes(qtype, row, k, codes);
  const int64_t blocks = k / 32;
  for (int64_t g = 0; g < k / 16; ++g) {  // scale and offset of the 16 values of group g
    const int64_t b = g / 2;
    float scale, offset;
    switch (qtype) {
      case Q8_0: case Q4_0: case Q5_0:
        scale = half_at(s + 2 * b);
        offset = scale * (qtype == Q8_0 ? -128.0f : qtype == Q4_0 ? -8.0f : -16.0f);
        break;
      case Q4_1: case Q5_1:
        scale = half_at(s + 2 * b);
        offset = half_at(s + 2 * blocks + 2 * b);
        break;
      case Q4_K: case Q5_K: {
        const int64_t supers = k / 256, sb = b / 8;
        scale = half_at(s + 2 * sb) * static_cast<float>(s[4 * supers + b]);
        offset = -half_at(s + 2 * supers + 2 * sb) * static_cast<float>(s[4 * supers + blocks + b]);
        break;
      }
      default: {  // Q6_K
        const int64_t supers = k / 256;
        scale = half_at(s + 2 * (g / 16)) * static_cast<float>(reinterpret_cast<const int8_t*>(s + 2 * supers)[g]);
        offset = -32.0f * scale;
        break;
      }
    }
    for (int64_t i = 16 * g; i < 16 * g + 16; ++i) store1(out + i, std::fma(static_cast<float>(codes[i]), scale, offset));
  }
}

// ---- small per-token layers (the rounding of PyTorch's ops in the storage type) ----

// v rounded to the storage type and back: a product is taken of the rounded value, as PyTorch's
// bf16 ops take it
SUGAM_INLINE F32 rounded(F32 v, const float*) { return v; }
SUGAM_INLINE F32 rounded(F32 v, const bf16*) {
  alignas(32) bf16 tmp[8];
  store(tmp, v);
  return load(tmp);
}

// y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)) for one row of h values (h % 8 == 0)
template <typename T, typename W>
void rms_norm_row(const T* x, const W* weight, T* y, int64_t h, float eps) {
  F32 sq = zero_f32();
  for (int64_t i = 0; i < h; i += 8) {
    const F32 v = load(x + i);
    sq = fma(v, v, sq);
  }
  const F32 inv = set1(1.0f / std::sqrt(reduce_add(sq) / static_cast<float>(h) + eps));
  for (int64_t i = 0; i < h; i += 8) store(y + i, mul(load(weight + i), rounded(mul(load(x + i), inv), y)));
}

// e^x: Cody-Waite range reduction and a degree-6 polynomial (relative error ~1e-7), saturating
// outside [-87, 88]
SUGAM_INLINE F32 exp8(F32 x) {
  x = min(max(x, set1(-87.0f)), set1(88.0f));
  const F32 n = round_even(mul(x, set1(1.44269504088896341f)));
  F32 r = fma(n, set1(-0.693359375f), x);
  r = fma(n, set1(2.12194440e-4f), r);
  F32 p = set1(1.0f / 720);
  p = fma(p, r, set1(1.0f / 120));
  p = fma(p, r, set1(1.0f / 24));
  p = fma(p, r, set1(1.0f / 6));
  p = fma(p, r, set1(0.5f));
  p = fma(p, r, set1(1.0f));
  p = fma(p, r, set1(1.0f));
  return times_pow2(p, n);
}

// silu(gate) * up for one row: gate_up [2 * inter] -> out [inter] (inter % 8 == 0)
template <typename T>
void silu_mul_row(const T* gate, T* out, int64_t inter) {
  const T* up = gate + inter;
  for (int64_t i = 0; i < inter; i += 8) {
    const F32 g = load(gate + i);
    const F32 silu = rounded(div(g, add(set1(1.0f), exp8(sub(zero_f32(), g)))), out);
    store(out + i, mul(silu, load(up + i)));
  }
}

// the rotary embedding of one head's vector (split-halves layout): x * cos + rotate_half(x) * sin
template <typename T>
void rotary_row(const T* x, const T* cos, const T* sin, T* y, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; j += 8) {
    const F32 x1 = load(x + j), x2 = load(x + half + j);
    const F32 a1 = rounded(mul(x1, load(cos + j)), y), b1 = rounded(mul(sub(zero_f32(), x2), load(sin + j)), y);
    const F32 a2 = rounded(mul(x2, load(cos + half + j)), y), b2 = rounded(mul(x1, load(sin + half + j)), y);
    store(y + j, add(a1, b1));
    store(y + half + j, add(a2, b2));
  }
}

// ---- decode attention over the paged KV cache ----
//
// A sequence's context is cut into parts of ATTENTION_PART tokens, and each (sequence, KV head,
// part) is one task: the query heads that share the KV head (GQA) against the part's keys, each key
// read once for all of them; a softmax within the part; the values weighted by it. A task leaves its
// unnormalized output, its largest score and its sum of exponentials; a merge then rescales a
// sequence's parts to their common maximum (log-sum-exp), as flash-decoding does. Long contexts so
// spread over every thread even for one sequence. The parts are fixed, not a split by thread count
// or batch, so a sequence's result never depends on what else runs (batch invariance).
//
// Keys are taken ATTENTION_TILE at a time into fp32 rows: the scores of a tile are ATTENTION_TILE
// dot products kept in vectors and reduced together (reduce_add8) instead of one by one.

inline F32 load(const int8_t* p) { return load_i8(p); }

constexpr int64_t ATTENTION_PART = 512;
constexpr int64_t ATTENTION_TILE = 8;
constexpr int64_t ATTENTION_PREFETCH = 32;  // tokens ahead

struct AttentionShape {
  int64_t heads, kv_heads, dim, block_size, max_blocks;
  float scale;
  int64_t group() const { return heads / kv_heads; }
  // a task's result: per query head of the group, dim outputs, then the maximum and the sum
  int64_t partial_floats() const { return group() * (dim + 2); }
  // a task's scratch (all KV heads at most): scores, the scaled queries, one tile of keys or values
  int64_t scratch_floats() const { return heads * (ATTENTION_PART + dim) + ATTENTION_TILE * dim; }
};

inline int64_t attention_parts(int64_t len) { return (len + ATTENTION_PART - 1) / ATTENTION_PART; }

inline float exp1(float x) {
  alignas(32) float lanes[8];
  store(lanes, exp8(set1(x)));
  return lanes[0];
}

// Tokens t0 .. t0+n-1 (n <= ATTENTION_TILE) of KV head kvh as fp32 rows of tile (an int8 row times
// its scale); the rows past n are zeros.
template <typename C>
SUGAM_INLINE void load_kv_tile(const C* cache, const float* scales, const int64_t* table, int64_t t0, int64_t n, int64_t kvh,
                               const AttentionShape& s, float* tile) {
  const int64_t dim = s.dim, block_size = s.block_size, kv_heads = s.kv_heads;  // locals: the stores may alias s
  int64_t block = t0 / block_size, offset = t0 % block_size;
  for (int64_t j = 0; j < ATTENTION_TILE; ++j, ++offset) {
    float* row = tile + j * dim;
    if (j >= n) {
      std::fill(row, row + dim, 0.0f);
      continue;
    }
    if (offset == block_size) offset = 0, ++block;
    const int64_t slot = table[block] * block_size + offset;
    const C* x = cache + (slot * kv_heads + kvh) * dim;
    if (scales) {
      const F32 scale = set1(scales[slot * kv_heads + kvh]);
      for (int64_t v = 0; v < dim; v += 8) store(row + v, mul(load(x + v), scale));
    } else {
      for (int64_t v = 0; v < dim; v += 8) store(row + v, load(x + v));
    }
  }
}

// Asks for tokens t0 .. t0+n-1 of KV heads kv0 .. kv1-1 to be brought into the cache: a part's
// blocks lie anywhere in the pool, where the hardware's prefetchers would not follow,
// so attention waited on every tile's loads.
template <typename C>
void prefetch_kv_tile(const C* cache, const int64_t* table, int64_t t0, int64_t n, int64_t kv0, int64_t kv1,
                      const AttentionShape& s) {
  int64_t block = t0 / s.block_size, offset = t0 % s.block_size;
  const int64_t bytes = (kv1 - kv0) * s.dim * static_cast<int64_t>(sizeof(C));  // heads kv0..kv1-1 are adjacent
  for (int64_t j = 0; j < n; ++j, ++offset) {
    if (offset == s.block_size) offset = 0, ++block;
    const char* row = reinterpret_cast<const char*>(cache + ((table[block] * s.block_size + offset) * s.kv_heads + kv0) * s.dim);
    for (int64_t b = 0; b < bytes; b += 64) prefetch(row + b);
  }
}

// acc[0 .. 8W) += sum over the tile's rows j of weights[j] * tile[j][c .. c + 8W), in registers
template <int W>
SUGAM_INLINE void weigh_values(const float* tile, const float* weights, int64_t dim, int64_t c, float* acc) {
  F32 a[W];
  for (int w = 0; w < W; ++w) a[w] = load(acc + 8 * w);
  for (int64_t j = 0; j < ATTENTION_TILE; ++j) {
    const F32 p = set1(weights[j]);
    for (int w = 0; w < W; ++w) a[w] = fma(load(tile + j * dim + c + 8 * w), p, a[w]);
  }
  for (int w = 0; w < W; ++w) store(acc + 8 * w, a[w]);
}

// One task: tokens [begin, end) of a sequence (block table `table`), KV heads [kv0, kv1), their query
// heads. Q: query type; C: cache element type (float, bf16, int8 with per-vector scales). A tile's
// rows of all the task's KV heads are read one after the other: with every head of a token in one
// task, each task streams whole cache lines in address order.
template <typename Q, typename C>
void attend_part(const Q* q, const C* k_cache, const C* v_cache, const float* k_scales, const float* v_scales,
                 const int64_t* table, int64_t begin, int64_t end, int64_t seq, int64_t kv0, int64_t kv1,
                 const AttentionShape& s, float* partial, float* scratch) {
  const int64_t group = s.group(), dim = s.dim, len = end - begin, heads = (kv1 - kv0) * group;
  const int64_t padded = (len + ATTENTION_TILE - 1) / ATTENTION_TILE * ATTENTION_TILE;
  float* scores = scratch;                         // [heads][ATTENTION_PART]
  float* query = scores + heads * ATTENTION_PART;  // [heads][dim], times the scale
  float* tile = query + heads * dim;               // [ATTENTION_TILE][dim]
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t v = 0; v < dim; v += 8)
      store(query + h * dim + v, mul(load(q + (seq * s.heads + kv0 * group + h) * dim + v), set1(s.scale)));

  const int64_t ahead = ATTENTION_PREFETCH;
  prefetch_kv_tile(k_cache, table, begin, std::min(ahead, len), kv0, kv1, s);
  for (int64_t t = 0; t < len; t += ATTENTION_TILE) {
    if (t + ahead < len) prefetch_kv_tile(k_cache, table, begin + t + ahead, std::min(ATTENTION_TILE, len - t - ahead), kv0, kv1, s);
    for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
      load_kv_tile(k_cache, k_scales, table, begin + t, std::min(ATTENTION_TILE, len - t), kvh, s, tile);
      for (int64_t h = (kvh - kv0) * group; h < (kvh - kv0 + 1) * group; ++h) {
        F32 dots[ATTENTION_TILE];
        for (auto& d : dots) d = zero_f32();
        for (int64_t v = 0; v < dim; v += 8) {
          const F32 qv = load(query + h * dim + v);
          for (int64_t j = 0; j < ATTENTION_TILE; ++j) dots[j] = fma(load(tile + j * dim + v), qv, dots[j]);
        }
        store(scores + h * ATTENTION_PART + t, reduce_add8(dots));
      }
    }
  }

  prefetch_kv_tile(v_cache, table, begin, std::min(ahead, len), kv0, kv1, s);
  for (int64_t h = 0; h < heads; ++h) {  // softmax within the part, unnormalized
    float* row = scores + h * ATTENTION_PART;
    std::fill(row + len, row + padded, -INFINITY);  // the padding's scores are not real
    F32 peak = load(row);
    for (int64_t t = 8; t < padded; t += 8) peak = max(peak, load(row + t));
    const float top = reduce_max(peak);
    F32 total = zero_f32();
    for (int64_t t = 0; t < padded; t += 8) {
      const F32 e = exp8(sub(load(row + t), set1(top)));
      store(row + t, e);
    }
    std::fill(row + len, row + padded, 0.0f);
    for (int64_t t = 0; t < padded; t += 8) total = add(total, load(row + t));
    float* out = partial + h / group * s.partial_floats() + h % group * (dim + 2);
    out[dim] = top;
    out[dim + 1] = reduce_add(total);
    std::fill(out, out + dim, 0.0f);
  }

  for (int64_t t = 0; t < len; t += ATTENTION_TILE) {
    if (t + ahead < len) prefetch_kv_tile(v_cache, table, begin + t + ahead, std::min(ATTENTION_TILE, len - t - ahead), kv0, kv1, s);
    for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
      load_kv_tile(v_cache, v_scales, table, begin + t, std::min(ATTENTION_TILE, len - t), kvh, s, tile);
      for (int64_t h = (kvh - kv0) * group; h < (kvh - kv0 + 1) * group; ++h) {
        const float* weights = scores + h * ATTENTION_PART + t;
        float* acc = partial + h / group * s.partial_floats() + h % group * (dim + 2);
        int64_t c = 0;
        for (; c + 64 <= dim; c += 64) weigh_values<8>(tile, weights, dim, c, acc + c);
        for (; c < dim; c += 8) weigh_values<1>(tile, weights, dim, c, acc + c);
      }
    }
  }
}

// The output of query head g of a (sequence, KV head) from its parts (part p's result at
// partials + p * stride): each part rescaled by e^(its maximum - the largest), divided by the sum.
// The scale of each part is computed once and kept in place of its maximum.
template <typename Q>
void merge_parts(float* partials, int64_t parts, int64_t stride, int64_t seq, int64_t kvh,
                 const AttentionShape& s, Q* out) {
  const int64_t group = s.group(), dim = s.dim;
  for (int64_t g = 0; g < group; ++g) {
    float* first = partials + g * (dim + 2);
    float top = first[dim];
    for (int64_t p = 1; p < parts; ++p) top = std::max(top, first[p * stride + dim]);
    float total = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      float* part = first + p * stride;
      part[dim] = exp1(part[dim] - top);
      total += part[dim + 1] * part[dim];
    }
    Q* y = out + (seq * s.heads + kvh * group + g) * dim;
    for (int64_t v = 0; v < dim; v += 8) {
      F32 sum = zero_f32();
      for (int64_t p = 0; p < parts; ++p) sum = fma(load(first + p * stride + v), set1(first[p * stride + dim]), sum);
      store(y + v, mul(sum, set1(1.0f / total)));
    }
  }
}

// q [n, heads, dim] -> out [n, heads, dim]; caches [blocks, block_size, kv_heads, dim]; int8 caches
// with scales [blocks, block_size, kv_heads]; tables [n, max_blocks]; lens [n] (each >= 1).
// parallel_for(begin, end, body) calls body(b, e) on sub-ranges covering [begin, end), on any threads.
template <typename Q, typename C, typename ParallelFor>
void decode_attention(const Q* q, const C* k_cache, const C* v_cache, const float* k_scales, const float* v_scales,
                      const int64_t* tables, const int64_t* lens, Q* out, int64_t n, const AttentionShape& s,
                      ParallelFor&& parallel_for) {
  std::vector<int64_t> first_part(n + 1, 0);  // a sequence's parts are numbered from first_part[seq]
  for (int64_t i = 0; i < n; ++i) first_part[i + 1] = first_part[i] + attention_parts(lens[i]);
  const int64_t kv = s.kv_heads, floats = s.partial_floats();
  std::vector<float> partials(first_part[n] * kv * floats);
  // A task takes one part and all KV heads (whole cache lines in order) for head size 128 or more where
  // there are parts enough to keep the threads busy, else one KV head. On the Ice Lake this measured
  // +24 % on the 1.5B's attention (head size 128) and -6 % on the 0.5B's decode at 8k (64). Either
  // way each head's arithmetic, and so its bits, are the same.
  const int64_t per_task = first_part[n] >= 8 && s.dim >= 128 ? kv : 1;
  parallel_for(int64_t{0}, first_part[n] * kv / per_task, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(s.scratch_floats());
    int64_t seq = std::upper_bound(first_part.begin(), first_part.end(), t0 * per_task / kv) - first_part.begin() - 1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t part = task * per_task / kv, kv0 = task * per_task % kv;
      while (first_part[seq + 1] <= part) ++seq;
      const int64_t begin = (part - first_part[seq]) * ATTENTION_PART, end = std::min(lens[seq], begin + ATTENTION_PART);
      attend_part(q, k_cache, v_cache, k_scales, v_scales, tables + seq * s.max_blocks, begin, end, seq, kv0,
                  kv0 + per_task, s, partials.data() + (part * kv + kv0) * floats, scratch.data());
    }
  });
  parallel_for(int64_t{0}, n * kv, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t seq = task / kv, kvh = task % kv;
      merge_parts(partials.data() + (first_part[seq] * kv + kvh) * floats, first_part[seq + 1] - first_part[seq],
                  kv * floats, seq, kvh, s, out);
    }
  });
}

}  // namespace SUGAM_CORE_NS
}  // namespace sugam
