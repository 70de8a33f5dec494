// Matrix products that read GGUF-quantized weights at their own size (x86-64, AVX-512 VNNI).
//
// Why: decode is bound by the bytes read per token. PyTorch's CPU kernels read int8 (8 bits a
// weight) or their int4 layout (5 bits with bf16 scale and offset); a Q5_0 matrix as int8 costs 1.45x
// the file's bytes. These kernels read as many bytes as the file holds.
//
// The weights are the GGUF file's codes and scales, rearranged at load time (sugam/quant/gguf_pack.py)
// so that a row decodes with a few vector instructions per 64 values. Row layout for K
// values (K % 64 == 0), in this order:
//   codes   Q8_0: K bytes (code + 128); others: K/2 bytes, chunk c of 64 values in 32 bytes, byte j
//           holding value 64c+j in its low nibble and 64c+32+j in its high one
//   high    Q5_0/Q5_1/Q5_K: K/8 bytes, bit 4 of each code; Q6_K: K/4 bytes, bits 4 and 5; others:
//           none. Two arrangements of the same bits (sugam/quant/gguf_pack.py), each for the builds
//           that decode it with the fewest instructions:
//           "planes" (this AVX-512 build): one bit plane per bit, 8 little-endian bytes a chunk
//           each (Q6_K: the bit-4 plane, then the bit-5 plane), one masked add per plane;
//           "shifts" (the portable builds, portable/core.h): Q5_x 8 bytes a chunk, bit p of byte
//           i that of value 64c+8p+i; Q6_K 16 bytes a chunk, byte i holding bits 4-5 of values
//           64c+i, +16, +32, +48 in its bit pairs 0-1, 2-3, 4-5, 6-7: one shift per 8 or 16
//           values, where AVX2 spends a shuffle and a compare on each bit plane
//   scales  Q8_0/Q4_0/Q5_0: fp16 d [K/32]; Q4_1/Q5_1: fp16 d [K/32], fp16 m [K/32];
//           Q4_K/Q5_K: fp16 d [K/256], fp16 dmin [K/256], u8 sc [K/32], u8 m [K/32];
//           Q6_K: fp16 d [K/256], i8 sc [K/16]
// Every value is scale * code + offset with an exact product, as the GGUF reference computes it.
//
// Products (the scheme llama.cpp's CPU backend also uses): each activation row is quantized to int8
// in blocks of 32 (one fp32 scale each), each weight row is decoded into unsigned 8-bit codes with a
// scale and an offset per 16 values, and the products are int8 dot products (vpdpbusd, 64
// multiply-adds an instruction) scaled in fp32:
//     sum_i w_i x_i ~= sum_g scale_g da_g sum_{i in g} code_i qa_i + sum_g offset_g da_g sum_{i in g} qa_i
// A decoded row stays in L1 and serves every activation row of the call. This path serves Q4_1/Q5_1;
// the other types take faster ones with integer offsets or sub-scales: gguf_block32.cpp (Q4_0, Q5_0,
// Q8_0) and gguf_kquant.cpp (Q4_K, Q5_K, Q6_K).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "checks.h"
#include "gguf_layout.h"
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Q4_K / Q5_K / Q6_K products into out [rows, n_out] of x's dtype (gguf_kquant.cpp; a translation unit of
// its own, see there). x is contiguous fp32 or bf16; bias (fp32) may be null.
void kquant_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, const float* bias, at::Tensor& out);
// Q4_0 / Q5_0 / Q8_0 likewise (gguf_block32.cpp: the fixed offset as an integer term).
void block32_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, const float* bias, at::Tensor& out);

