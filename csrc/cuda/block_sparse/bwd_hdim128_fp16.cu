// One instantiation per file keeps builds parallel and incremental.
#include "cuda/block_sparse/bwd.cuh"

namespace attnkit::cuda::block_sparse {
template void launch_bwd<cutlass::half_t, 128>(const AttentionBwdParams&, const BlockSparseLayout&, cudaStream_t);
}
