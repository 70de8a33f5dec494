// sugam's portable CPU kernels: the GGUF block products, their exact dequantization, decode attention
// over the paged KV cache and the small per-token layers, written once in vec.h's 256-bit vectors
// and compiled for AVX2, NEON or plain C++ (the scalar reference). Plain C++ on raw pointers, no
// PyTorch: ops.cpp binds them to torch ops, tests/native_harness.cpp runs them alone (under
// qemu-aarch64 for ARM) and compares every backend with the scalar one, bit for bit.
//
// The weights are in sugam's packed GGUF row layout (gguf_matmul.cpp says it in full): per row the
// codes (Q8_0: one byte each, code + 128; others: 64 values in 32 bytes, value j in the low nibble of
// byte j and value 32 + j in its high one), then the bit planes above the nibbles (Q5_x: bit 4; Q6_K:
// bits 4 and 5; 8 bytes a plane per 64 values), then the scales. So the low nibbles of a 32-byte
// load are one block of 32 values and the high nibbles the next: exactly one 256-bit vector each.
//
// Products: activations are quantized to int8 once per call, per 32 values (scale max|x| / 127,
// all types alike); a weight block's codes times them are integer dot products; a block's sum is
// scaled by (weight scale x activation scale) in fp32, and the types' offsets (-8, -16, mins, -32)
// enter once per row through the activations' integer block sums. Batches decode each tile of
// weight rows to bytes once and reuse it for every activation row (tiled int8 GEMM).
#pragma once

#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace sugam {
namespace SUGAM_CORE_NS {

// GGML type ids (gguf.GGMLQuantizationType)
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Layout {
  int64_t code_bytes, high_bytes, scale_bytes;
  int64_t row_bytes() const { return code_bytes + high_bytes + scale_bytes; }
};

inline bool known_type(int64_t qtype) {
  switch (qtype) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: case Q4_K: case Q5_K: case Q6_K: return true;
  }
  return false;
}

inline Layout layout_of(int64_t qtype, int64_t k) {
  switch (qtype) {
    case Q8_0: return {k, 0, k / 32 * 2};
    case Q4_0: return {k / 2, 0, k / 32 * 2};
    case Q5_0: return {k / 2, k / 8, k / 32 * 2};
    case Q4_1: return {k / 2, 0, k / 32 * 4};
    case Q5_1: return {k / 2, k / 8, k / 32 * 4};
    case Q4_K: return {k / 2, 0, k / 256 * 4 + k / 32 * 2};
    case Q5_K: return {k / 2, k / 8, k / 256 * 4 + k / 32 * 2};
    case Q6_K: return {k / 2, k / 4, k / 256 * 2 + k / 16};
  }
  throw std::invalid_argument("sugam gguf kernels: unsupported GGML type");
}

inline int64_t block_values(int64_t qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K ? 256 : 64; }

inline int planes_of(int64_t qtype) {
  switch (qtype) {
    case Q8_0: return -1;
    case Q5_0: case Q5_1: case Q5_K: return 1;
    case Q6_K: return 2;
    default: return 0;
  }
}

// ---- activations ----

// One activation row quantized per 32 values: codes, the block scales (also once per 16 values, for
// Q6_K's groups) and the code sums of each 16 and each 32 values.
struct Acts {
  const int8_t* q;
  const float* scale;
  const float* scale16;
  const int32_t* sum16;
  const int32_t* sum32;
};

template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* q, float* scale, float* scale16, int32_t* sum16, int32_t* sum32) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const F32 v0 = load(x + 32 * b), v1 = load(x + 32 * b + 8), v2 = load(x + 32 * b + 16), v3 = load(x + 32 * b + 24);
    const float d = reduce_max(max(max(abs(v0), abs(v1)), max(abs(v2), abs(v3)))) / 127.0f;
    const F32 inv = set1(d > 0 ? 1.0f / d : 0.0f);
    int8_t* qb = q + 32 * b;
    const int32_t s0 = reduce_add(round_store_i8(mul(v0, inv), qb)) + reduce_add(round_store_i8(mul(v1, inv), qb + 8));
    const int32_t s1 = reduce_add(round_store_i8(mul(v2, inv), qb + 16)) + reduce_add(round_store_i8(mul(v3, inv), qb + 24));
    scale[b] = scale16[2 * b] = scale16[2 * b + 1] = d;
    sum16[2 * b] = s0;
    sum16[2 * b + 1] = s1;
    sum32[b] = s0 + s1;
  }
}

