// The portable kernels (core.h) as the torch ops sugam's Python calls, with the same names and
// contracts as the AVX-512 build's (gguf_matmul.cpp, layers.cpp); decode attention (attention.cpp) is
// the same source in both. One of the two builds is loaded in a process: sugam/native/__init__.py picks it by the CPU's features.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels.h"
#include "core.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace core = sugam::SUGAM_CORE_NS;

namespace {

// storage pointers of a contiguous fp32 or bf16 tensor, as the core's types
template <typename T>
T* data_as(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, core::bf16>) return reinterpret_cast<core::bf16*>(t.data_ptr<c10::BFloat16>());
  else return t.data_ptr<float>();
}

// calls f(T*) with x's storage type (fp32 or bf16)
template <typename F>
void with_storage(const at::Tensor& x, const char* op, F&& f) {
  if (x.scalar_type() == at::kBFloat16) f(data_as<core::bf16>(x));
  else if (x.scalar_type() == at::kFloat) f(data_as<float>(x));
  else TORCH_CHECK(false, "sugam ", op, ": dtype ", x.scalar_type());
}


// Scratch memory the kernels write before they read: not zero-filled (a matmul runs ~100 times a
// decoded token, each with its own activation and tile buffers).
std::unique_ptr<uint8_t[]> scratch_bytes(int64_t n) { return std::unique_ptr<uint8_t[]>(new uint8_t[n]); }

void gguf_dequantize(const at::Tensor& packed, int64_t qtype, int64_t cols, at::Tensor out) {
  sugam::check_packed(packed, qtype, cols);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(0) == packed.size(0) &&
              out.size(1) == cols && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "sugam gguf dequantize: out must be a contiguous fp32 or bf16 [", packed.size(0), ", ", cols, "] tensor");
  const int64_t row_bytes = packed.size(1);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  with_storage(out, "gguf_dequantize", [&](auto* y) {
    at::parallel_for(0, packed.size(0), 16, [&](int64_t n0, int64_t n1) {
      const auto codes = scratch_bytes(cols);
      for (int64_t n = n0; n < n1; ++n) core::dequantize_row(qtype, w + n * row_bytes, cols, codes.get(), y + n * cols);
    });
  });
}

}  // namespace

namespace sugam {

at::Tensor gguf_matmul(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype, int64_t cols,
                       const c10::optional<at::Tensor>& bias) {
  sugam::check_packed(packed, qtype, cols);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) == cols, "sugam gguf matmul: x must be [rows, ", cols, "]");
  const at::Tensor x = x_in.scalar_type() == at::kBFloat16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), n_out = packed.size(0), row_bytes = packed.size(1);
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n_out, "sugam gguf matmul: bias must have ", n_out, " values");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_p = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const auto memory = scratch_bytes(core::ActsBuffer::bytes(rows, cols));
  const core::ActsBuffer acts(memory.get(), rows, cols, core::activation_block(qtype));
  at::Tensor out = at::empty({rows, n_out}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  with_storage(x, "gguf_matmul", [&](auto* xp) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        acts.quantize(r, xp + r * cols);
    });
    using T = std::remove_pointer_t<decltype(xp)>;
    T* y = data_as<T>(out);
    at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
      const auto scratch = scratch_bytes(core::matmul_scratch_bytes(cols));
      core::matmul_rows(acts, rows, w, row_bytes, qtype, cols, n0, n1, bias_p, y, n_out, scratch.get());
    });
  });
  return x_in.scalar_type() == out.scalar_type() ? out : out.to(x_in.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t h = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.numel() == h && h % 8 == 0,
              "sugam rms_norm: contiguous x [..., h] and weight [h], h a multiple of 8");
  at::Tensor y = at::empty_like(x);
  const int64_t rows = x.numel() / h;
  with_storage(x, "rms_norm", [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    T* yp = data_as<T>(y);
    with_storage(weight, "rms_norm", [&](auto* wp) {
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) core::rms_norm_row(xp + r * h, wp, yp + r * h, h, static_cast<float>(eps));
      });
    });
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& x) {
  const int64_t inter = x.size(-1) / 2;
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 16 == 0, "sugam silu_mul: contiguous [..., 2 * inter], inter a multiple of 8");
  auto sizes = x.sizes().vec();
  sizes.back() = inter;
  at::Tensor y = at::empty(sizes, x.options());
  const int64_t rows = x.numel() / (2 * inter);
  with_storage(x, "silu_mul", [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    T* yp = data_as<T>(y);
    at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) core::silu_mul_row(xp + r * 2 * inter, yp + r * inter, inter);
    });
  });
  return y;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && x.size(2) % 16 == 0 &&
              cos.numel() == x.size(0) * x.size(2) && sin.numel() == cos.numel() && cos.scalar_type() == x.scalar_type() &&
              sin.scalar_type() == x.scalar_type(), "sugam rotary: x [tokens, heads, dim], cos/sin [tokens, dim] of x's dtype");
  at::Tensor y = at::empty_like(x);
  const int64_t heads = x.size(1), dim = x.size(2);
  with_storage(x, "rotary", [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    const T* c = data_as<T>(cos);
    const T* s = data_as<T>(sin);
    T* yp = data_as<T>(y);
    at::parallel_for(0, x.size(0) * heads, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) core::rotary_row(xp + i * dim, c + (i / heads) * dim, s + (i / heads) * dim, yp + i * dim, dim);
    });
  });
  return y;
}

}  // namespace sugam

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("gguf_matmul(Tensor x, Tensor packed, int qtype, int cols, Tensor? bias=None) -> Tensor");
  m.def("gguf_dequantize(Tensor packed, int qtype, int cols, Tensor(a!) out) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) {
  m.impl("gguf_matmul", &sugam::gguf_matmul);
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("rms_norm", &sugam::rms_norm);
  m.impl("silu_mul", &sugam::silu_mul);
  m.impl("rotary", &sugam::rotary);
}
