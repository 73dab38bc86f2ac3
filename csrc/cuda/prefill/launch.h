// Launchers of the prefill kernels, one explicit instantiation per (dtype, head_dim) in
// its own .cu so that builds run in parallel and rebuild only what changed.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/params.h"

namespace attnkit::cuda::prefill {

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace attnkit::cuda::prefill
