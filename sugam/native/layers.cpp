// Small per-token layers as one call each. In PyTorch ops an RMSNorm is ~8 dispatches (float, pow,
// mean, add, rsqrt, mul, to, mul) of a few microseconds each, twice a layer, the rotary embedding ~6
// and the gated activation 3: more time than the work.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernels.h"
#include "simd.h"

#include <cmath>
#include <cstdint>

namespace {

using sugam::load16;
using sugam::rounded;
using sugam::store16;

// y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), x in fp32 (what layers/rmsnorm.py computes).
template <typename T, typename W>
void rms_norm_rows(const T* x, const W* weight, T* y, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * h;
      T* yr = y + r * h;
      __m512 sq = _mm512_setzero_ps();
      for (int64_t i = 0; i < h; i += 16) {
        const __m512 v = load16(xr + i);
        sq = _mm512_fmadd_ps(v, v, sq);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(h) + eps));
      for (int64_t i = 0; i < h; i += 16)
        store16(yr + i, _mm512_mul_ps(load16(weight + i), rounded(_mm512_mul_ps(load16(xr + i), inv), yr)));
    }
  });
}

}  // namespace

namespace sugam {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t h = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.numel() == h && h % 16 == 0,
              "sugam rms_norm: contiguous x [..., h] and weight [h], h a multiple of 16");
  at::Tensor y = at::empty_like(x);
  const int64_t rows = x.numel() / h;
  const float e = static_cast<float>(eps);
  auto with_weight = [&](auto* xp, auto* yp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    if (weight.scalar_type() == at::kFloat) rms_norm_rows<T, float>(xp, weight.data_ptr<float>(), yp, rows, h, e);
    else if (weight.scalar_type() == at::kBFloat16) rms_norm_rows<T, c10::BFloat16>(xp, weight.data_ptr<c10::BFloat16>(), yp, rows, h, e);
    else TORCH_CHECK(false, "sugam rms_norm: weight dtype ", weight.scalar_type());
  };
  if (x.scalar_type() == at::kBFloat16) with_weight(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  else if (x.scalar_type() == at::kFloat) with_weight(x.data_ptr<float>(), y.data_ptr<float>());
  else TORCH_CHECK(false, "sugam rms_norm: x dtype ", x.scalar_type());
  return y;
}

}  // namespace sugam

namespace {

// e^x for the silu: Cody-Waite range reduction and a degree-6 polynomial (relative error ~1e-7,
// well inside bf16's rounding), saturating outside [-87, 88].
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// gate_up [rows, 2 * inter] -> silu(gate) * up [rows, inter], each rounded to the storage type as
// F.silu(gate) * up rounds it.
template <typename T>
void silu_mul_rows(const T* x, T* y, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = x + r * 2 * inter;
      const T* up = gate + inter;
      T* out = y + r * inter;
      for (int64_t i = 0; i < inter; i += 16) {
        const __m512 g = load16(gate + i);
        const __m512 silu = rounded(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))), out);
        store16(out + i, _mm512_mul_ps(silu, load16(up + i)));
      }
    }
  });
}

}  // namespace

namespace sugam {

at::Tensor silu_mul(const at::Tensor& x) {
  const int64_t inter = x.size(-1) / 2;
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 32 == 0, "sugam silu_mul: contiguous [..., 2 * inter], inter a multiple of 16");
  auto sizes = x.sizes().vec();
  sizes.back() = inter;
  at::Tensor y = at::empty(sizes, x.options());
  const int64_t rows = x.numel() / (2 * inter);
  if (x.scalar_type() == at::kBFloat16) silu_mul_rows(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, inter);
  else if (x.scalar_type() == at::kFloat) silu_mul_rows(x.data_ptr<float>(), y.data_ptr<float>(), rows, inter);
  else TORCH_CHECK(false, "sugam silu_mul: dtype ", x.scalar_type());
  return y;
}

}  // namespace sugam

namespace {

// Rotary embedding in the split-halves layout: x [tokens, heads, dim], cos/sin [tokens, dim] (the
// model dtype). out = x * cos + rotate_half(x) * sin, each product and the sum rounded as PyTorch's
// bf16 ops round them.
template <typename T>
void rotary_rows(const T* x, const T* cos, const T* sin, T* y, int64_t tokens, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens * heads, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads;
      const T* xr = x + i * dim;
      T* yr = y + i * dim;
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      for (int64_t j = 0; j < half; j += 16) {
        const __m512 x1 = load16(xr + j), x2 = load16(xr + half + j);
        const __m512 a1 = rounded(_mm512_mul_ps(x1, load16(c + j)), yr), b1 = rounded(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + j)), yr);
        const __m512 a2 = rounded(_mm512_mul_ps(x2, load16(c + half + j)), yr), b2 = rounded(_mm512_mul_ps(x1, load16(s + half + j)), yr);
        store16(yr + j, _mm512_add_ps(a1, b1));
        store16(yr + half + j, _mm512_add_ps(a2, b2));
      }
    }
  });
}

}  // namespace

namespace sugam {

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && x.size(2) % 32 == 0 &&
              cos.numel() == x.size(0) * x.size(2) && sin.numel() == cos.numel() && cos.scalar_type() == x.scalar_type() &&
              sin.scalar_type() == x.scalar_type(), "sugam rotary: x [tokens, heads, dim], cos/sin [tokens, dim] of x's dtype");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    rotary_rows(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), x.size(2));
  else if (x.scalar_type() == at::kFloat)
    rotary_rows(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), x.size(2));
  else TORCH_CHECK(false, "sugam rotary: dtype ", x.scalar_type());
  return y;
}

}  // namespace sugam


TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) {
  m.impl("rms_norm", &sugam::rms_norm);
  m.impl("silu_mul", &sugam::silu_mul);
  m.impl("rotary", &sugam::rotary);
}
