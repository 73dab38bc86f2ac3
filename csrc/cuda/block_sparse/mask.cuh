// Block-sparse attention as mask policies of the prefill kernels (cuda/prefill/fwd.cuh,
// bwd.cuh). Kernel tiles are 64 x 64 and block sizes multiples of 64, so a query tile lies in
// one query block and a key tile in one key block. The forward CTA of a query tile walks the
// key tiles of its block's list and of its columns (attnkit/block_sparse.h: MergedWalk,
// ascending, within the causal span of its rows); the backward CTA of a key tile walks, per q
// head, the query tiles of its block's and its tile's transposed lists. Tiles the causal
// rule (or the end of a sequence) cuts are masked element by element with AttentionMask, as
// dense prefill's; a tile of columns is masked to its columns (listed_keys).
#pragma once

#include "attnkit/block_sparse.h"
#include "cuda/prefill/common.cuh"

namespace attnkit::cuda::block_sparse {

using namespace cute;

// Sets the logits of the keys of a tile that `keys` leaves out (bit c: key c of the tile) to
// -inf; indexed as prefill::apply_mask.
template <typename Acc, typename Coords>
__device__ __forceinline__ void mask_unlisted_keys(Acc& acc, const Coords& coords, uint64_t keys) {
  CUTE_UNROLL
  for (int e = 0; e < size(acc); ++e)
    if (!(keys >> get<1>(coords(e)) & 1u)) acc(e) = -INFINITY;
}

// Forward policy: the key tiles query tile [m0, m0 + kBlockM) of (b, h) visits: those of its
// block's list and those holding one of its columns.
template <int kBlockM, int kBlockN>
struct BlockSparseMask {
  static_assert(kBlockM == kBlockSparseTile && kBlockN == kBlockSparseTile,
                "a kernel tile must lie inside one block of the lists");
  using Args = BlockSparseLayout;
  const Args& layout;  // the kernel's __grid_constant__ parameter, read in place
  AttentionMask mask;
  MergedWalk<ColumnTileWalk> walk;
  int b, h, m0;
  int keys_tile = -1;     // the tile `keys` belongs to
  uint64_t keys = 0;      // listed_keys of keys_tile

  __device__ BlockSparseMask(const AttentionParams& p, const Args& layout_, const Sequence& seq, int b_, int h_,
                             int m0_)
      : layout(layout_),
        mask(seq.len_q, seq.len_k, p.causal, -1, -1),
        walk(sparse_key_tile_walk(layout_, mask, b_, h_, m0_, min(seq.len_q, m0_ + kBlockM))),
        b(b_),
        h(h_),
        m0(m0_) {}

  // The walk only moves forward; asking next(n) again for the same n gives the same tile.
  __device__ int first() { return walk.from(0); }
  __device__ int next(int n) { return walk.from(n + 1); }
  __device__ bool valid(int n) const { return n >= 0; }
  __device__ uint64_t keys_of(int n) {
    if (n != keys_tile) keys_tile = n, keys = listed_keys(layout, b, h, m0 / layout.block_size_q, n);
    return keys;
  }
  __device__ bool needs_mask(int n) {
    return keys_of(n) != kAllKeys || !mask.block_fully_visible(m0, m0 + kBlockM, n * kBlockN, (n + 1) * kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int n) {
    prefill::apply_mask(acc, coords, mask, m0, n * kBlockN);
    if (const uint64_t listed = keys_of(n); listed != kAllKeys) mask_unlisted_keys(acc, coords, listed);
  }
};

// Backward policy: the query tiles of q head h that visit key tile [n0, n0 + kBlockN) of b:
// those of the query blocks listing its block or holding one of its keys as a column.
template <int kBlockM, int kBlockN>
struct BlockSparseBwdMask {
  static_assert(kBlockM == kBlockSparseTile && kBlockN == kBlockSparseTile,
                "a kernel tile must lie inside one block of the lists");
  using Args = BlockSparseLayout;
  const Args& layout;  // the kernel's __grid_constant__ parameter, read in place
  AttentionMask mask;
  int b, n0;
  MergedWalk<BlockListWalk> walk;

  __device__ BlockSparseBwdMask(const AttentionParams& p, const Args& layout_, const Sequence& seq, int b_, int n0_)
      : layout(layout_),
        mask(seq.len_q, seq.len_k, p.causal, -1, -1),
        b(b_),
        n0(n0_),
        walk{empty_walk(), empty_walk()} {}

  // Restarts the walk on q head h's transposed lists.
  __device__ int first(int h) {
    walk = sparse_query_tile_walk(layout, mask, b, h, n0, n0 + kBlockN);
    return walk.from(0);
  }
  __device__ int next(int m) { return walk.from(m + 1); }
  __device__ bool valid(int m) const { return m >= 0; }
  // A tile of columns is always masked (its keys are found in apply: a binary search).
  __device__ bool needs_mask(int m) const {
    return layout.columns.indices != nullptr ||
           !mask.block_fully_visible(m * kBlockM, (m + 1) * kBlockM, n0, n0 + kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int h, int m) const {
    prefill::apply_mask(acc, coords, mask, m * kBlockM, n0);
    const uint64_t listed = listed_keys(layout, b, h, m * kBlockM / layout.block_size_q, n0 / kBlockN);
    if (listed != kAllKeys) mask_unlisted_keys(acc, coords, listed);
  }
};

}  // namespace attnkit::cuda::block_sparse
