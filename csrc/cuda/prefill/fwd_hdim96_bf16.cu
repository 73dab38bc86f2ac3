// One instantiation per file keeps builds parallel and incremental.
#include "cuda/prefill/fwd.cuh"

namespace attnkit::cuda::prefill {
template void launch_fwd<cutlass::bfloat16_t, 96>(const AttentionParams&, cudaStream_t);
}
