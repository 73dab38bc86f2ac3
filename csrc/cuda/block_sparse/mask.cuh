// Block-sparse attention as mask policies of the prefill kernels (cuda/prefill/fwd.cuh,
// bwd.cuh). Kernel tiles are 64 x 64 and block sizes multiples of 64, so a query tile lies in
// one query block and a key tile in one key block. The forward CTA of a query tile walks the
// key tiles of its block's list (attnkit/block_sparse.h: BlockListWalk, ascending, within
// the causal span of its rows); the backward CTA of a key tile walks, per q head, the query
// tiles of its block's transposed list. Tiles the causal rule (or the end of a sequence)
// cuts are masked element by element with AttentionMask, as dense prefill's.
#pragma once

#include "attnkit/block_sparse.h"
#include "cuda/prefill/common.cuh"

namespace attnkit::cuda::block_sparse {

using namespace cute;

// Forward policy: the key tiles query tile [m0, m0 + kBlockM) of (b, h) visits.
template <int kBlockM, int kBlockN>
struct BlockSparseMask {
  static_assert(kBlockM == kBlockSparseTile && kBlockN == kBlockSparseTile,
                "a kernel tile must lie inside one block of the lists");
  using Args = BlockSparseLayout;
  AttentionMask mask;
  BlockListWalk walk;
  int m0;

  __device__ BlockSparseMask(const AttentionParams& p, const Args& layout, const Sequence& seq, int b, int h, int m0_)
      : mask(seq.len_q, seq.len_k, p.causal, -1, -1),
        walk(key_tile_walk(layout, mask, b, h, m0_, min(seq.len_q, m0_ + kBlockM))),
        m0(m0_) {}

  // The walk only moves forward; asking next(n) again for the same n gives the same tile.
  __device__ int first() { return walk.from(0); }
  __device__ int next(int n) { return walk.from(n + 1); }
  __device__ bool valid(int n) const { return n >= 0; }
  __device__ bool needs_mask(int n) const {
    return !mask.block_fully_visible(m0, m0 + kBlockM, n * kBlockN, (n + 1) * kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int n) const {
    prefill::apply_mask(acc, coords, mask, m0, n * kBlockN);
  }
};

// Backward policy: the query tiles of q head h that visit key tile [n0, n0 + kBlockN) of b.
template <int kBlockM, int kBlockN>
struct BlockSparseBwdMask {
  static_assert(kBlockM == kBlockSparseTile && kBlockN == kBlockSparseTile,
                "a kernel tile must lie inside one block of the lists");
  using Args = BlockSparseLayout;
  const Args& layout;  // the kernel's __grid_constant__ parameter, read in place
  AttentionMask mask;
  int b, n0;
  BlockListWalk walk;

  __device__ BlockSparseBwdMask(const AttentionParams& p, const Args& layout_, const Sequence& seq, int b_, int n0_)
      : layout(layout_),
        mask(seq.len_q, seq.len_k, p.causal, -1, -1),
        b(b_),
        n0(n0_),
        walk(nullptr, 0, 0, 1, 0, 0) {}

  // Restarts the walk on q head h's transposed list.
  __device__ int first(int h) {
    walk = query_tile_walk(layout, mask, b, h, n0, n0 + kBlockN);
    return walk.from(0);
  }
  __device__ int next(int m) { return walk.from(m + 1); }
  __device__ bool valid(int m) const { return m >= 0; }
  __device__ bool needs_mask(int m) const {
    return !mask.block_fully_visible(m * kBlockM, (m + 1) * kBlockM, n0, n0 + kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int, int m) const {
    prefill::apply_mask(acc, coords, mask, m * kBlockM, n0);
  }
};

}  // namespace attnkit::cuda::block_sparse
