// Every decoder layer of a decode step (one new token per sequence) in one call.
//
// Why: a layer is ~15 small operations around its four matrix products. Called one by one from
// Python, their dispatch cost ~5 ms a token on Qwen2.5-1.5B (~15 % of the step), more than the
// arithmetic they do. Here the same operations run from C++: sugam's kernels and the same ATen ops
// the Python path uses, in the same order and dtypes, so the result is identical to
// models/qwen2.py's layers (tests/test_native_kernels.py compares them bit for bit).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <vector>

namespace {

// A layer's matrices, in the order of the `matrices` / `qtypes` / `biases` lists; absent slots are
// None (q, k and v may arrive as one fused matrix, q|k and v, or three; gate and up as one or two).
enum Slot : int64_t { QKV0, QKV1, QKV2, O, GATE_UP0, GATE_UP1, DOWN, SLOTS };
// A layer's norms, in the order of the `norms` list (q_norm / k_norm: Qwen3 only, else None).
enum Norm : int64_t { INPUT, POST, Q_NORM, K_NORM, NORMS };
// A layer's LoRA slots (layers/lora.py), in the order of the `lora_a` / `lora_b` lists.
enum LoRAGroup : int64_t { LORA_QKV, LORA_O, LORA_GATE_UP, LORA_DOWN, LORA_GROUPS };

// The step's LoRA adapters: per layer and group the stacked A [slots, width, in] and Bt
// [slots, width, out] (layers/lora.py); per adapter of the step its slot, rows (None: all) and rank.
struct LoRA {
  const c10::List<c10::optional<at::Tensor>>& a;
  const c10::List<c10::optional<at::Tensor>>& bt;
  at::IntArrayRef slots;
  const c10::List<c10::optional<at::Tensor>>& rows;
  at::IntArrayRef ranks;
  int64_t max_rank;
};

// y += the adapters' updates of x (layers/lora.py LoRAProjection.forward: the same call).
at::Tensor add_lora(at::Tensor y, const at::Tensor& x, const LoRA& lora, int64_t index) {
  if (lora.slots.empty()) return y;
  const c10::optional<at::Tensor> a = lora.a.get(index), bt = lora.bt.get(index);
  TORCH_CHECK(a.has_value() && bt.has_value(), "sugam decode_layers: LoRA group ", index, " lacks its slots");
  sugam::lora_add(y, x, *a, *bt, lora.slots, lora.rows, lora.ranks, lora.max_rank);
  return y;
}

struct Shapes {
  int64_t heads, kv_heads, dim, hidden, intermediate;
  double eps, scale;
};

// x [rows, cols] times the matrices of slots [first, last) that are present, outputs side by side.
at::Tensor project(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& matrices, at::IntArrayRef qtypes,
                   const c10::List<c10::optional<at::Tensor>>& biases, int64_t base, int64_t first, int64_t last, int64_t cols) {
  std::vector<at::Tensor> parts;
  for (int64_t s = first; s < last; ++s) {
    const c10::optional<at::Tensor> m = matrices.get(base + s);
    if (m.has_value()) parts.push_back(sugam::gguf_matmul(x, *m, qtypes[base + s], cols, biases.get(base + s)));
  }
  TORCH_CHECK(!parts.empty(), "sugam decode_layers: a layer lacks the matrices of slots ", first, "-", last - 1);
  return parts.size() == 1 ? parts[0] : at::cat(parts, 1);
}

// KVCache.write (layers/attention.py): the step's keys or values into their cache slots.
void write_cache(const at::Tensor& cache, const c10::optional<at::Tensor>& scales, const at::Tensor& slots, const at::Tensor& x) {
  const int64_t kv_heads = x.size(1), dim = x.size(2);
  at::Tensor flat = cache.view({-1, kv_heads, dim});
  if (!scales.has_value()) {
    flat.index_copy_(0, slots, x.to(cache.scalar_type()));
    return;
  }
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor scale = xf.abs().amax(-1).clamp_(1e-12).div_(127);
  flat.index_copy_(0, slots, at::round(xf / scale.unsqueeze(-1)).to(at::kChar));
  scales->view({-1, kv_heads}).index_copy_(0, slots, scale);
}

at::Tensor layer(at::Tensor x, int64_t l, const at::Tensor& cos, const at::Tensor& sin,
                 const c10::List<c10::optional<at::Tensor>>& matrices, at::IntArrayRef qtypes,
                 const c10::List<c10::optional<at::Tensor>>& biases, const c10::List<c10::optional<at::Tensor>>& norms,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, const c10::optional<at::Tensor>& k_scales,
                 const c10::optional<at::Tensor>& v_scales, const at::Tensor& slots, const at::Tensor& block_tables,
                 const at::Tensor& context_lens, const Shapes& s, const LoRA& lora) {
  const int64_t tokens = x.size(0), base = l * SLOTS, groups = l * LORA_GROUPS;
  auto norm = [&](int64_t which) {
    const c10::optional<at::Tensor> w = norms.get(l * NORMS + which);
    TORCH_CHECK(w.has_value(), "sugam decode_layers: layer ", l, " lacks norm ", which);
    return *w;
  };
  // attention (models/qwen2.py Attention.forward)
  const at::Tensor normed = sugam::rms_norm(x, norm(INPUT), s.eps);
  const at::Tensor qkv = add_lora(project(normed, matrices, qtypes, biases, base, QKV0, QKV2 + 1, s.hidden), normed, lora,
                                  groups + LORA_QKV);
  TORCH_CHECK(qkv.size(1) == (s.heads + 2 * s.kv_heads) * s.dim, "sugam decode_layers: q/k/v outputs do not match the heads");
  at::Tensor qk = qkv.narrow(1, 0, (s.heads + s.kv_heads) * s.dim).view({tokens, s.heads + s.kv_heads, s.dim});
  const at::Tensor v = qkv.narrow(1, (s.heads + s.kv_heads) * s.dim, s.kv_heads * s.dim).view({tokens, s.kv_heads, s.dim});
  if (norms.get(l * NORMS + Q_NORM).has_value()) {
    qk = at::cat({sugam::rms_norm(qk.narrow(1, 0, s.heads).contiguous(), norm(Q_NORM), s.eps),
                  sugam::rms_norm(qk.narrow(1, s.heads, s.kv_heads).contiguous(), norm(K_NORM), s.eps)}, 1);
  }
  const at::Tensor rotated = sugam::rotary(qk.contiguous(), cos, sin);
  write_cache(k_cache, k_scales, slots, rotated.narrow(1, s.heads, s.kv_heads));
  write_cache(v_cache, v_scales, slots, v);
  const at::Tensor attended = sugam::decode_attention(rotated.narrow(1, 0, s.heads).contiguous(), k_cache, v_cache, k_scales,
                                                      v_scales, block_tables, context_lens, s.scale);
  const at::Tensor heads_out = attended.reshape({tokens, -1});
  x = x + add_lora(project(heads_out, matrices, qtypes, biases, base, O, O + 1, s.heads * s.dim), heads_out, lora, groups + LORA_O);
  // MLP
  const at::Tensor post = sugam::rms_norm(x, norm(POST), s.eps);
  const at::Tensor gate_up = add_lora(project(post, matrices, qtypes, biases, base, GATE_UP0, GATE_UP1 + 1, s.hidden), post, lora,
                                      groups + LORA_GATE_UP);
  const at::Tensor act = sugam::silu_mul(gate_up);
  return x + add_lora(project(act, matrices, qtypes, biases, base, DOWN, DOWN + 1, s.intermediate), act, lora, groups + LORA_DOWN);
}

}  // namespace