namespace {

using sugam::block_values;
using sugam::Layout;
using sugam::layout_of;
using sugam::Q4_0, sugam::Q4_1, sugam::Q5_0, sugam::Q5_1, sugam::Q8_0, sugam::Q4_K, sugam::Q5_K, sugam::Q6_K;

inline float fp16(const uint8_t* p) { return sugam::fp16_at(p); }

inline __mmask16 first_n(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// 16 floats, each written twice: dst[0..2n) for the first n of them (one 32-value block = two groups).
inline void store_twice(float* dst, __m512 v, int64_t n) {
  const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  _mm512_mask_storeu_ps(dst, first_n(2 * n), _mm512_permutexvar_ps(lo, v));
  if (n > 8) _mm512_mask_storeu_ps(dst + 16, first_n(2 * n - 16), _mm512_permutexvar_ps(hi, v));
}

// Scale and offset of each group of 16 values of a row.
void decode_scales(const uint8_t* s, int64_t qtype, int64_t k, float* scale, float* offset) {
  switch (qtype) {
    case Q8_0:
    case Q4_0:
    case Q5_0:
    case Q4_1:
    case Q5_1: {
      const int64_t blocks = k / 32;
      const bool has_min = qtype == Q4_1 || qtype == Q5_1;
      const __m512 c = _mm512_set1_ps(qtype == Q8_0 ? -128.0f : qtype == Q4_0 ? -8.0f : -16.0f);
      for (int64_t b = 0; b < blocks; b += 16) {
        const __mmask16 m = first_n(blocks - b);
        __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + 2 * b));
        __m512 o = has_min ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + 2 * blocks + 2 * b)) : _mm512_mul_ps(d, c);
        store_twice(scale + 2 * b, d, blocks - b);
        store_twice(offset + 2 * b, o, blocks - b);
      }
      break;
    }
    case Q4_K:
    case Q5_K: {
      const int64_t supers = k / 256;
      const uint8_t* sc = s + 4 * supers;
      const uint8_t* mn = sc + k / 32;
      for (int64_t b = 0; b < supers; ++b) {
        const float d = fp16(s + 2 * b), dmin = fp16(s + 2 * supers + 2 * b);
        __m256 scale8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 8 * b)))), _mm256_set1_ps(d));
        __m256 min8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + 8 * b)))), _mm256_set1_ps(-dmin));
        store_twice(scale + 16 * b, _mm512_castps256_ps512(scale8), 8);
        store_twice(offset + 16 * b, _mm512_castps256_ps512(min8), 8);
      }
      break;
    }
    case Q6_K: {
      const int64_t supers = k / 256;
      const int8_t* sc = reinterpret_cast<const int8_t*>(s + 2 * supers);
      for (int64_t b = 0; b < supers; ++b) {
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * b)))),
                                 _mm512_set1_ps(fp16(s + 2 * b)));
        _mm512_storeu_ps(scale + 16 * b, v);
        _mm512_storeu_ps(offset + 16 * b, _mm512_mul_ps(v, _mm512_set1_ps(-32.0f)));
      }
      break;
    }
  }
}

using sugam::chunk_codes;

int planes_of(int64_t qtype) {
  switch (qtype) {
    case Q8_0: return -1;
    case Q5_0: case Q5_1: case Q5_K: return 1;
    case Q6_K: return 2;
    default: return 0;
  }
}

// One row -> codes[k] (unsigned 8-bit) and scale/offset per 16 values. Returns the codes' address
// (Q8_0 rows are used in place).
const uint8_t* decode_row(const uint8_t* row, int64_t qtype, int64_t k, uint8_t* codes, float* scale, float* offset) {
  const Layout L = layout_of(qtype, k);
  decode_scales(row + L.code_bytes + L.high_bytes, qtype, k, scale, offset);
  const uint8_t* high = row + L.code_bytes;
  switch (planes_of(qtype)) {
    case -1: return row;
    case 0: for (int64_t c = 0; c < k / 64; ++c) _mm512_storeu_si512(codes + 64 * c, chunk_codes<0>(row, high, c)); break;
    case 1: for (int64_t c = 0; c < k / 64; ++c) _mm512_storeu_si512(codes + 64 * c, chunk_codes<1>(row, high, c)); break;
    case 2: for (int64_t c = 0; c < k / 64; ++c) _mm512_storeu_si512(codes + 64 * c, chunk_codes<2>(row, high, c)); break;
  }
  return codes;
}

using sugam::load16;

