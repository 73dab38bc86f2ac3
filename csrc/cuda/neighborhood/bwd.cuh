// Neighborhood attention backward on CUDA: the prefill backward kernels (cuda/prefill/bwd.cuh)
// with the neighbourhood as the main kernel's mask policy (mask.cuh): a key block's CTA
// visits only the query blocks whose queries may see its keys.
#pragma once

#include "cuda/neighborhood/launch.h"
#include "cuda/neighborhood/mask.cuh"
#include "cuda/prefill/bwd.cuh"

namespace attnkit::cuda::neighborhood {

template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& bp, const Neighborhood& nb, cudaStream_t stream) {
  prefill::launch_bwd_with<Element, kHeadDim, NeighborhoodBwdMask>(bp, nb, stream, "neighborhood_bwd launch");
}

}  // namespace attnkit::cuda::neighborhood
