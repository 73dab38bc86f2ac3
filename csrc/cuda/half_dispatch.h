// The (dtype, head_dim) dispatch of the ops whose kernels are built for fp16 / bf16 and
// head_dim 64 and 128 (neighborhood and block-sparse attention): a head_dim that is a
// multiple of 8 up to 128 runs on the next built size, whose extra columns the kernels mask.
#pragma once

#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "attnkit/dtype.h"

namespace attnkit::cuda {

// The built head_dim that holds head_dim, or 0 if none does.
inline int padded_head_dim_64_128(int head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return 0;  // 16-byte vectors of fp16 / bf16
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 0;
}

inline bool supports_half_64_128(DType dtype, int head_dim) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && padded_head_dim_64_128(head_dim) != 0;
}

// Calls launch.template operator()<Element, padded head_dim>(); `op` names the op in the error.
template <typename Launch>
void dispatch_half_64_128(DType dtype, int head_dim, const char* op, Launch&& launch) {
  if (!supports_half_64_128(dtype, head_dim))
    throw std::invalid_argument(std::string(op) + " on CUDA: unsupported dtype or head_dim " +
                                std::to_string(head_dim));
  const bool half = dtype == DType::kFloat16;
  if (padded_head_dim_64_128(head_dim) == 64) {
    if (half) launch.template operator()<cutlass::half_t, 64>();
    else launch.template operator()<cutlass::bfloat16_t, 64>();
  } else {
    if (half) launch.template operator()<cutlass::half_t, 128>();
    else launch.template operator()<cutlass::bfloat16_t, 128>();
  }
}

}  // namespace attnkit::cuda
