// Entry points of the CPU quantize_kv / dequantize_kv kernels. Torch-free apart from
// at::parallel_for; csrc/torch/quant.cpp fills the params.
#pragma once

#include "attnkit/params.h"

namespace attnkit::cpu {

void quantize_kv(const QuantizeKVParams& params);
void dequantize_kv(const DequantizeKVParams& params);

}  // namespace attnkit::cpu
