// One instantiation per file keeps builds parallel and incremental.
#include "cuda/neighborhood/fwd.cuh"

namespace attnkit::cuda::neighborhood {
template void launch_fwd<cutlass::half_t, 64>(const AttentionParams&, const Neighborhood&, cudaStream_t);
}