// Activation row -> int8 codes, the scale of each lane (each 32-block's scale on its 8 lanes)
// and, per 16 values, scale * sum of codes (for the offset term).
template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* q, float* lane_scale, float* scaled_sum16) {
  for (int64_t b = 0; b < k / 32; ++b) {
    __m512 v0 = load16(x + 32 * b), v1 = load16(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    const __m512i q0 = sugam::quantize16(v0, inv, q + 32 * b), q1 = sugam::quantize16(v1, inv, q + 32 * b + 16);
    _mm256_storeu_ps(lane_scale + 8 * b, _mm256_set1_ps(d));
    scaled_sum16[2 * b] = d * static_cast<float>(_mm512_reduce_add_epi32(q0));
    scaled_sum16[2 * b + 1] = d * static_cast<float>(_mm512_reduce_add_epi32(q1));
  }
}

// One weight row . one quantized activation row. Decode passes the packed row and its codes are
// decoded in registers (nothing written or read back); batches pass a row decode_row decoded once
// (8-bit codes, PLANES = -1) and reuse it for every activation row, with the same arithmetic.
// scale16/offset16 come from decode_scales.
template <int PLANES>
float packed_row_dot(const uint8_t* row, const uint8_t* high, const float* scale16, const float* offset16,
                     const int8_t* qa, const float* a_lanes, const float* a_sum16, int64_t k,
                     sugam::SpreadPrefetch& prefetch) {
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int64_t chunks = k / 64;
  auto step = [&](int64_t c, __m512 acc) {
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), chunk_codes<PLANES>(row, high, c), _mm512_loadu_si512(qa + 64 * c));
    __m512 w = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(scale16 + 4 * c)));
    return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(a_lanes + 16 * c)), w, acc);
  };
  int64_t c = 0;
  for (; c + 1 < chunks; c += 2) {  // two chains: the fma latency is 4 cycles
    prefetch.step();
    acc0 = step(c, acc0);
    acc1 = step(c + 1, acc1);
  }
  if (c < chunks) acc0 = step(c, acc0);
  const int64_t groups = k / 16;
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 m = first_n(groups - g);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, offset16 + g), _mm512_maskz_loadu_ps(m, a_sum16 + g), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// Decode of a Q4_1 / Q5_1 row (the types this path serves, see gguf_matmul).
float packed_row_dot(const uint8_t* row, int64_t qtype, int64_t k, float* scale16, float* offset16,
                     const int8_t* qa, const float* a_lanes, const float* a_sum16, sugam::SpreadPrefetch& prefetch) {
  const Layout L = layout_of(qtype, k);
  decode_scales(row + L.code_bytes + L.high_bytes, qtype, k, scale16, offset16);
  const uint8_t* high = row + L.code_bytes;
  return qtype == Q5_1 ? packed_row_dot<1>(row, high, scale16, offset16, qa, a_lanes, a_sum16, k, prefetch)
                       : packed_row_dot<0>(row, high, scale16, offset16, qa, a_lanes, a_sum16, k, prefetch);
}


using sugam::prefetch_distance;
using sugam::prefetch_row;

// Per-thread work space for decoded rows.
struct RowBuffers {
  std::vector<uint8_t> codes;
  std::vector<float> scale, offset;
  explicit RowBuffers(int64_t k) : codes(k), scale(k / 16 + 32), offset(k / 16 + 32) {}
};

}  // namespace

