// merge_attention_states on CUDA: memory-bound, one thread per 16 bytes of a row of
// head_dim, the weights from merge_weights() in attnkit/softmax.h (shared with the CPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attnkit/softmax.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"
#include "cuda/kernels.h"

namespace attnkit::cuda {
namespace {

template <typename T, int kVec>
__global__ void merge_kernel(const __grid_constant__ MergeParams p) {
  const int vecs_per_row = p.head_dim / kVec;
  const int64_t total = int64_t(p.batch) * p.seqlen * p.heads * vecs_per_row;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int vec = int(idx % vecs_per_row);
    const int64_t row = idx / vecs_per_row;
    const int h = int(row % p.heads);
    const int s = int(row / p.heads % p.seqlen);
    const int b = int(row / (int64_t(p.heads) * p.seqlen));
    const float lse_a = p.lse_a[b * p.lse_a_strides.batch + h * p.lse_a_strides.head + s * p.lse_a_strides.seq];
    const float lse_b = p.lse_b[b * p.lse_b_strides.batch + h * p.lse_b_strides.head + s * p.lse_b_strides.seq];
    const MergeWeights w = merge_weights(lse_a, lse_b);
    const int d0 = vec * kVec;
    const auto a = *reinterpret_cast<const Pack<T, kVec>*>(
        static_cast<const T*>(p.out_a) + b * p.out_a_strides.batch + s * p.out_a_strides.row +
        h * p.out_a_strides.head + d0);
    const auto bb = *reinterpret_cast<const Pack<T, kVec>*>(
        static_cast<const T*>(p.out_b) + b * p.out_b_strides.batch + s * p.out_b_strides.row +
        h * p.out_b_strides.head + d0);
    Pack<T, kVec> o;
#pragma unroll
    for (int i = 0; i < kVec; ++i) o.v[i] = from_float<T>(w.w_a * to_float(a.v[i]) + w.w_b * to_float(bb.v[i]));
    *reinterpret_cast<Pack<T, kVec>*>(static_cast<T*>(p.out) + b * p.out_strides.batch +
                                      s * p.out_strides.row + h * p.out_strides.head + d0) = o;
    if (vec == 0) p.lse[b * p.lse_strides.batch + h * p.lse_strides.head + s * p.lse_strides.seq] = w.lse;
  }
}

// 16-byte accesses when every row start is 16-byte aligned, else one element per thread.
bool rows_aligned(const MergeParams& p, int bytes_per_elem) {
  return (p.head_dim * bytes_per_elem) % 16 == 0 && rows_on_16_bytes(p.out_a, p.out_a_strides, bytes_per_elem) &&
         rows_on_16_bytes(p.out_b, p.out_b_strides, bytes_per_elem) &&
         rows_on_16_bytes(p.out, p.out_strides, bytes_per_elem);
}

template <typename T>
void launch(const MergeParams& p, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);
  const bool wide = rows_aligned(p, sizeof(T));
  const int64_t threads_needed = int64_t(p.batch) * p.seqlen * p.heads * (wide ? p.head_dim / kWide : p.head_dim);
  if (threads_needed == 0) return;
  constexpr int kThreads = 256;
  const int blocks = int(std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, 65535 * 8));
  if (wide)
    merge_kernel<T, kWide><<<blocks, kThreads, 0, stream>>>(p);
  else
    merge_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
  check(cudaGetLastError(), "merge_attention_states launch");
}

}  // namespace

void merge_attention_states(const MergeParams& params, cudaStream_t stream) {
  dispatch_dtype(params.dtype, [&](auto tag) { launch<decltype(tag)>(params, stream); });
}

}  // namespace attnkit::cuda
