// Entry points of the CUDA quantize_kv / dequantize_kv kernels (torch-free): csrc/torch/quant.cpp
// fills the params and passes the current stream. Both return after launching; launch
// errors throw std::runtime_error. Any head_dim the params allow; 16-byte loads where data
// rows are whole, aligned 16-byte chunks.
#pragma once

#include <cuda_runtime_api.h>

#include "attnkit/params.h"

namespace attnkit::cuda {

void quantize_kv(const QuantizeKVParams& params, cudaStream_t stream);
void dequantize_kv(const DequantizeKVParams& params, cudaStream_t stream);

}  // namespace attnkit::cuda
