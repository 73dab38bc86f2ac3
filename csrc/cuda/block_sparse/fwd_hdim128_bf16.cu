// One instantiation per file keeps builds parallel and incremental.
#include "cuda/block_sparse/fwd.cuh"

namespace attnkit::cuda::block_sparse {
template void launch_fwd<cutlass::bfloat16_t, 128>(const AttentionParams&, const BlockSparseLayout&, cudaStream_t);
}
