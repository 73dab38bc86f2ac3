// PagedKVCache append on CUDA, fused: one thread per (token, kv head, Pack of channels)
// copies its part of the key and value rows into the token's slot, and the thread of the
// first row of each run of a page's rows then folds the whole run into the page's key
// min / max (attnkit/quest.h), in token order as the CPU kernel does. So every (page, kv
// head, channel) bound has one writer: no atomics, no race, and bounds bit-identical to the
// CPU ones (signed zeros and NaN included, which order-free atomics on ordered-int
// encodings would not give). A run is at most page_size rows, read from k (in L2).
// A quantized cache: one warp per (token, kv head) quantizes its key and value rows
// straight into the slot, in the same launch (append_quantized_kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attnkit/quest.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"
#include "cuda/kernels.h"
#include "cuda/quant/warp_row.cuh"

namespace attnkit::cuda {
namespace {

// Page of token i, or -1 for a slot outside the cache (the token is skipped).
__device__ __forceinline__ int64_t page_of(const PagedAppendParams& p, int i) {
  const int64_t slot = p.slot_mapping[i];
  return slot >= 0 && slot < int64_t(p.num_pages) * p.page_size ? slot / p.page_size : -1;
}

// Folds the keys of the run of rows starting at token i (the rows of `page`, one after the
// other) into the page's key min / max of kVec channels, k_channels + t * k_strides.row
// being token t's: the first row of a run is the one writer of these bounds.
template <typename T, int kVec>
__device__ void fold_page_run(const PagedAppendParams& p, int i, int64_t page, int h, int d, const T* k_channels) {
  using Vec = Pack<T, kVec>;
  float* kmin = p.key_min + (page * p.heads_kv + h) * p.head_dim + d;
  float* kmax = p.key_max + (page * p.heads_kv + h) * p.head_dim + d;
  float lo[kVec], hi[kVec];
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
    lo[c] = kmin[c];
    hi[c] = kmax[c];
  }
  for (int j = i; j < p.n_tokens && page_of(p, j) == page; ++j) {
    const Vec key = *reinterpret_cast<const Vec*>(k_channels + j * p.k_strides.row);
    const bool fresh_page = p.slot_mapping[j] % p.page_size == 0;
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      if (fresh_page) quest_empty_bounds(lo[c], hi[c]);
      quest_fold_key(lo[c], hi[c], to_float(key.v[c]));
    }
  }
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
    kmin[c] = lo[c];
    kmax[c] = hi[c];
  }
}

template <typename T, int kVec>
__global__ void append_kernel(const __grid_constant__ PagedAppendParams p) {
  using Vec = Pack<T, kVec>;
  const int vecs_per_row = p.head_dim / kVec;
  const int64_t total = int64_t(p.n_tokens) * p.heads_kv * vecs_per_row;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int d = int(idx % vecs_per_row) * kVec;
    const int h = int(idx / vecs_per_row % p.heads_kv);
    const int i = int(idx / (int64_t(vecs_per_row) * p.heads_kv));
    const int64_t page = page_of(p, i);
    if (page < 0) continue;
    const int64_t offset = p.slot_mapping[i] % p.page_size;
    // Token t's channels of this thread: k_head + t * k_strides.row.
    const T* k_head = static_cast<const T*>(p.k) + h * p.k_strides.head + d;
    const T* v_src = static_cast<const T*>(p.v) + i * p.v_strides.row + h * p.v_strides.head + d;
    T* k_dst = static_cast<T*>(p.k_pages) + page * p.k_pages_strides.batch + offset * p.k_pages_strides.row +
               h * p.k_pages_strides.head + d;
    T* v_dst = static_cast<T*>(p.v_pages) + page * p.v_pages_strides.batch + offset * p.v_pages_strides.row +
               h * p.v_pages_strides.head + d;
    *reinterpret_cast<Vec*>(k_dst) = *reinterpret_cast<const Vec*>(k_head + i * p.k_strides.row);
    *reinterpret_cast<Vec*>(v_dst) = *reinterpret_cast<const Vec*>(v_src);
    if (i == 0 || page_of(p, i - 1) != page) fold_page_run<T, kVec>(p, i, page, h, d, k_head);
  }
}

