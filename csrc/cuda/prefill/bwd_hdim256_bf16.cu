// One instantiation per file keeps builds parallel and incremental.
#include "cuda/prefill/bwd.cuh"

namespace attnkit::cuda::prefill {
template void launch_bwd<cutlass::bfloat16_t, 256>(const AttentionBwdParams&, cudaStream_t);
}
