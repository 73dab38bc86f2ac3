// Entry points of the CUDA kernels (torch-free): csrc/torch fills the params and passes
// the current stream. Each returns after launching; launch errors throw std::runtime_error.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/params.h"

namespace attnkit::cuda {

void merge_attention_states(const MergeParams& params, cudaStream_t stream);

// Prefill (flash-style, FlashAttention-2 algorithm), fp16/bf16, head_dim a multiple of 8
// up to 256 (kernels are built for 64, 96, 128 and 256; others round up and mask columns).
// q/k/v/out row and head strides must be multiples of 8 elements and pointers 16-byte
// aligned. Lengths in cu_seqlens are read on the device only (no host sync).
bool attention_supports(DType dtype, int head_dim);
void attention_fwd(const AttentionParams& params, cudaStream_t stream);
// Needs params.dq_accum and params.delta (see AttentionBwdParams).
void attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace attnkit::cuda
