// Launchers of the neighborhood attention kernels, one explicit instantiation per
// (dtype, head_dim) in its own .cu.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/params.h"

namespace attnkit::cuda::neighborhood {

// q, k, v, out and lse as a prefill of p.seqlen_q = p.seqlen_k = tokens rows per sequence.
template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, const Neighborhood& nb, cudaStream_t stream);
template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& bp, const Neighborhood& nb, cudaStream_t stream);

}  // namespace attnkit::cuda::neighborhood
