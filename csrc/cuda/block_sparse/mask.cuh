// Block-sparse attention as mask policies of the prefill kernels (cuda/prefill/fwd.cuh,
// bwd.cuh). Kernel tiles are 64 x 64 and block sizes multiples of 64, so a query tile lies in
// one query block and a key tile in one key block. The forward CTA of a query tile walks the
// key tiles of its block's list (attnkit/block_sparse.h: BlockListWalk, ascending, within the
// causal span of its rows), then its columns gathered 64 to a tile (ColumnChunks); the
// backward CTA of a key tile walks, per q head, the query tiles of its block's and its
// tile's transposed lists. Tiles the causal rule (or the end of a sequence) cuts are masked
// element by element with AttentionMask, as dense prefill's; a key tile holding columns is
// masked to its columns (listed_keys).
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

// Sets the logits of a gathered tile (key c of the tile is keys[c], c < count) that the
// rows' mask hides, and of its padding columns, to -inf; indexed as prefill::apply_mask.
template <typename Acc, typename Coords>
__device__ __forceinline__ void mask_gathered_keys(Acc& acc, const Coords& coords, const AttentionMask& mask, int m0,
                                                   const int32_t* keys, int count) {
  Tensor s = make_tensor(acc.data(), prefill::rowcol(acc.layout()));
  Tensor c = make_tensor(coords.data(), prefill::rowcol(coords.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const KeyRange visible = mask.keys_of(m0 + get<0>(c(r, 0)));
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      const int col = get<1>(c(r, j));  // a key index load per element: L1 hits after the first row
      if (col >= count || !visible.contains(keys[col])) s(r, j) = -INFINITY;
    }
  }
}

// Forward policy: the key tiles query tile [m0, m0 + kBlockM) of (b, h) visits: those of its
// block's list, ascending, then its columns within the rows' causal span, gathered 64 to a
// tile (tile index key_tiles() + c for gathered tile c: its rows are loaded one by one). The
// state is kept small: it lives in registers across the mainloop.
template <int kBlockM, int kBlockN>
struct BlockSparseMask {
  static_assert(kBlockM == kBlockSparseTile && kBlockN == kBlockSparseTile,
                "a kernel tile must lie inside one block of the lists");
  using Args = BlockSparseLayout;
  AttentionMask mask;
  BlockListWalk blocks;
  ColumnChunks columns;
  int m0;

  __device__ BlockSparseMask(const AttentionParams& p, const Args& layout, const Sequence& seq, int b, int h, int m0_)
      : mask(seq.len_q, seq.len_k, p.causal, -1, -1),
        blocks(key_tile_walk(layout, mask, b, h, m0_, min(seq.len_q, m0_ + kBlockM))),
        columns(column_chunks(layout, mask, b, h, m0_, min(seq.len_q, m0_ + kBlockM))),
        m0(m0_) {}

  // Tiles of the sequence's keys: tile indices past them are gathered tiles.
  __device__ int key_tiles() const { return (mask.seqlen_k + kBlockN - 1) / kBlockN; }

  // The walk only moves forward; asking next(n) again for the same n gives the same tile.
  __device__ int from(int t) {
    if (t < key_tiles()) {
      if (const int n = blocks.from(t); n >= 0) return n;
      t = key_tiles();
    }
    return t - key_tiles() < columns.tiles() ? t : -1;
  }
  __device__ int first() { return from(0); }
  __device__ int next(int n) { return from(n + 1); }
  __device__ bool valid(int n) const { return n >= 0; }
  __device__ const int32_t* gathered_keys(int n) const {
    return n >= key_tiles() ? columns.tile(n - key_tiles()) : nullptr;
  }
  __device__ int gathered_count(int n) const { return columns.tile_size(n - key_tiles()); }
  __device__ bool needs_mask(int n) const {
    return n >= key_tiles() || !mask.block_fully_visible(m0, m0 + kBlockM, n * kBlockN, (n + 1) * kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int n) const {
    if (n >= key_tiles())
      mask_gathered_keys(acc, coords, mask, m0, gathered_keys(n), gathered_count(n));
    else
      prefill::apply_mask(acc, coords, mask, m0, n * kBlockN);
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
  MergedWalk walk;

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
