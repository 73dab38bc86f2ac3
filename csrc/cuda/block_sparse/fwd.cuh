// Block-sparse attention forward on CUDA: the prefill forward kernel (cuda/prefill/fwd.cuh)
// with the block lists as its mask policy (mask.cuh), on 64 x 64 tiles.
#pragma once

#include "cuda/block_sparse/launch.h"
#include "cuda/block_sparse/mask.cuh"
#include "cuda/prefill/fwd.cuh"

namespace attnkit::cuda::block_sparse {

template <typename Element, int kHeadDim>
using FwdConfig = prefill::FwdConfig<Element, kHeadDim, kBlockSparseTile, kBlockSparseTile, 4>;

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, const BlockSparseLayout& layout, cudaStream_t stream) {
  prefill::launch_fwd_with<FwdConfig<Element, kHeadDim>, BlockSparseMask>(p, layout, stream,
                                                                          "block_sparse_fwd launch");
}

}  // namespace attnkit::cuda::block_sparse
