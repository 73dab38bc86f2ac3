// fp32 <-> storage-type conversions on the device, the storage type of a DType, and
// vectors of elements for 16-byte accesses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attnkit/params.h"

namespace attnkit::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Runs fn(T{}) for the device element type T of `dtype` (host side, to pick a launch).
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(__half{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
  }
}

// kVec consecutive elements, loaded and stored as one access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Whether every row of a (batch, row, head, head_dim) tensor at `ptr` with these element
// strides starts on 16 bytes (head_dim rows then go in 16-byte Packs).
inline bool rows_on_16_bytes(const void* ptr, const Strides& s, int bytes_per_elem) {
  const int64_t mask = 16 / bytes_per_elem - 1;
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (s.batch & mask) == 0 && (s.row & mask) == 0 &&
         (s.head & mask) == 0;
}

}  // namespace attnkit::cuda
