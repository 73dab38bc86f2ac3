// One instantiation per file keeps builds parallel and incremental.
#include "cuda/neighborhood/bwd.cuh"

namespace attnkit::cuda::neighborhood {
template void launch_bwd<cutlass::bfloat16_t, 64>(const AttentionBwdParams&, const Neighborhood&, cudaStream_t);
}
