// The entry points of sugam's CPU kernels, for the translation units that compose them
// (decoder.cpp runs a whole decode step's layers with these). Each is also a torch op, registered
// where it is defined; the contracts are written there.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

namespace sugam {

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, int64_t cols,
                       const c10::optional<at::Tensor>& bias);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void lora_add(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, at::IntArrayRef slots,
              const c10::List<c10::optional<at::Tensor>>& rows, at::IntArrayRef ranks, int64_t max_rank);

}  // namespace sugam
