// CPU quantize_kv / dequantize_kv: loops over groups and rows around the format code of
// attnkit/quant.h, which the CUDA kernels call too (so both write the same bits).
#include "cpu/quant.h"

#include <ATen/Parallel.h>

#include <cstring>

#include "attnkit/quant.h"
#include "cpu/dispatch.h"

namespace attnkit::cpu {
namespace {

template <typename T>
void quantize_groups(const QuantizeKVParams& p) {
  const int groups_per_row = p.head_dim / p.group_size;
  const int group_bytes = p.group_size / channels_per_byte(p.format);
  at::parallel_for(0, p.rows * groups_per_row, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const T* x = static_cast<const T*>(p.x) + g * p.group_size;
      quantize_group(
          p.format, [x](int i) { return to_float(x[i]); }, p.group_size, p.data + g * group_bytes, p.scale + g,
          p.zero ? p.zero + g : nullptr);
    }
  });
}

template <KVFormat F, typename T>
void dequantize_rows(const DequantizeKVParams& p) {
  constexpr int kPerByte = F == KVFormat::kInt4 ? 2 : 1;
  const int row_bytes = p.head_dim / kPerByte;
  const int group_bytes = p.group_size / kPerByte;
  const int groups_per_row = p.head_dim / p.group_size;
  // The CUDA kernel's 16-byte path where rows are whole 16-byte chunks, else byte by byte.
  const bool wide = row_bytes % 16 == 0;
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    float values[32];
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* data = p.data + r * row_bytes;
      T* out = static_cast<T*>(p.out) + r * p.head_dim;
      const int64_t group0 = r * groups_per_row;
      const int chunk = wide ? 16 : 1;
      for (int byte = 0; byte < row_bytes; byte += chunk) {
        const int64_t g = group0 + byte / group_bytes;
        const float zero = p.zero ? p.zero[g] : 0.0f;
        if (wide) {
          uint32_t w[4];
          std::memcpy(w, data + byte, 16);
          dequantize_16_bytes<F>(w, p.scale[g], zero, values);
        } else {
          dequantize_byte<F>(data[byte], p.scale[g], zero, values);
        }
        for (int i = 0; i < chunk * kPerByte; ++i) out[byte * kPerByte + i] = from_float<T>(values[i]);
      }
    }
  });
}

}  // namespace

void quantize_kv(const QuantizeKVParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { quantize_groups<decltype(tag)>(params); });
}

void dequantize_kv(const DequantizeKVParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (params.format) {
      case KVFormat::kInt8: dequantize_rows<KVFormat::kInt8, T>(params); break;
      case KVFormat::kInt4: dequantize_rows<KVFormat::kInt4, T>(params); break;
      case KVFormat::kFp8E4M3: dequantize_rows<KVFormat::kFp8E4M3, T>(params); break;
    }
  });
}

}  // namespace attnkit::cpu
