// neighborhood_fwd / neighborhood_bwd on CUDA: the params as a prefill of `tokens` rows per
// sequence, and the kernel instantiation for the dtype and head_dim (rounded up to 64 or 128; the kernels mask
// the extra columns).
#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "cuda/kernels.h"
#include "cuda/neighborhood/launch.h"

namespace attnkit::cuda {
namespace {

int padded_head_dim(int head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return 0;  // 16-byte vectors of fp16 / bf16
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 0;
}

AttentionParams as_prefill(const NeighborhoodParams& np) {
  AttentionParams p{};
  p.dtype = np.dtype;
  p.q = np.q;
  p.k = np.k;
  p.v = np.v;
  p.out = np.out;
  p.lse = np.lse;
  p.q_strides = np.q_strides;
  p.k_strides = np.k_strides;
  p.v_strides = np.v_strides;
  p.out_strides = np.out_strides;
  p.batch = np.batch;
  p.heads_q = np.heads_q;
  p.heads_kv = np.heads_kv;
  p.head_dim = np.head_dim;
  p.seqlen_q = p.seqlen_k = int(np.nbhd.tokens());
  p.scale = np.scale;
  p.window_left = p.window_right = -1;
  return p;
}

}  // namespace

bool neighborhood_supports(DType dtype, int head_dim) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && padded_head_dim(head_dim) != 0;
}

// Calls launch<Element, padded head_dim>() for the params' dtype and head_dim.
template <typename Launch>
void dispatch(const NeighborhoodParams& params, const char* op, Launch&& launch) {
  if (!neighborhood_supports(params.dtype, params.head_dim))
    throw std::invalid_argument(std::string(op) + " on CUDA: unsupported dtype or head_dim " +
                                std::to_string(params.head_dim));
  const bool half = params.dtype == DType::kFloat16;
  if (padded_head_dim(params.head_dim) == 64) {
    if (half) launch.template operator()<cutlass::half_t, 64>();
    else launch.template operator()<cutlass::bfloat16_t, 64>();
  } else {
    if (half) launch.template operator()<cutlass::half_t, 128>();
    else launch.template operator()<cutlass::bfloat16_t, 128>();
  }
}

void neighborhood_fwd(const NeighborhoodParams& params, cudaStream_t stream) {
  const AttentionParams p = as_prefill(params);
  dispatch(params, "attnkit.neighborhood_attention", [&]<typename Element, int kHeadDim>() {
    neighborhood::launch_fwd<Element, kHeadDim>(p, params.nbhd, stream);
  });
}

void neighborhood_bwd(const NeighborhoodBwdParams& params, cudaStream_t stream) {
  AttentionBwdParams bp{};
  bp.fwd = as_prefill(params.fwd);
  bp.dout = params.dout;
  bp.dq = params.dq;
  bp.dk = params.dk;
  bp.dv = params.dv;
  bp.dout_strides = params.dout_strides;
  bp.dq_strides = params.dq_strides;
  bp.dk_strides = params.dk_strides;
  bp.dv_strides = params.dv_strides;
  bp.dq_accum = params.dq_accum;
  bp.dq_accum_strides = params.dq_accum_strides;
  bp.delta = params.delta;
  dispatch(params.fwd, "attnkit.neighborhood_attention backward", [&]<typename Element, int kHeadDim>() {
    neighborhood::launch_bwd<Element, kHeadDim>(bp, params.fwd.nbhd, stream);
  });
}

}  // namespace attnkit::cuda
