// Small per-token layers as one call each. In PyTorch ops an RMSNorm is ~8 dispatches (float, pow,
// mean, add, rsqrt, mul, to, mul) of a few microseconds each, twice a layer: more than the work.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}
inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(c10::BFloat16* y, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v)); }
// Round to the storage type and back, so that a product is taken of the rounded value, as PyTorch
// does when it multiplies two bf16 tensors.
inline __m512 rounded(__m512 v, const float*) { return v; }
inline __m512 rounded(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) { m.impl("rms_norm", &rms_norm); }
