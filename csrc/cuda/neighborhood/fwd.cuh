// Neighborhood attention forward on CUDA: the prefill forward kernel (cuda/prefill/fwd.cuh)
// with the neighbourhood as its mask policy. Tokens are flattened row-major, so a query block
// is kBlockM consecutive tokens and a key tile kBlockN consecutive tokens; the block visits
// only the key tiles meeting the box of its queries' key spans (KeyTileWalk), skips the mask
// on tiles every query fully sees (tile_fully_visible) and masks the others element by
// element with the same window rule the CPU kernels use (attnkit/neighborhood.h).
#pragma once

#include "attnkit/neighborhood.h"
#include "cuda/neighborhood/launch.h"
#include "cuda/prefill/fwd.cuh"

namespace attnkit::cuda::neighborhood {

using namespace cute;

template <int kBlockM, int kBlockN>
struct NeighborhoodMask {
  using Args = Neighborhood;
  const Neighborhood& nb;  // the kernel's __grid_constant__ parameter, read in place
  KeyTileWalk walk;
  int m0, m_end, tokens;
  int current = -1, after = -1;  // the tile being visited and the one after it

  __device__ NeighborhoodMask(const AttentionParams&, const Args& nb_, const Sequence& seq, int m0_)
      : nb(nb_),
        walk(nb_, m0_, min(seq.len_q, m0_ + kBlockM), kBlockN),
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

  __device__ bool needs_mask(int n) const {
    const int k0 = n * kBlockN;
    return k0 + kBlockN > tokens || !tile_fully_visible(nb, m0, m_end, k0, k0 + kBlockN);
  }

  // Element (r, c) of the tile is query m0 + r against key n * kBlockN + c. A row's key box
  // is computed once; one box at a time keeps the registers of the mainloop free.
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int n) const {
    Tensor s = make_tensor(acc.data(), prefill::rowcol(acc.layout()));
    Tensor c = make_tensor(coords.data(), prefill::rowcol(coords.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      // Rows past the last token are never stored: any box will do.
      const GridBox box = nb.keys_of(min(m0 + get<0>(c(r, 0)), tokens - 1));
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        const int key = n * kBlockN + get<1>(c(r, j));
        int kc[kMaxSpatialRank];
        nb.coords_of(key < tokens ? key : 0, kc);
        bool seen = key < tokens;  // unused axes: box {0, 1, 1} and coordinate 0
        CUTE_UNROLL
        for (int a = 0; a < kMaxSpatialRank; ++a) seen = seen && box.axis[a].contains(kc[a]);
        if (!seen) s(r, j) = -INFINITY;
      }
    }
  }
};

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, const Neighborhood& nb, cudaStream_t stream) {
  prefill::launch_fwd_with<Element, kHeadDim, NeighborhoodMask>(p, nb, stream, "neighborhood_fwd launch");
}

}  // namespace attnkit::cuda::neighborhood
