// sugam's packed GGUF row layout (gguf_matmul.cpp describes it), shared by the AVX-512 kernels, the
// portable ones and the test harness. Plain C++: no PyTorch.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace sugam {

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

}  // namespace sugam
