// attention_fwd / attention_bwd on CUDA: picks the kernel instantiation for the dtype and
// the head_dim (rounded up to the next built size; the kernels mask the extra columns).
#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "cuda/kernels.h"
#include "cuda/prefill/launch.h"

namespace attnkit::cuda {
namespace {

// The built head_dim that holds head_dim, or 0 if none does.
int padded_head_dim(int head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return 0;  // 16-byte vectors of fp16 / bf16
  for (int built : {64, 96, 128, 256})
    if (head_dim <= built) return built;
  return 0;
}

template <typename Fn>
void dispatch(DType dtype, int head_dim, const char* op, Fn&& fn) {
  const int padded = padded_head_dim(head_dim);
  if (padded == 0 || !(dtype == DType::kFloat16 || dtype == DType::kBFloat16))
    throw std::invalid_argument(std::string("attnkit.") + op + " on CUDA: unsupported dtype or head_dim " +
                                std::to_string(head_dim));
  const auto with_dim = [&](auto element) {
    using Element = decltype(element);
    switch (padded) {
      case 64: return fn.template operator()<Element, 64>();
      case 96: return fn.template operator()<Element, 96>();
      case 128: return fn.template operator()<Element, 128>();
      default: return fn.template operator()<Element, 256>();
    }
  };
  if (dtype == DType::kFloat16)
    with_dim(cutlass::half_t{});
  else
    with_dim(cutlass::bfloat16_t{});
}

}  // namespace

bool attention_supports(DType dtype, int head_dim) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && padded_head_dim(head_dim) != 0;
}

void attention_fwd(const AttentionParams& params, cudaStream_t stream) {
  dispatch(params.dtype, params.head_dim, "attention", [&]<typename Element, int kHeadDim>() {
    prefill::launch_fwd<Element, kHeadDim>(params, stream);
  });
}

void attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  dispatch(params.fwd.dtype, params.fwd.head_dim, "attention backward",
                               [&]<typename Element, int kHeadDim>() {
                                 prefill::launch_bwd<Element, kHeadDim>(params, stream);
                               });
}

}  // namespace attnkit::cuda
