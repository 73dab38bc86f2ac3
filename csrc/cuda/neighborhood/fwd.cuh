// Neighborhood attention forward on CUDA: the prefill forward kernel (cuda/prefill/fwd.cuh)
// with the neighbourhood as its mask policy (mask.cuh). head_dim 64 takes 64-row query
// blocks, not prefill's 128: with the mask's per-row boxes the 128-row kernel spilled
// (376 B of stack on sm_90a).
#pragma once

#include "cuda/neighborhood/launch.h"
#include "cuda/neighborhood/mask.cuh"
#include "cuda/prefill/fwd.cuh"

namespace attnkit::cuda::neighborhood {

template <typename Element, int kHeadDim>
using FwdConfig = prefill::FwdConfig<Element, kHeadDim, 64, 64, 4>;

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, const Neighborhood& nb, cudaStream_t stream) {
  prefill::launch_fwd_with<FwdConfig<Element, kHeadDim>, NeighborhoodMask>(p, nb, stream, "neighborhood_fwd launch");
}

}  // namespace attnkit::cuda::neighborhood
