// LoRA updates of a projection's output, for every adapter of a step: y[rows] += (x[rows] A^T) Bt.
//
// Why: a decode step has a few rows, and each update is two products of a row with a thin matrix
// (rank 8-64). As PyTorch bf16 matmuls they cost ~45 us each in dispatch and small-GEMM setup,
// four times a layer: 4 ms a token on Qwen2.5-0.5B, a quarter of the step. Here they are two plain
// loops in fp32 (the compiler vectorizes them for the build's ISA). Many rows (prefill) take
// PyTorch's GEMMs. layers/lora.py and decoder.cpp both call this, so both paths agree exactly.
//
// Layout (layers/lora.py): A [slots, max_rank * parts, in], Bt [slots, max_rank * parts, out], the
// columns rank-major (column k * parts + p is rank k of part p), so an adapter of rank r uses the
// first r * parts of them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t KERNEL_MAX_ROWS = 16;  // above: PyTorch's GEMM (its setup cost is then repaid)
constexpr int64_t LANES = 16;
constexpr int64_t PARALLEL_MACS = 1 << 16;   // multiply-adds worth a thread of their own

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) {
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// t[j] = sum_i a[j, i] x[i] for j < width, with LANES partial sums (vectorizable without reassociation).
template <typename T>
void shrink(const T* x, const T* a, float* t, int64_t in, int64_t width) {
  // threads only where there is work for them: a fork-join costs microseconds, a rank-8 shrink less
  at::parallel_for(0, width, std::max<int64_t>(1, PARALLEL_MACS / in), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const T* row = a + j * in;
      float acc[LANES] = {};
      int64_t i = 0;
      for (; i + LANES <= in; i += LANES)
        for (int64_t l = 0; l < LANES; ++l) acc[l] += to_f32(row[i + l]) * to_f32(x[i + l]);
      float sum = 0.0f;
      for (int64_t l = 0; l < LANES; ++l) sum += acc[l];
      for (; i < in; ++i) sum += to_f32(row[i]) * to_f32(x[i]);
      t[j] = sum;
    }
  });
}

// y[o] = y[o] + sum_j t[j] bt[j, o], rounded once to y's type.
template <typename T>
void expand(const float* t, const T* bt, T* y, int64_t width, int64_t out) {
  at::parallel_for(0, out, std::max<int64_t>(256, PARALLEL_MACS / width), [&](int64_t o0, int64_t o1) {
    std::vector<float> acc(o1 - o0, 0.0f);
    for (int64_t j = 0; j < width; ++j) {
      const float tj = t[j];
      const T* row = bt + j * out + o0;
      for (int64_t o = 0; o < o1 - o0; ++o) acc[o] += tj * to_f32(row[o]);
    }
    for (int64_t o = o0; o < o1; ++o) y[o] = static_cast<T>(to_f32(y[o]) + acc[o - o0]);
  });
}

template <typename T>
void add_rows(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const std::vector<int64_t>& rows,
              int64_t width) {
  const int64_t in = x.size(1), out = y.size(1);
  std::vector<float> t(width);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* ap = reinterpret_cast<const T*>(a.data_ptr());
  const T* bp = reinterpret_cast<const T*>(bt.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  for (const int64_t r : rows) {
    shrink(xp + r * in, ap, t.data(), in, width);
    expand(t.data(), bp, yp + r * out, width, out);
  }
}

}  // namespace

namespace sugam {

void lora_add(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& bt, at::IntArrayRef slots,
              const c10::List<c10::optional<at::Tensor>>& rows, at::IntArrayRef ranks, int64_t max_rank) {
  TORCH_CHECK(slots.size() == rows.size() && slots.size() == ranks.size(), "sugam lora_add: one slot, rows and rank per adapter");
  TORCH_CHECK(y.dim() == 2 && x_in.dim() == 2 && y.size(0) == x_in.size(0) && y.is_contiguous(),
              "sugam lora_add: y [rows, out] contiguous and x [rows, in]");
  TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.size(0) == bt.size(0) && a.size(1) == bt.size(1) && a.size(2) == x_in.size(1) &&
                  bt.size(2) == y.size(1) && a.is_contiguous() && bt.is_contiguous() && max_rank > 0 && a.size(1) % max_rank == 0,
              "sugam lora_add: A [slots, width, in] and Bt [slots, width, out] that fit x and y");
  TORCH_CHECK(a.scalar_type() == y.scalar_type() && bt.scalar_type() == y.scalar_type() && x_in.scalar_type() == y.scalar_type(),
              "sugam lora_add: x, y, A and Bt share one dtype");
  const at::Tensor x = x_in.contiguous();
  const int64_t parts = a.size(1) / max_rank;
  for (size_t g = 0; g < slots.size(); ++g) {
    TORCH_CHECK(slots[g] >= 0 && slots[g] < a.size(0) && ranks[g] > 0 && ranks[g] <= max_rank, "sugam lora_add: bad slot or rank");
    const int64_t width = ranks[g] * parts;
    const at::Tensor slot_a = a.select(0, slots[g]).narrow(0, 0, width), slot_bt = bt.select(0, slots[g]).narrow(0, 0, width);
    const c10::optional<at::Tensor> which = rows.get(g);
    const int64_t n = which.has_value() ? which->numel() : x.size(0);
    const bool kernel = n <= KERNEL_MAX_ROWS && (y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kFloat);
    if (!kernel) {
      const at::Tensor xs = which.has_value() ? x.index_select(0, *which) : x;
      const at::Tensor delta = at::matmul(at::matmul(xs, slot_a.t()), slot_bt);
      if (which.has_value()) y.index_add_(0, *which, delta);
      else y.add_(delta);
      continue;
    }
    std::vector<int64_t> row_ids(n);
    if (which.has_value()) {
      const at::Tensor ids = which->to(at::kLong).contiguous();
      std::memcpy(row_ids.data(), ids.data_ptr<int64_t>(), n * sizeof(int64_t));
      for (const int64_t r : row_ids) TORCH_CHECK(r >= 0 && r < x.size(0), "sugam lora_add: row ", r, " out of range");
    } else {
      for (int64_t r = 0; r < n; ++r) row_ids[r] = r;
    }
    // slot_a / slot_bt are leading rows of a contiguous slot: contiguous themselves
    if (y.scalar_type() == at::kBFloat16) add_rows<c10::BFloat16>(y, x, slot_a, slot_bt, row_ids, width);
    else add_rows<float>(y, x, slot_a, slot_bt, row_ids, width);
  }
}

}  // namespace sugam

namespace {

void lora_add_op(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, at::IntArrayRef slots,
                 const c10::List<c10::optional<at::Tensor>>& rows, at::IntArrayRef ranks, int64_t max_rank) {
  sugam::lora_add(y, x, a, bt, slots, rows, ranks, max_rank);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("lora_add(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, int[] slots, Tensor?[] rows, int[] ranks, int max_rank) -> ()");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) { m.impl("lora_add", &lora_add_op); }
