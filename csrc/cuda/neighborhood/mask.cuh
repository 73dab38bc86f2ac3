// The neighbourhood as mask policies of the prefill kernels (cuda/prefill/fwd.cuh, bwd.cuh).
// Tokens are flattened row-major, so a query block is kBlockM consecutive tokens and a key
// block kBlockN consecutive tokens. A forward CTA visits only the key blocks meeting the box
// of its queries' key spans, a backward CTA only the query blocks meeting the box of its
// keys' query spans (TileWalk); tiles every query fully sees skip the mask
// (tile_fully_visible), the others are masked element by element with the window rule the
// CPU kernels use (attnkit/neighborhood.h).
#pragma once

#include "attnkit/neighborhood.h"
#include "cuda/prefill/common.cuh"

namespace attnkit::cuda::neighborhood {

using namespace cute;

// Whether the tile of queries [m0, m_end) and keys [k0, k0 + kBlockN) holds a hidden pair;
// keys past the last token count as hidden (their rows of K and V are zero-filled).
template <int kBlockN>
__device__ bool tile_needs_mask(const Neighborhood& nb, int tokens, int m0, int m_end, int k0) {
  return k0 + kBlockN > tokens || !tile_fully_visible(nb, m0, m_end, k0, k0 + kBlockN);
}

// Sets the logits of query m0 + r against key k0 + c that the neighbourhood hides to -inf.
// A row's key box is computed once; one box at a time keeps the mainloop's registers free.
template <typename Acc, typename Coords>
__device__ void mask_tile(Acc& acc, const Coords& coords, const Neighborhood& nb, int tokens, int m0, int k0) {
  Tensor s = make_tensor(acc.data(), prefill::rowcol(acc.layout()));
  Tensor c = make_tensor(coords.data(), prefill::rowcol(coords.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    // Rows past the last token are never stored (and get P = 0 in the backward): any box.
    const GridBox box = nb.keys_of(min(m0 + get<0>(c(r, 0)), tokens - 1));
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      const int key = k0 + get<1>(c(r, j));
      int kc[kMaxSpatialRank];
      nb.coords_of(key < tokens ? key : 0, kc);
      bool seen = key < tokens;  // unused axes: box {0, 1, 1} and coordinate 0
      CUTE_UNROLL
      for (int a = 0; a < kMaxSpatialRank; ++a) seen = seen && box.axis[a].contains(kc[a]);
      if (!seen) s(r, j) = -INFINITY;
    }
  }
}

// Forward policy: the key blocks of query block [m0, m0 + kBlockM).
template <int kBlockM, int kBlockN>
struct NeighborhoodMask {
  using Args = Neighborhood;
  const Neighborhood& nb;  // the kernel's __grid_constant__ parameter, read in place
  TileWalk walk;
  int m0, m_end, tokens;
  int current = -1, after = -1;  // the tile being visited and the one after it

  __device__ NeighborhoodMask(const AttentionParams&, const Args& nb_, const Sequence& seq, int, int, int m0_)
      : nb(nb_),
        walk(nb_, m0_, min(seq.len_q, m0_ + kBlockM), kBlockN, TileSide::kKeys),
        m0(m0_),
        m_end(min(seq.len_q, m0_ + kBlockM)),
        tokens(seq.len_k) {}

  // The walk is stateful and visits increasing tiles, so next(n) steps it once per new n.
  __device__ int first() { return current = int(walk.next()), after = int(walk.next()), current; }
  __device__ int next(int n) {
    if (n != current) current = n, after = int(walk.next());
    return after;
  }
  __device__ bool valid(int n) const { return n >= 0; }
  __device__ bool needs_mask(int n) const { return tile_needs_mask<kBlockN>(nb, tokens, m0, m_end, n * kBlockN); }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int n) const {
    mask_tile(acc, coords, nb, tokens, m0, n * kBlockN);
  }
};

// Backward policy: the query blocks that see keys [n0, n0 + kBlockN).
template <int kBlockM, int kBlockN>
struct NeighborhoodBwdMask {
  using Args = Neighborhood;
  const Neighborhood& nb;
  TileWalk walk;
  int n0, tokens;

  __device__ NeighborhoodBwdMask(const AttentionParams&, const Args& nb_, const Sequence& seq, int, int n0_)
      : nb(nb_), walk(walk_of(nb_, n0_, seq.len_k)), n0(n0_), tokens(seq.len_k) {}
  static __device__ TileWalk walk_of(const Neighborhood& nb, int n0, int tokens) {
    return TileWalk(nb, n0, min(tokens, n0 + kBlockN), kBlockM, TileSide::kQueries);
  }

  // Restarting rebuilds the walk (once per q head of the group) rather than keep a copy.
  __device__ int first(int) { return walk = walk_of(nb, n0, tokens), int(walk.next()); }
  __device__ int next(int) { return int(walk.next()); }
  __device__ bool valid(int m) const { return m >= 0; }
  __device__ bool needs_mask(int m) const {
    return tile_needs_mask<kBlockN>(nb, tokens, m * kBlockM, min(tokens, (m + 1) * kBlockM), n0);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int, int m) const {
    mask_tile(acc, coords, nb, tokens, m * kBlockM, n0);
  }
};

}  // namespace attnkit::cuda::neighborhood
