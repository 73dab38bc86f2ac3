// Turns a CUDA error into a C++ exception that names the call site.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace attnkit::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("attnkit CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

// Raises before a launch when the current GPU cannot give one block `bytes` of shared
// memory (its opt-in limit: 99 KB on sm_86 / sm_89, 163 KB on sm_80, 227 KB on sm_90),
// naming the op, head_dim and the GPU, instead of a launch failure.
inline void require_shared_memory(int bytes, const char* op, int head_dim) {
  int device = 0, limit = 0;
  check(cudaGetDevice(&device), op);
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op);
  if (bytes <= limit) return;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), op);
  throw std::runtime_error(std::string("attnkit: ") + op + " at head_dim " + std::to_string(head_dim) + " needs " + std::to_string(bytes / 1024) +
                           " KB of shared memory per block; " + prop.name + " (sm_" + std::to_string(prop.major) +
                           std::to_string(prop.minor) + ") allows " + std::to_string(limit / 1024) +
                           " KB. Use a smaller head_dim on this GPU, or CPU tensors.");
}

}  // namespace attnkit::cuda
