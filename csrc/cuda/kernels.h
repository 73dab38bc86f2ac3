// Entry points of the CUDA kernels (torch-free): csrc/torch fills the params and passes
// the current stream. Each returns after launching; launch errors throw std::runtime_error.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/params.h"

namespace attnkit::cuda {

void merge_attention_states(const MergeParams& params, cudaStream_t stream);

}  // namespace attnkit::cuda
