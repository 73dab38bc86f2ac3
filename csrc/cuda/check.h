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

}  // namespace attnkit::cuda