namespace sugam {

// x [rows, cols] (fp32 or bf16) @ W^T + bias -> [rows, out] in x's dtype. bf16 is read and written
// in place (no conversion ops around the call: a decode step makes ~100 of these calls).
at::Tensor gguf_matmul(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype, int64_t cols,
                       const c10::optional<at::Tensor>& bias) {
  check_packed(packed, qtype, cols);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) == cols, "sugam gguf matmul: x must be [rows, ", cols, "]");
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = bf16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), n_out = packed.size(0), row_bytes = packed.size(1);
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n_out, "sugam gguf matmul: bias must have ", n_out, " values");
    bias_f = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat).contiguous();
  }
  const float* bias_p = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({rows, n_out}, x.options());
  auto in_x_dtype = [&] { return x_in.scalar_type() == out.scalar_type() ? out : out.to(x_in.scalar_type()); };
  if (qtype == Q4_0 || qtype == Q5_0 || qtype == Q8_0) {
    block32_matmul(x, packed, qtype, bias_p, out);
    return in_x_dtype();
  }
  if (qtype == Q4_K || qtype == Q5_K || qtype == Q6_K) {
    kquant_matmul(x, packed, qtype, bias_p, out);
    return in_x_dtype();
  }
  // Q4_1 / Q5_1: scale and float offset per 16 values
  at::Tensor qa = at::empty({rows, cols}, x.options().dtype(at::kChar));
  at::Tensor a_lanes = at::empty({rows, cols / 4}, x.options().dtype(at::kFloat));
  at::Tensor a_sum16 = at::empty({rows, cols / 16}, x.options().dtype(at::kFloat));
  int8_t* qa_p = qa.data_ptr<int8_t>();
  float* al_p = a_lanes.data_ptr<float>();
  float* as_p = a_sum16.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {  // cheap next to the weights: one thread
    if (bf16)
      quantize_row(x.data_ptr<c10::BFloat16>() + r * cols, cols, qa_p + r * cols, al_p + r * (cols / 4), as_p + r * (cols / 16));
    else
      quantize_row(x.data_ptr<float>() + r * cols, cols, qa_p + r * cols, al_p + r * (cols / 4), as_p + r * (cols / 16));
  }
  float* out_f = bf16 ? nullptr : out.data_ptr<float>();
  c10::BFloat16* out_b = bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  const uint8_t* w_p = packed.data_ptr<uint8_t>();
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    RowBuffers buf(cols);
    const int64_t ahead = prefetch_distance(row_bytes);
    for (int64_t n = n0; n < n0 + ahead && n < n1; ++n) prefetch_row(w_p + n * row_bytes, row_bytes);
    sugam::SpreadPrefetch none(w_p, 0, 1);
    for (int64_t n = n0; n < n1; ++n) {
      const float b = bias_p ? bias_p[n] : 0.0f;
      if (rows == 1) {  // decode: one pass over the row, codes decoded in registers; row n + ahead arrives meanwhile
        sugam::SpreadPrefetch prefetch(w_p + (n + ahead) * row_bytes, n + ahead < n1 ? row_bytes : 0, cols / 128);
        const float y = b + packed_row_dot(w_p + n * row_bytes, qtype, cols, buf.scale.data(), buf.offset.data(), qa_p, al_p, as_p, prefetch);
        if (bf16) out_b[n] = c10::BFloat16(y); else out_f[n] = y;
        continue;
      }
      if (n + ahead < n1) prefetch_row(w_p + (n + ahead) * row_bytes, row_bytes);
      const uint8_t* codes = decode_row(w_p + n * row_bytes, qtype, cols, buf.codes.data(), buf.scale.data(), buf.offset.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float y = b + packed_row_dot<-1>(codes, nullptr, buf.scale.data(), buf.offset.data(), qa_p + r * cols,
                                               al_p + r * (cols / 4), as_p + r * (cols / 16), cols, none);
        if (bf16)
          out_b[r * n_out + n] = c10::BFloat16(y);  // round to nearest even, as .to(bfloat16)
        else
          out_f[r * n_out + n] = y;
      }
    }
  });
  return in_x_dtype();
}

}  // namespace sugam

namespace {

// out [rows, cols] (fp32 or bf16) = the weight's values, exactly as the GGUF reference computes them.
void gguf_dequantize(const at::Tensor& packed, int64_t qtype, int64_t cols, at::Tensor out) {
  sugam::check_packed(packed, qtype, cols);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(0) == packed.size(0) &&
              out.size(1) == cols && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "sugam gguf dequantize: out must be a contiguous fp32 or bf16 [", packed.size(0), ", ", cols, "] tensor");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  const int64_t row_bytes = packed.size(1);
  const uint8_t* w_p = packed.data_ptr<uint8_t>();
  char* out_p = static_cast<char*>(out.data_ptr());
  const int64_t out_row_bytes = cols * (bf16 ? 2 : 4);
  at::parallel_for(0, packed.size(0), 16, [&](int64_t n0, int64_t n1) {
    RowBuffers buf(cols);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* codes = decode_row(w_p + n * row_bytes, qtype, cols, buf.codes.data(), buf.scale.data(), buf.offset.data());
      char* dst = out_p + n * out_row_bytes;
      for (int64_t g = 0; g < cols / 16; ++g) {
        __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * g))));
        // the product is exact, so the fused multiply-add rounds once, as the reference does
        __m512 v = _mm512_fmadd_ps(c, _mm512_set1_ps(buf.scale[g]), _mm512_set1_ps(buf.offset[g]));
        if (bf16)
          sugam::store16(reinterpret_cast<c10::BFloat16*>(dst) + 16 * g, v);
        else
          sugam::store16(reinterpret_cast<float*>(dst) + 16 * g, v);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("gguf_matmul(Tensor x, Tensor packed, int qtype, int cols, Tensor? bias=None) -> Tensor");
  m.def("gguf_dequantize(Tensor packed, int qtype, int cols, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) {
  m.impl("gguf_matmul", &sugam::gguf_matmul);
  m.impl("gguf_dequantize", &gguf_dequantize);
}
