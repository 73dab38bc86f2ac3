// Block-sparse attention backward on CUDA: the prefill backward kernels (cuda/prefill/bwd.cuh)
// with the transposed block lists as the main kernel's mask policy (mask.cuh): a key tile's
// CTA visits only the query tiles of the query blocks that list its key block, so dK and dV
// have one writer each (deterministic).
#pragma once

#include "cuda/block_sparse/launch.h"
#include "cuda/block_sparse/mask.cuh"
#include "cuda/prefill/bwd.cuh"

namespace attnkit::cuda::block_sparse {

template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& bp, const BlockSparseLayout& layout, cudaStream_t stream) {
  prefill::launch_bwd_with<Element, kHeadDim, BlockSparseBwdMask>(bp, layout, stream, "block_sparse_bwd launch");
}

}  // namespace attnkit::cuda::block_sparse
