// Launchers of the block-sparse attention kernels, one explicit instantiation per
// (dtype, head_dim) in its own .cu.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/block_sparse.h"
#include "attnkit/params.h"

namespace attnkit::cuda::block_sparse {

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, const BlockSparseLayout& layout, cudaStream_t stream);
template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& bp, const BlockSparseLayout& layout, cudaStream_t stream);

}  // namespace attnkit::cuda::block_sparse
