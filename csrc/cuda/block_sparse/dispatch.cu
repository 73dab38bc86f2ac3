// block_sparse_fwd / block_sparse_bwd on CUDA: the kernel instantiation for the dtype and
// head_dim (rounded up to 64 or 128; the kernels mask the extra columns); the canonical form
// and the transpose of block lists, one thread per list (attnkit/block_sparse.h), so lists
// are prepared on the device without a host sync.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attnkit/block_sparse.h"
#include "cuda/block_sparse/launch.h"
#include "cuda/check.h"
#include "cuda/half_dispatch.h"
#include "cuda/kernels.h"

namespace attnkit::cuda {
namespace {

constexpr int kListThreads = 128;

__global__ void __launch_bounds__(kListThreads)
    canonical_kernel(const __grid_constant__ BlockLists in, int64_t rows, uint32_t* bitmaps, int32_t* out_indices,
                     int32_t* out_counts) {
  const int64_t r = int64_t(blockIdx.x) * kListThreads + threadIdx.x;
  if (r >= rows) return;
  out_counts[r] = canonical_row(in.indices + r * in.list_len, in.counts[r], in.list_len, in.col_blocks,
                                bitmaps + r * bitmap_words(in.col_blocks), out_indices + r * in.list_len);
}

__global__ void __launch_bounds__(kListThreads)
    transpose_kernel(const __grid_constant__ BlockLists in, int64_t rows, int32_t* out_indices, int32_t* out_counts) {
  const int64_t r = int64_t(blockIdx.x) * kListThreads + threadIdx.x;
  if (r >= rows) return;
  const int col = int(r % in.col_blocks), h = int(r / in.col_blocks % in.heads);
  const int b = int(r / (int64_t(in.col_blocks) * in.heads));
  out_counts[r] = transpose_row(in, b, h, col, out_indices + r * in.row_blocks);
}

// CTAs of kListThreads threads, one thread per list, for `rows` lists.
unsigned list_grid(int64_t rows, const char* op) {
  const int64_t blocks = (rows + kListThreads - 1) / kListThreads;
  if (blocks > INT32_MAX) throw std::invalid_argument(std::string(op) + ": too many lists for one launch");
  return unsigned(blocks);
}

}  // namespace

bool block_sparse_supports(DType dtype, int head_dim) { return supports_half_64_128(dtype, head_dim); }

void block_sparse_fwd(const AttentionParams& params, const BlockSparseLayout& layout, cudaStream_t stream) {
  dispatch_half_64_128(params.dtype, params.head_dim, "attnkit.block_sparse_attention",
                       [&]<typename Element, int kHeadDim>() {
                         block_sparse::launch_fwd<Element, kHeadDim>(params, layout, stream);
                       });
}

void block_sparse_bwd(const AttentionBwdParams& params, const BlockSparseLayout& layout, cudaStream_t stream) {
  dispatch_half_64_128(params.fwd.dtype, params.fwd.head_dim, "attnkit.block_sparse_attention backward",
                       [&]<typename Element, int kHeadDim>() {
                         block_sparse::launch_bwd<Element, kHeadDim>(params, layout, stream);
                       });
}

void block_lists_canonical(const BlockLists& in, int batch, uint32_t* bitmaps, int32_t* out_indices,
                           int32_t* out_counts, cudaStream_t stream) {
  const int64_t rows = int64_t(batch) * in.heads * in.row_blocks;
  if (rows == 0) return;
  canonical_kernel<<<list_grid(rows, "block_lists_canonical"), kListThreads, 0, stream>>>(in, rows, bitmaps,
                                                                                          out_indices, out_counts);
  check(cudaGetLastError(), "block_lists_canonical launch");
}

void block_lists_transpose(const BlockLists& in, int batch, int32_t* out_indices, int32_t* out_counts,
                           cudaStream_t stream) {
  const int64_t rows = int64_t(batch) * in.heads * in.col_blocks;
  if (rows == 0) return;
  transpose_kernel<<<list_grid(rows, "block_lists_transpose"), kListThreads, 0, stream>>>(in, rows, out_indices,
                                                                                          out_counts);
  check(cudaGetLastError(), "block_lists_transpose launch");
}

}  // namespace attnkit::cuda
