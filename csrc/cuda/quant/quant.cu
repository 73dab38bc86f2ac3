// quantize_kv / dequantize_kv on CUDA: grid-stride loops around the format code of
// attnkit/quant.h (shared with the CPU kernels, so both write the same bits). Quantize: one
// thread per group (a few KB per decode step; not tuned). Dequantize: one thread per 16
// bytes of data, the load the decode kernels will use, else one per byte. Rotated rows
// (keys stored as H k): one warp per row, which rotates it.
#include "cuda/quant/quant.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attnkit/quant.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"
#include "cuda/quant/warp_row.cuh"

namespace attnkit::cuda {
namespace {

template <typename T>
struct LoadAsFloat {
  const T* x;
  __device__ float operator()(int i) const { return to_float(x[i]); }
};

template <typename T>
__global__ void quantize_kernel(const __grid_constant__ QuantizeKVParams p) {
  const int64_t groups = p.rows * (p.head_dim / p.group_size);
  const int group_bytes = p.group_size / channels_per_byte(p.format);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x)
    quantize_group(p.format, LoadAsFloat<T>{static_cast<const T*>(p.x) + g * p.group_size}, p.group_size,
                   p.data + g * group_bytes, p.scale + g, p.zero ? p.zero + g : nullptr);
}

// Rotated rows (QuantizeKVParams::rotate / DequantizeKVParams::rotated): one warp per row,
// lane l holding channels l + 32 j (cuda/quant/warp_row.cuh).
template <typename T, int kPer>
__global__ void quantize_rotated_kernel(const __grid_constant__ QuantizeKVParams p) {
  const int lane = threadIdx.x % 32;
  for_each_warp_row(p.rows, [&](int64_t r) {
    const T* x = static_cast<const T*>(p.x) + r * p.head_dim;
    float values[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) values[j] = to_float(x[lane + 32 * j]);
    warp_hadamard(values, lane);
    warp_quantize_row(p.format, p.group_size, values, lane, r, p.data, p.scale, p.zero);
  });
}

template <typename T, int kPer>
__global__ void dequantize_rotated_kernel(const __grid_constant__ DequantizeKVParams p) {
  const int lane = threadIdx.x % 32;
  for_each_warp_row(p.rows, [&](int64_t r) {
    float values[kPer];
    warp_dequantize_row(p.format, p.group_size, r, p.data, p.scale, p.zero, lane, values);
    warp_hadamard(values, lane);  // H (H x) = x
    T* out = static_cast<T*>(p.out) + r * p.head_dim;
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[lane + 32 * j] = from_float<T>(values[j]);
  });
}

template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// values[0..n) -> out[0..n) as T, 16 bytes per store (out 16-byte aligned, n * sizeof(T) a multiple of 16).
template <typename T, int N>
__device__ void store_wide(T* out, const float* values) {
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < N / kPerVec; ++v) {
    Vec16<T> pack;
#pragma unroll
    for (int i = 0; i < kPerVec; ++i) pack.v[i] = from_float<T>(values[v * kPerVec + i]);
    reinterpret_cast<Vec16<T>*>(out)[v] = pack;
  }
}

// One thread per `kChunk` bytes of data (16 or 1).
template <KVFormat F, typename T, int kChunk>
__global__ void dequantize_kernel(const __grid_constant__ DequantizeKVParams p) {
  constexpr int kPerByte = F == KVFormat::kInt4 ? 2 : 1;
  const int row_bytes = p.head_dim / kPerByte;
  const int group_bytes = p.group_size / kPerByte;
  const int chunks_per_row = row_bytes / kChunk;
  const int64_t chunks = p.rows * chunks_per_row;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = c / chunks_per_row;
    const int byte = int(c % chunks_per_row) * kChunk;
    const int64_t g = row * (p.head_dim / p.group_size) + byte / group_bytes;
    const float scale = p.scale[g], zero = p.zero ? p.zero[g] : 0.0f;
    T* out = static_cast<T*>(p.out) + row * p.head_dim + byte * kPerByte;
    float values[kChunk * kPerByte];
    if constexpr (kChunk == 16) {
      const uint4 w = *reinterpret_cast<const uint4*>(p.data + row * row_bytes + byte);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      dequantize_16_bytes<F>(words, scale, zero, values);
      store_wide<T, kChunk * kPerByte>(out, values);
    } else {
      dequantize_byte<F>(p.data[row * row_bytes + byte], scale, zero, values);
#pragma unroll
      for (int i = 0; i < kPerByte; ++i) out[i] = from_float<T>(values[i]);
    }
  }
}

int blocks_for(int64_t threads_needed, int threads_per_block) {
  return int(std::min<int64_t>((threads_needed + threads_per_block - 1) / threads_per_block, 65535 * 8));
}

constexpr int kThreads = 256;

template <typename T>
void launch_quantize(const QuantizeKVParams& p, cudaStream_t stream) {
  if (p.rotate) {
    dispatch_channels_per_lane(p.head_dim, [&](auto per) {  // head_dim 32, 64, 128, 256 (checked)
      if constexpr (is_power_of_two(per()))
        quantize_rotated_kernel<T, per()><<<blocks_for(p.rows * 32, kThreads), kThreads, 0, stream>>>(p);
    });
  } else {
    const int64_t groups = p.rows * (p.head_dim / p.group_size);
    quantize_kernel<T><<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(p);
  }
  check(cudaGetLastError(), "quantize_kv launch");
}

template <KVFormat F, typename T>
void launch_dequantize(const DequantizeKVParams& p, cudaStream_t stream) {
  const int64_t row_bytes = p.head_dim / (F == KVFormat::kInt4 ? 2 : 1);
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.data) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  if (wide)
    dequantize_kernel<F, T, 16><<<blocks_for(p.rows * row_bytes / 16, kThreads), kThreads, 0, stream>>>(p);
  else
    dequantize_kernel<F, T, 1><<<blocks_for(p.rows * row_bytes, kThreads), kThreads, 0, stream>>>(p);
  check(cudaGetLastError(), "dequantize_kv launch");
}

}  // namespace

void quantize_kv(const QuantizeKVParams& params, cudaStream_t stream) {
  dispatch_dtype(params.dtype, [&](auto tag) { launch_quantize<decltype(tag)>(params, stream); });
}

void dequantize_kv(const DequantizeKVParams& params, cudaStream_t stream) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (params.rotated) {
      dispatch_channels_per_lane(params.head_dim, [&](auto per) {  // head_dim 32, 64, 128, 256 (checked)
        if constexpr (is_power_of_two(per()))
          dequantize_rotated_kernel<T, per()><<<blocks_for(params.rows * 32, kThreads), kThreads, 0, stream>>>(params);
      });
      check(cudaGetLastError(), "dequantize_kv launch");
      return;
    }
    switch (params.format) {
      case KVFormat::kInt8: launch_dequantize<KVFormat::kInt8, T>(params, stream); break;
      case KVFormat::kInt4: launch_dequantize<KVFormat::kInt4, T>(params, stream); break;
      case KVFormat::kFp8E4M3: launch_dequantize<KVFormat::kFp8E4M3, T>(params, stream); break;
    }
  });
}

}  // namespace attnkit::cuda