// A quantized cache: one warp per (token, kv head), lane l holding channels l + 32 j
// (cuda/quant/warp_row.cuh): key minus its sequence's offset, rotated when asked, and value
// quantized straight into the token's slot (the bits of quantize_kv), then the key bounds.
template <typename T, int kPer>
__global__ void append_quantized_kernel(const __grid_constant__ PagedAppendParams p) {
  const int lane = threadIdx.x % 32;
  for_each_warp_row(int64_t(p.n_tokens) * p.heads_kv, [&](int64_t r) {
    const int i = int(r / p.heads_kv), h = int(r % p.heads_kv);
    const int64_t page = page_of(p, i);
    if (page < 0) return;
    const int64_t dst = p.slot_mapping[i] * p.heads_kv + h;  // row (slot, kv head) of the contiguous pages
    const T* k_head = static_cast<const T*>(p.k) + h * p.k_strides.head;  // token t: + t * k_strides.row
    const T* k_src = k_head + i * p.k_strides.row;
    const T* v_src = static_cast<const T*>(p.v) + i * p.v_strides.row + h * p.v_strides.head;
    const float* offset = p.key_offset ? p.key_offset + (p.token_seq[i] * p.heads_kv + h) * p.head_dim : nullptr;
    float x[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int c = lane + 32 * j;
      x[j] = offset ? to_float(k_src[c]) - offset[c] : to_float(k_src[c]);
    }
    if constexpr (is_power_of_two(kPer)) {
      if (p.rotate_keys) warp_hadamard(x, lane);
    }
    warp_quantize_row(p.format, p.group_size, x, lane, dst, static_cast<uint8_t*>(p.k_pages), p.k_scale, p.k_zero);
#pragma unroll
    for (int j = 0; j < kPer; ++j) x[j] = to_float(v_src[lane + 32 * j]);
    warp_quantize_row(p.format, p.group_size, x, lane, dst, static_cast<uint8_t*>(p.v_pages), p.v_scale, p.v_zero);
    if (i > 0 && page_of(p, i - 1) == page) return;  // not the first row of its run
#pragma unroll
    for (int j = 0; j < kPer; ++j) fold_page_run<T, 1>(p, i, page, h, lane + 32 * j, k_head + lane + 32 * j);
  });
}

constexpr int kThreads = 256;

template <typename T>
void launch_quantized(const PagedAppendParams& p, cudaStream_t stream) {
  const int64_t threads_needed = int64_t(p.n_tokens) * p.heads_kv * 32;
  if (threads_needed == 0) return;
  const int blocks = int(std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, int64_t(1) << 30));
  dispatch_channels_per_lane(p.head_dim, [&](auto per) {
    append_quantized_kernel<T, per()><<<blocks, kThreads, 0, stream>>>(p);
  });
  check(cudaGetLastError(), "paged_cache_append launch");
}

template <typename T>
void launch(const PagedAppendParams& p, cudaStream_t stream) {
  if (p.quantized) return launch_quantized<T>(p, stream);
  constexpr int kWide = 16 / sizeof(T);
  const bool wide = p.head_dim % kWide == 0 && rows_on_16_bytes(p.k, p.k_strides, sizeof(T)) &&
                    rows_on_16_bytes(p.v, p.v_strides, sizeof(T)) &&
                    rows_on_16_bytes(p.k_pages, p.k_pages_strides, sizeof(T)) &&
                    rows_on_16_bytes(p.v_pages, p.v_pages_strides, sizeof(T));
  const int64_t threads_needed = int64_t(p.n_tokens) * p.heads_kv * (wide ? p.head_dim / kWide : p.head_dim);
  if (threads_needed == 0) return;
  const int blocks = int(std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, int64_t(1) << 30));
  if (wide)
    append_kernel<T, kWide><<<blocks, kThreads, 0, stream>>>(p);
  else
    append_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
  check(cudaGetLastError(), "paged_cache_append launch");
}

}  // namespace

void paged_cache_append(const PagedAppendParams& params, cudaStream_t stream) {
  dispatch_dtype(params.dtype, [&](auto tag) { launch<decltype(tag)>(params, stream); });
}

}  // namespace attnkit::cuda