// Storage of `rows` quantized activation rows of k values (k % 64 == 0).
struct ActsBuffer {
  int64_t k;
  int8_t* q;
  float *scale, *scale16;
  int32_t *sum16, *sum32;
  static int64_t bytes(int64_t rows, int64_t k) { return rows * (k + 4 * (k / 32 + k / 16 + k / 16 + k / 32)); }
  ActsBuffer(void* memory, int64_t rows, int64_t k_) : k(k_) {
    q = static_cast<int8_t*>(memory);
    scale = reinterpret_cast<float*>(q + rows * k);
    scale16 = scale + rows * (k / 32);
    sum16 = reinterpret_cast<int32_t*>(scale16 + rows * (k / 16));
    sum32 = sum16 + rows * (k / 16);
  }
  template <typename T>
  void quantize(int64_t r, const T* x) const {
    quantize_row(x, k, q + r * k, scale + r * (k / 32), scale16 + r * (k / 16), sum16 + r * (k / 16), sum32 + r * (k / 32));
  }
  Acts row(int64_t r) const {
    return {q + r * k, scale + r * (k / 32), scale16 + r * (k / 16), sum16 + r * (k / 16), sum32 + r * (k / 32)};
  }
};

// ---- one weight row . one activation row ----

// A row's weight w = dw[g] * code + ow[g] per group g of 32 values (Q6_K: of 16): its scales and
// offsets decoded from the scales region s. Returns the number of groups.
inline int64_t weight_scales(int64_t qtype, const uint8_t* s, int64_t k, float* dw, float* ow) {
  const int64_t blocks = k / 32;
  switch (qtype) {
    case Q8_0: case Q4_0: case Q5_0: case Q4_1: case Q5_1: {
      const bool has_min = qtype == Q4_1 || qtype == Q5_1;
      // Q8_0's codes are read signed (no offset); Q4_0 / Q5_0 are codes - 8 / - 16; Q4_1 / Q5_1 add m
      const float fixed = qtype == Q8_0 ? 0.0f : qtype == Q4_0 ? -8.0f : -16.0f;
      int64_t b = 0;
      for (; b + 8 <= blocks; b += 8) {
        const F32 d = load_halfs(s + 2 * b);
        store(dw + b, d);
        store(ow + b, has_min ? load_halfs(s + 2 * blocks + 2 * b) : mul(d, set1(fixed)));
      }
      for (; b < blocks; ++b) {
        dw[b] = half_at(s + 2 * b);
        ow[b] = has_min ? half_at(s + 2 * blocks + 2 * b) : dw[b] * fixed;
      }
      return blocks;
    }
    case Q4_K: case Q5_K: {  // d [supers], dmin [supers], 6-bit sc [k/32], 6-bit m [k/32]
      const int64_t supers = k / 256;
      const uint8_t* sc = s + 4 * supers;
      for (int64_t b = 0; b < supers; ++b) {
        store(dw + 8 * b, mul(set1(half_at(s + 2 * b)), load_u8(sc + 8 * b)));
        store(ow + 8 * b, mul(set1(-half_at(s + 2 * supers + 2 * b)), load_u8(sc + blocks + 8 * b)));
      }
      return blocks;
    }
    default: {  // Q6_K: d [supers], int8 sc [k/16]; codes - 32
      const int64_t supers = k / 256;
      const int8_t* sc = reinterpret_cast<const int8_t*>(s + 2 * supers);
      for (int64_t g = 0; g < k / 16; g += 8) {
        const F32 d = mul(set1(half_at(s + 2 * (g / 16))), load_i8(sc + g));
        store(dw + g, d);
        store(ow + g, mul(d, set1(-32.0f)));
      }
      return k / 16;
    }
  }
}