// x [tokens, hidden] (bf16 or fp32: the model's dtype), the embeddings of one new token per sequence -> the last layer's output.
// cos/sin [tokens, dim]; per layer SLOTS matrices (+ their GGML types and biases) and NORMS norm
// weights; per layer one key and one value cache (+ scales when int8); slots, block tables and
// context lengths as AttentionMetadata holds them for sugam's decode attention.
at::Tensor decode_layers(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                         const c10::List<c10::optional<at::Tensor>>& matrices, at::IntArrayRef qtypes,
                         const c10::List<c10::optional<at::Tensor>>& biases, const c10::List<c10::optional<at::Tensor>>& norms,
                         at::TensorList k_caches, at::TensorList v_caches, const c10::List<c10::optional<at::Tensor>>& k_scales,
                         const c10::List<c10::optional<at::Tensor>>& v_scales, const at::Tensor& slots,
                         const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t heads, int64_t kv_heads,
                         int64_t intermediate, double eps, double scale,
                         const c10::List<c10::optional<at::Tensor>>& lora_a, const c10::List<c10::optional<at::Tensor>>& lora_b,
                         at::IntArrayRef lora_slots, const c10::List<c10::optional<at::Tensor>>& lora_rows,
                         at::IntArrayRef lora_ranks, int64_t lora_max_rank) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat) && x_in.is_contiguous(),
              "sugam decode_layers: x must be contiguous bf16 or fp32 [tokens, hidden]");
  TORCH_CHECK(static_cast<int64_t>(matrices.size()) == layers * SLOTS && static_cast<int64_t>(qtypes.size()) == layers * SLOTS &&
              static_cast<int64_t>(biases.size()) == layers * SLOTS && static_cast<int64_t>(norms.size()) == layers * NORMS &&
              static_cast<int64_t>(v_caches.size()) == layers && static_cast<int64_t>(k_scales.size()) == layers &&
              static_cast<int64_t>(v_scales.size()) == layers,
              "sugam decode_layers: per layer ", SLOTS, " matrices, types and biases, ", NORMS, " norms and one cache of each kind");
  TORCH_CHECK(layers > 0 && heads > 0 && kv_heads > 0 && k_caches[0].dim() == 4, "sugam decode_layers: bad head counts or caches");
  const Shapes s{heads, kv_heads, k_caches[0].size(3), x_in.size(1), intermediate, eps, scale};
  TORCH_CHECK(lora_slots.empty() || (static_cast<int64_t>(lora_a.size()) == layers * LORA_GROUPS &&
                                     static_cast<int64_t>(lora_b.size()) == layers * LORA_GROUPS &&
                                     lora_rows.size() == lora_slots.size() && lora_ranks.size() == lora_slots.size()),
              "sugam decode_layers: per layer ", LORA_GROUPS, " LoRA groups, and rows for each slot");
  const LoRA lora{lora_a, lora_b, lora_slots, lora_rows, lora_ranks, lora_max_rank};
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l)
    x = layer(x, l, cos, sin, matrices, qtypes, biases, norms, k_caches[l], v_caches[l], k_scales.get(l), v_scales.get(l),
              slots, block_tables, context_lens, s, lora);
  return x;
}

TORCH_LIBRARY_FRAGMENT(sugam_cpu, m) {
  m.def("decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor?[] matrices, int[] qtypes, Tensor?[] biases, "
        "Tensor?[] norms, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor?[] k_scales, Tensor?[] v_scales, "
        "Tensor slots, Tensor block_tables, Tensor context_lens, int heads, int kv_heads, int intermediate, "
        "float eps, float scale, Tensor?[] lora_a, Tensor?[] lora_b, int[] lora_slots, Tensor?[] lora_rows, int[] lora_ranks, int lora_max_rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(sugam_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }
