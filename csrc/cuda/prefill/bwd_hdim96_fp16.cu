// One instantiation per file keeps builds parallel and incremental.
#include "cuda/prefill/bwd.cuh"

namespace attnkit::cuda::prefill {
template void launch_bwd<cutlass::half_t, 96>(const AttentionBwdParams&, cudaStream_t);
}
