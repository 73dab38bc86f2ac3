// Entry points of the CPU block-sparse attention kernels (forward, backward) and of the
// transpose of block lists. Torch-free apart from at::parallel_for; csrc/torch/block_sparse.cpp
// fills the params.
#pragma once

#include "attnkit/block_sparse.h"
#include "attnkit/params.h"

namespace attnkit::cpu {

// layout.kv_blocks only.
void block_sparse_fwd(const AttentionParams& params, const BlockSparseLayout& layout);
// layout.kv_blocks (dQ) and layout.q_blocks (dK, dV).
void block_sparse_bwd(const AttentionBwdParams& params, const BlockSparseLayout& layout);
// out_indices / out_counts shaped like in.indices / in.counts, contiguous: each list in
// canonical form (canonical_row of attnkit/block_sparse.h).
void block_lists_canonical(const BlockLists& in, int batch, int32_t* out_indices, int32_t* out_counts);
// out_indices (batch, heads, in.col_blocks, in.row_blocks) and out_counts (batch, heads,
// in.col_blocks), contiguous: the transpose rule of attnkit/block_sparse.h.
void block_lists_transpose(const BlockLists& in, int batch, int32_t* out_indices, int32_t* out_counts);

}  // namespace attnkit::cpu
