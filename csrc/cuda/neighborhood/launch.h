// Launchers of the neighborhood attention kernels, one explicit instantiation per
// (dtype, head_dim) in its own .cu.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/params.h"

namespace attnkit::cuda::neighborhood {

// The neighbourhood params as those of a dense, non-causal prefill of p.seqlen_q =
// p.seqlen_k = tokens rows per sequence: what the kernels (and bench/neighborhood's dense
// baseline) take.
inline AttentionParams as_prefill(const NeighborhoodParams& np) {
  AttentionParams p{};
  p.dtype = np.dtype;
  p.q = np.q, p.k = np.k, p.v = np.v, p.out = np.out, p.lse = np.lse;
  p.q_strides = np.q_strides, p.k_strides = np.k_strides, p.v_strides = np.v_strides;
  p.out_strides = np.out_strides;
  p.batch = np.batch, p.heads_q = np.heads_q, p.heads_kv = np.heads_kv, p.head_dim = np.head_dim;
  p.seqlen_q = p.seqlen_k = int(np.nbhd.tokens());
  p.scale = np.scale;
  p.window_left = p.window_right = -1;
  return p;
}

inline AttentionBwdParams as_prefill(const NeighborhoodBwdParams& np) {
  AttentionBwdParams bp{};
  static_cast<AttentionGrads&>(bp) = np;  // the same gradients and scratch
  bp.fwd = as_prefill(np.fwd);
  return bp;
}

// p, bp: as_prefill of the neighbourhood params.
template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, const Neighborhood& nb, cudaStream_t stream);
template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& bp, const Neighborhood& nb, cudaStream_t stream);

}  // namespace attnkit::cuda::neighborhood
