// CPU quantize_kv / dequantize_kv: loops over groups and rows around the format code of
// attnkit/quant.h, which the CUDA kernels call too (so both write the same bits).
#include "cpu/quant.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "attnkit/quant.h"
#include "cpu/dispatch.h"

namespace attnkit::cpu {
namespace {

template <typename T>
void quantize_rows(const QuantizeKVParams& p) {
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(p.head_dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = static_cast<const T*>(p.x) + r * p.head_dim;
      for (int c = 0; c < p.head_dim; ++c) row[c] = to_float(x[c]);
      quantize_row(p.format, p.group_size, p.rotate, row.data(), p.head_dim, r, p.data, p.scale, p.zero);
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
    std::vector<float> row(p.head_dim);
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
        for (int i = 0; i < chunk * kPerByte; ++i) row[byte * kPerByte + i] = values[i];
      }
      if (p.rotated) hadamard_rotate(row.data(), p.head_dim);  // H (H x) = x
      for (int c = 0; c < p.head_dim; ++c) out[c] = from_float<T>(row[c]);
    }
  });
}

}  // namespace

void quantize_row(KVFormat format, int group_size, bool rotate, float* x, int head_dim, int64_t row, uint8_t* data,
                  float* scale, float* zero) {
  if (rotate) hadamard_rotate(x, head_dim);
  const int group_bytes = group_size / channels_per_byte(format), groups = head_dim / group_size;
  data += row * (head_dim / channels_per_byte(format));
  scale += row * groups;
  if (zero != nullptr) zero += row * groups;
  for (int g = 0; g < groups; ++g) {
    const float* group = x + g * group_size;
    quantize_group(
        format, [group](int i) { return group[i]; }, group_size, data + g * group_bytes, scale + g,
        zero ? zero + g : nullptr);
  }
}

void quantize_kv(const QuantizeKVParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { quantize_rows<decltype(tag)>(params); });
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
