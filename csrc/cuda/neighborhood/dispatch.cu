// neighborhood_fwd / neighborhood_bwd on CUDA: the params as a prefill of `tokens` rows per
// sequence (launch.h), and the kernel instantiation for the dtype and head_dim (rounded up
// to 64 or 128; the kernels mask the extra columns).
#include "cuda/half_dispatch.h"
#include "cuda/kernels.h"
#include "cuda/neighborhood/launch.h"

namespace attnkit::cuda {

bool neighborhood_supports(DType dtype, int head_dim) { return supports_half_64_128(dtype, head_dim); }

void neighborhood_fwd(const NeighborhoodParams& params, cudaStream_t stream) {
  const AttentionParams p = neighborhood::as_prefill(params);
  dispatch_half_64_128(params.dtype, params.head_dim, "attnkit.neighborhood_attention",
                       [&]<typename Element, int kHeadDim>() {
                         neighborhood::launch_fwd<Element, kHeadDim>(p, params.nbhd, stream);
                       });
}

void neighborhood_bwd(const NeighborhoodBwdParams& params, cudaStream_t stream) {
  const AttentionBwdParams bp = neighborhood::as_prefill(params);
  dispatch_half_64_128(params.fwd.dtype, params.fwd.head_dim, "attnkit.neighborhood_attention backward",
                       [&]<typename Element, int kHeadDim>() {
                         neighborhood::launch_bwd<Element, kHeadDim>(bp, params.fwd.nbhd, stream);
                       });
}

}  // namespace attnkit::cuda
