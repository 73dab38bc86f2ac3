// neighborhood_fwd / neighborhood_bwd on CUDA: the params as a prefill of `tokens` rows per
// sequence (launch.h), and the kernel instantiation for the dtype and head_dim (rounded up
// to 64 or 128; the kernels mask the extra columns).
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
  const AttentionParams p = neighborhood::as_prefill(params);
  dispatch(params, "attnkit.neighborhood_attention", [&]<typename Element, int kHeadDim>() {
    neighborhood::launch_fwd<Element, kHeadDim>(p, params.nbhd, stream);
  });
}

void neighborhood_bwd(const NeighborhoodBwdParams& params, cudaStream_t stream) {
  const AttentionBwdParams bp = neighborhood::as_prefill(params);
  dispatch(params.fwd, "attnkit.neighborhood_attention backward", [&]<typename Element, int kHeadDim>() {
    neighborhood::launch_bwd<Element, kHeadDim>(bp, params.fwd.nbhd, stream);
  });
}

}  // namespace attnkit::cuda