// ds = dw x the activations' scales; returns the offset term sum_g ow[g] * da[g] * sum(qa in g).
inline float combine_scales(const float* dw, const float* ow, int64_t groups, bool per16, const Acts& a, float* ds) {
  const float* da = per16 ? a.scale16 : a.scale;
  const int32_t* sums = per16 ? a.sum16 : a.sum32;
  F32 off = zero_f32();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const F32 sa = load(da + g);
    store(ds + g, mul(load(dw + g), sa));
    off = fma(mul(load(ow + g), sa), to_f32(load_i32(sums + g)), off);
  }
  float tail = 0;
  for (; g < groups; ++g) {
    ds[g] = dw[g] * da[g];
    tail += ow[g] * da[g] * static_cast<float>(sums[g]);
  }
  return reduce_add(off) + tail;
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
    if constexpr (PLANES >= 1) {
      uint32_t bits[2];
      std::memcpy(bits, high + 8 * PLANES * c, 8);
      lo = add_bits(lo, bits[0], 16);
      hi = add_bits(hi, bits[1], 16);
    }
    if constexpr (PLANES == 2) {
      uint32_t bits[2];
      std::memcpy(bits, high + 16 * c + 8, 8);
      lo = add_bits(lo, bits[0], 32);
      hi = add_bits(hi, bits[1], 32);
    }
  }
}

// sum over blocks of ds[block] * (codes . qa). PLANES as chunk_codes (-1: bytes, as Q8_0 rows and
// decoded rows hold them); SIGNED: the bytes are code + 128 (Q8_0); PAIRS: a scale per 16 values.
template <int PLANES, bool SIGNED, bool PAIRS>
SUGAM_INLINE float blocks_dot(const uint8_t* codes, const uint8_t* high, const float* ds, const int8_t* qa, int64_t k,
                              SpreadPrefetch* pf) {
  F32 acc0 = zero_f32(), acc1 = zero_f32();
  for (int64_t c = 0; c < k / 64; ++c) {
    if (pf) pf->step();
    Bytes lo, hi;
    chunk_codes<PLANES>(codes, high, c, lo, hi);
    const Bytes a0 = load_bytes(qa + 64 * c), a1 = load_bytes(qa + 64 * c + 32);
    I32 d0, d1;
    if constexpr (SIGNED) {
      d0 = dot_signed(zero_i32(), flip_sign_bit(lo), a0);
      d1 = dot_signed(zero_i32(), flip_sign_bit(hi), a1);
    } else {
      d0 = dot(zero_i32(), lo, a0);
      d1 = dot(zero_i32(), hi, a1);
    }
    const F32 s0 = PAIRS ? set_halves(ds[4 * c], ds[4 * c + 1]) : set1(ds[2 * c]);
    const F32 s1 = PAIRS ? set_halves(ds[4 * c + 2], ds[4 * c + 3]) : set1(ds[2 * c + 1]);
    acc0 = fma(to_f32(d0), s0, acc0);
    acc1 = fma(to_f32(d1), s1, acc1);
  }
  return reduce_add(add(acc0, acc1));
}

