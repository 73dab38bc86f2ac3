// Schemas and bindings of quantize_kv / dequantize_kv (docs/quantization.md): checks,
// allocation, params, then the CPU kernels (csrc/cpu/quant.cpp) or, for CUDA tensors, the
// CUDA kernels (csrc/cuda/quant/quant.cu). The schemas are a fragment of the attnkit
// library declared in ops.cpp; fake kernels are in python/attnkit/quant.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/quant.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/quant/quant.h"
#endif

namespace attnkit::binding {
namespace {

// `shape` with its last size replaced.
std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out.back() = last;
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv(const at::Tensor& x, const std::string& kv_format,
                                                           int64_t group_size, bool rotate) {
  const KVFormat format = format_of(kv_format);
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have at least 2 dimensions (..., kv_heads, head_dim), got shape ",
                    x.sizes());
  QuantizeKVParams p{};
  p.format = format;
  p.dtype = dtype_of(x, "x");
  const int64_t head_dim = x.size(-1);
  p.group_size = channels_per_group(format, group_size, head_dim);
  p.head_dim = int(head_dim);
  check_rotation(rotate, head_dim, "rotate");
  p.rotate = rotate;
  const int64_t groups = head_dim / p.group_size;
  const at::Tensor xc = x.contiguous();
  at::Tensor data = at::empty(with_last(x.sizes(), head_dim / channels_per_byte(format)), x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(with_last(x.sizes(), groups), x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty(with_last(x.sizes(), format == KVFormat::kFp8E4M3 ? 0 : groups), scale.options());
  p.rows = x.numel() / head_dim;
  if (p.rows == 0) return {data, scale, zero};
  p.x = xc.data_ptr();
  p.data = data.data_ptr<uint8_t>();
  p.scale = scale.data_ptr<float>();
  p.zero = format == KVFormat::kFp8E4M3 ? nullptr : zero.data_ptr<float>();
#ifdef ATTNKIT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::quantize_kv(p, c10::cuda::getCurrentCUDAStream().stream());
    return {data, scale, zero};
  }
#endif
  cpu::quantize_kv(p);
  return {data, scale, zero};
}

at::Tensor dequantize_kv(const at::Tensor& data, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                         const std::string& kv_format, int64_t group_size, at::ScalarType dtype, bool rotated) {
  const KVFormat format = format_of(kv_format);
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte, "data must be uint8, got ", data.scalar_type());
  TORCH_CHECK_VALUE(data.dim() >= 2, "data must have at least 2 dimensions (..., kv_heads, bytes per row), got shape ",
                    data.sizes());
  DequantizeKVParams p{};
  p.format = format;
  const at::Tensor out_like = at::empty({0}, data.options().dtype(dtype));
  p.dtype = dtype_of(out_like, "dtype");
  const int64_t head_dim = data.size(-1) * channels_per_byte(format);
  p.group_size = channels_per_group(format, group_size, head_dim);
  p.head_dim = int(head_dim);
  check_rotation(rotated, head_dim, "rotated");
  p.rotated = rotated;
  const std::vector<int64_t> scale_shape = with_last(data.sizes(), head_dim / p.group_size);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.sizes() == at::IntArrayRef(scale_shape), "scale must have shape ",
                    at::IntArrayRef(scale_shape), " (one per group of each row of data), got ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == data.device(), "scale must be on the device of data (", data.device(),
                    "), got ", scale.device());
  if (format == KVFormat::kFp8E4M3) {
    TORCH_CHECK_VALUE(!zero.has_value(), "zero must be None for kv_format \"fp8_e4m3\"");
  } else {
    TORCH_CHECK_VALUE(zero.has_value(), "zero is required for kv_format \"", kv_format, "\"");
    TORCH_CHECK_VALUE(zero->scalar_type() == at::kFloat, "zero must be float32, got ", zero->scalar_type());
    TORCH_CHECK_VALUE(zero->sizes() == scale.sizes(), "zero must have the shape of scale ", scale.sizes(), ", got ",
                      zero->sizes());
    TORCH_CHECK_VALUE(zero->device() == data.device(), "zero must be on the device of data (", data.device(),
                      "), got ", zero->device());
  }
  at::Tensor out = at::empty(with_last(data.sizes(), head_dim), out_like.options());
  p.rows = out.numel() / head_dim;
  if (p.rows == 0) return out;
  const at::Tensor dc = data.contiguous(), sc = scale.contiguous();
  const at::Tensor zc = zero.has_value() ? zero->contiguous() : at::Tensor();
  p.data = dc.data_ptr<uint8_t>();
  p.scale = sc.data_ptr<float>();
  p.zero = zc.defined() ? zc.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
#ifdef ATTNKIT_WITH_CUDA
  if (data.is_cuda()) {
    const c10::cuda::CUDAGuard guard(data.device());
    cuda::dequantize_kv(p, c10::cuda::getCurrentCUDAStream().stream());
    return out;
  }
#endif
  cpu::dequantize_kv(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit, m) {
  m.def(
      "quantize_kv(Tensor x, str kv_format, int group_size, bool rotate=False) -> (Tensor data, Tensor scale, "
      "Tensor zero)");
  m.def(
      "dequantize_kv(Tensor data, Tensor scale, Tensor? zero, str kv_format, int group_size, ScalarType dtype, "
      "bool rotated=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("quantize_kv", &quantize_kv);
  m.impl("dequantize_kv", &dequantize_kv);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("quantize_kv", &quantize_kv);
  m.impl("dequantize_kv", &dequantize_kv);
}
#endif

}  // namespace attnkit::binding
