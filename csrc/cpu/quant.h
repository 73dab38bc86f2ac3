// Entry points of the CPU quantize_kv / dequantize_kv kernels. Torch-free apart from
// at::parallel_for; csrc/torch/quant.cpp fills the params.
#pragma once

#include "attnkit/params.h"

namespace attnkit::cpu {

void quantize_kv(const QuantizeKVParams& params);

// One row x[0..head_dim) in float32, rotated in place first (x <- H x) when `rotate`, as row
// `row` of quantized data / scale / zero (docs/quantization.md; zero nullptr for fp8): the
// bits quantize_kv writes for it. Used by quantize_kv and the quantized PagedKVCache append.
void quantize_row(KVFormat format, int group_size, bool rotate, float* x, int head_dim, int64_t row, uint8_t* data,
                  float* scale, float* zero);
void dequantize_kv(const DequantizeKVParams& params);

}  // namespace attnkit::cpu
