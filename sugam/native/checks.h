// Argument checks of the torch ops, shared by both implementations (the AVX-512 files and
// portable/ops.cpp): a bad call is a clear error, never a read outside a tensor.
#pragma once

#include <ATen/ATen.h>

#include "gguf_layout.h"

namespace sugam {

// packed: a contiguous [rows, row_bytes] uint8 CPU tensor holding rows of `cols` values of qtype
inline void check_packed(const at::Tensor& packed, int64_t qtype, int64_t cols) {
  TORCH_CHECK(known_type(qtype), "sugam gguf kernels: unsupported GGML type ", qtype);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "sugam gguf kernels: the weight must be a contiguous 2-D uint8 CPU tensor");
  TORCH_CHECK(cols > 0 && cols % block_values(qtype) == 0 && packed.size(1) == layout_of(qtype, cols).row_bytes(),
              "sugam gguf kernels: ", packed.size(1), " bytes a row do not hold ", cols, " values of GGML type ", qtype);
}

// decode_attention's tensors: q [n, heads, dim] (dim a multiple of dim_multiple); caches [blocks,
// block_size, kv_heads, dim]; int8 caches with scales; block_tables [n, max_blocks] and
// context_lens [n] int64, every length and block id within the cache.
inline void check_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales,
                                   const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t dim_multiple) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "sugam decode_attention: bad shapes");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && dim % dim_multiple == 0 && heads % kv_heads == 0, "sugam decode_attention: head sizes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "sugam decode_attention: contiguous tensors");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == n &&
              block_tables.is_contiguous() && context_lens.scalar_type() == at::kLong && context_lens.numel() == n,
              "sugam decode_attention: block_tables [n, max_blocks] and context_lens [n] must be int64");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * block_size, "sugam decode_attention: context length out of range");
    for (int64_t b = 0; b < (lens[i] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[i * max_blocks + b] >= 0 && tables[i * max_blocks + b] < k_cache.size(0), "sugam decode_attention: block id out of range");
  }
  TORCH_CHECK(k_cache.scalar_type() != at::kChar || (k_scales.has_value() && v_scales.has_value()),
              "sugam decode_attention: int8 caches need scales");
}

}  // namespace sugam