// Four decoded weight rows against one activation row at once (the batched path): each activation
// chunk is loaded once for the four; ds[j] holds row j's scales.
template <bool SIGNED, bool PAIRS>
SUGAM_INLINE void blocks_dot4(const uint8_t* const codes[4], const float* const ds[4], const int8_t* qa, int64_t k, float out[4]) {
  F32 acc0[4] = {zero_f32(), zero_f32(), zero_f32(), zero_f32()}, acc1[4] = {zero_f32(), zero_f32(), zero_f32(), zero_f32()};
  for (int64_t c = 0; c < k / 64; ++c) {
    const Bytes a0 = load_bytes(qa + 64 * c), a1 = load_bytes(qa + 64 * c + 32);
    for (int j = 0; j < 4; ++j) {
      Bytes lo = load_bytes(codes[j] + 64 * c), hi = load_bytes(codes[j] + 64 * c + 32);
      I32 d0, d1;
      if constexpr (SIGNED) {
        d0 = dot_signed(zero_i32(), flip_sign_bit(lo), a0);
        d1 = dot_signed(zero_i32(), flip_sign_bit(hi), a1);
      } else {
        d0 = dot(zero_i32(), lo, a0);
        d1 = dot(zero_i32(), hi, a1);
      }
      const float* d = ds[j];
      const F32 s0 = PAIRS ? set_halves(d[4 * c], d[4 * c + 1]) : set1(d[2 * c]);
      const F32 s1 = PAIRS ? set_halves(d[4 * c + 2], d[4 * c + 3]) : set1(d[2 * c + 1]);
      // blocks_dot's arithmetic exactly: a row's result does not depend on the batch
      acc0[j] = fma(to_f32(d0), s0, acc0[j]);
      acc1[j] = fma(to_f32(d1), s1, acc1[j]);
    }
  }
  for (int j = 0; j < 4; ++j) out[j] = reduce_add(add(acc0[j], acc1[j]));
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

// One weight row (its packed codes, or those decoded by decode_codes when `decoded` is set) times one
// activation row, given the row's weight_scales. ds: scratch of k/16 floats.
inline float row_dot(int64_t qtype, const uint8_t* row, const uint8_t* decoded, int64_t k, const float* dw, const float* ow,
                     int64_t groups, const Acts& a, float* ds, SpreadPrefetch* pf) {
  const float offset = combine_scales(dw, ow, groups, qtype == Q6_K, a, ds);
  const uint8_t* high = row + layout_of(qtype, k).code_bytes;
  float dot;
  if (decoded != nullptr) {
    dot = qtype == Q8_0 ? blocks_dot<-1, true, false>(decoded, nullptr, ds, a.q, k, pf)
        : qtype == Q6_K ? blocks_dot<-1, false, true>(decoded, nullptr, ds, a.q, k, pf)
                        : blocks_dot<-1, false, false>(decoded, nullptr, ds, a.q, k, pf);
  } else {
    switch (qtype) {
      case Q8_0: dot = blocks_dot<-1, true, false>(row, high, ds, a.q, k, pf); break;
      case Q4_0: case Q4_1: case Q4_K: dot = blocks_dot<0, false, false>(row, high, ds, a.q, k, pf); break;
      case Q5_0: case Q5_1: case Q5_K: dot = blocks_dot<1, false, false>(row, high, ds, a.q, k, pf); break;
      default: dot = blocks_dot<2, false, true>(row, high, ds, a.q, k, pf); break;
    }
  }
  return dot + offset;
}

// Rows of weights the batched path decodes at a time: their codes stay in L2 while every activation
// row of the call passes over them.
constexpr int64_t kTileRows = 8;

// Scratch of one thread for matmul_rows: ds, and the scales and codes of a tile of rows.
inline int64_t matmul_scratch_bytes(int64_t k) { return 4 * (k / 16) * (5 + 2 * kTileRows) + kTileRows * k + 64; }

// Output rows [n0, n1) of y = x W^T + bias for `rows` quantized activation rows. out [rows, n_out].
template <typename T>
void matmul_rows(const ActsBuffer& acts, int64_t rows, const uint8_t* w, int64_t row_bytes, int64_t qtype, int64_t k,
                 int64_t n0, int64_t n1, const float* bias, T* out, int64_t n_out, uint8_t* scratch) {
  const Layout L = layout_of(qtype, k);
  float* ds = reinterpret_cast<float*>(scratch);
  float* dw = ds + k / 16;                     // kTileRows x k/16
  float* ow = dw + kTileRows * (k / 16);       // kTileRows x k/16
  float* ds4 = ow + kTileRows * (k / 16);      // 4 x k/16
  uint8_t* tile = reinterpret_cast<uint8_t*>(ds4 + 4 * (k / 16));
  const int64_t ahead = prefetch_distance(row_bytes);
  if (rows == 1) {  // decode: stream each row once, codes decoded in registers
    const Acts a = acts.row(0);
    for (int64_t n = n0; n < n1; ++n) {
      SpreadPrefetch pf(w + (n + ahead) * row_bytes, n + ahead < n1 ? row_bytes : 0, k / 64);
      const uint8_t* row = w + n * row_bytes;
      const int64_t groups = weight_scales(qtype, row + L.code_bytes + L.high_bytes, k, dw, ow);
      store1(out + n, row_dot(qtype, row, nullptr, k, dw, ow, groups, a, ds, &pf) + (bias ? bias[n] : 0.0f));
    }
    return;
  }
  // batches: a tile of rows decoded once (codes and scales), then every activation row against it
  const bool decode = qtype != Q8_0;  // Q8_0 rows are bytes already
  int64_t groups = 0;
  for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
    const int64_t t1 = std::min(n1, t0 + kTileRows);
    for (int64_t n = t0; n < t1; ++n) {
      const uint8_t* row = w + n * row_bytes;
      groups = weight_scales(qtype, row + L.code_bytes + L.high_bytes, k, dw + (n - t0) * (k / 16), ow + (n - t0) * (k / 16));
      if (decode) decode_codes(qtype, row, k, tile + (n - t0) * k);
    }
    auto codes_of = [&](int64_t n) { return decode ? tile + (n - t0) * k : w + n * row_bytes; };
    for (int64_t r = 0; r < rows; ++r) {
      const Acts a = acts.row(r);
      int64_t n = t0;
      for (; n + 4 <= t1; n += 4) {  // four rows share each load of the activations
        const uint8_t* codes[4];
        const float* scales[4];
        float offset[4], dot[4];
        for (int j = 0; j < 4; ++j) {
          float* dsj = ds4 + j * (k / 16);
          offset[j] = combine_scales(dw + (n + j - t0) * (k / 16), ow + (n + j - t0) * (k / 16), groups, qtype == Q6_K, a, dsj);
          codes[j] = codes_of(n + j);
          scales[j] = dsj;
        }
        if (qtype == Q8_0) blocks_dot4<true, false>(codes, scales, a.q, k, dot);
        else if (qtype == Q6_K) blocks_dot4<false, true>(codes, scales, a.q, k, dot);
        else blocks_dot4<false, false>(codes, scales, a.q, k, dot);
        for (int j = 0; j < 4; ++j) store1(out + r * n_out + n + j, dot[j] + offset[j] + (bias ? bias[n + j] : 0.0f));
      }
      for (; n < t1; ++n) {
        const float y = row_dot(qtype, w + n * row_bytes, codes_of(n), k, dw + (n - t0) * (k / 16), ow + (n - t0) * (k / 16),
                                groups, a, ds, nullptr);
        store1(out + r * n_out + n, y + (bias ? bias[n] : 0.0f));
      }
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

// ---- decode attention over the paged KV cache ----

inline float load1(const int8_t* x) { return static_cast<float>(*x); }
inline F32 load(const int8_t* p) { return load_i8(p); }

// One (sequence, KV head) task: the query heads of the group against the sequence's cached keys and
// values, in fp32. Q: query type; C: cache element type (float, bf16, int8 with per-vector scales).
// scores: len * group floats; acc, query: group * dim floats.
template <typename Q, typename C>
void attend_one(const Q* q, const C* k_cache, const C* v_cache, const float* k_scales, const float* v_scales,
                const int64_t* table, int64_t len, Q* out, int64_t seq, int64_t kvh, int64_t heads, int64_t kv_heads,
                int64_t dim, int64_t block_size, float scale, float* scores, float* acc, float* query) {
  const int64_t group = heads / kv_heads, vecs = dim / 8;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t v = 0; v < vecs; ++v)
      store(query + g * dim + 8 * v, mul(load(q + (seq * heads + kvh * group + g) * dim + 8 * v), set1(scale)));
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = table[t / block_size] * block_size + t % block_size;
    const C* key = k_cache + (slot * kv_heads + kvh) * dim;
    const float ks = k_scales ? k_scales[slot * kv_heads + kvh] : 1.0f;
    for (int64_t g = 0; g < group; ++g) {
      F32 s = zero_f32();
      for (int64_t v = 0; v < vecs; ++v) s = fma(load(key + 8 * v), load(query + g * dim + 8 * v), s);
      scores[g * len + t] = reduce_add(s) * ks;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * len;
    const float peak = *std::max_element(row, row + len);
    float total = 0;
    for (int64_t t = 0; t < len; ++t) total += (row[t] = std::exp(row[t] - peak));
    const float inv = 1.0f / total;
    for (int64_t t = 0; t < len; ++t) row[t] *= inv;
  }
  std::fill(acc, acc + group * dim, 0.0f);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = table[t / block_size] * block_size + t % block_size;
    const C* value = v_cache + (slot * kv_heads + kvh) * dim;
    const float vs = v_scales ? v_scales[slot * kv_heads + kvh] : 1.0f;
    for (int64_t v = 0; v < vecs; ++v) {
      const F32 x = mul(load(value + 8 * v), set1(vs));
      for (int64_t g = 0; g < group; ++g)
        store(acc + g * dim + 8 * v, fma(x, set1(scores[g * len + t]), load(acc + g * dim + 8 * v)));
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t v = 0; v < vecs; ++v) store(out + (seq * heads + kvh * group + g) * dim + 8 * v, load(acc + g * dim + 8 * v));
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

}  // namespace SUGAM_CORE_NS
}  // namespace sugam
