// One instantiation per file keeps builds parallel and incremental.
#include "cuda/neighborhood/fwd.cuh"

namespace attnkit::cuda::neighborhood {
template void launch_fwd<cutlass::bfloat16_t, 128>(const AttentionParams&, const Neighborhood&, cudaStream_t);
}
