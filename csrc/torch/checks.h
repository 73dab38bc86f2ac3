// Argument checks and tensor -> params conversions shared by the bindings. Every message
// names the Python argument it is about. TORCH_CHECK_VALUE raises ValueError,
// TORCH_CHECK RuntimeError; both run before any kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string>

#include "attnkit/params.h"

namespace attnkit::binding {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have ", rank, " dimensions ", layout, ", got shape ",
                    t.sizes());
}

// `t` must have the dtype and device of `ref` (named ref_name).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_head_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dimension (head_dim), got strides ", t.strides());
}

// An int32 index tensor of the given rank on the device of `ref`.
inline void check_index_tensor(const at::Tensor& t, int64_t rank, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have ", rank, " dimension(s), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of q (", ref.device(), "), got ",
                    t.device());
}

inline void check_options(int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "window must be (left, right) with each >= -1 (-1 = unbounded), got (", window_left, ", ",
                    window_right, ")");
  TORCH_CHECK_VALUE(softcap >= 0.0, "softcap must be >= 0 (0 = off), got ", softcap);
}

// A window as the kernels' int: any window past INT32_MAX keys hides nothing that
// INT32_MAX does not (sequence lengths are int32), so it saturates instead of wrapping.
inline int window_as_int(int64_t window) {
  return window > std::numeric_limits<int32_t>::max() ? std::numeric_limits<int32_t>::max() : int(window);
}

// The CUDA prefill / neighbourhood softmax folds a positive scale into exp2 after the row
// max. A scale <= 0 (legal: 0 averages the visible values, a negative one favours the least
// similar keys) is folded into q instead, exactly (negation and zeros are exact in every
// dtype): scale * q.k = |scale| * (-q).k and 0 * q.k = 1 * (0 q).k. The folded call's out,
// lse, dk and dv are the caller's; its dq times q_grad_sign is. The CPU kernels scale q
// themselves and take any scale as it is.
struct FoldedScale {
  at::Tensor q;
  double scale;
  int q_grad_sign;  // 1, -1 or 0
};
inline FoldedScale fold_scale_for_cuda(const at::Tensor& q, double scale) {
  if (!q.is_cuda() || scale > 0.0) return {q, scale, 1};
  if (scale < 0.0) return {q.neg(), -scale, -1};
  return {at::zeros_like(q), 1.0, 0};
}
inline void unfold_dq(at::Tensor& dq, const FoldedScale& folded) {
  if (folded.q_grad_sign == -1) dq.neg_();
  if (folded.q_grad_sign == 0) dq.zero_();
}

// A kv_format name of docs/quantization.md.
inline KVFormat format_of(const std::string& name) {
  if (name == "int8") return KVFormat::kInt8;
  if (name == "int4") return KVFormat::kInt4;
  if (name == "fp8_e4m3") return KVFormat::kFp8E4M3;
  TORCH_CHECK_VALUE(false, "kv_format must be \"int8\", \"int4\" or \"fp8_e4m3\", got \"", name, "\"");
}

// Channels per group: group_size 0 means one group per row (per token and kv head).
inline int channels_per_group(KVFormat format, int64_t group_size, int64_t head_dim) {
  if (format == KVFormat::kFp8E4M3)
    TORCH_CHECK_VALUE(group_size == 0, "group_size must be None for kv_format \"fp8_e4m3\" (one scale per row), got ",
                      group_size);
  TORCH_CHECK_VALUE(group_size == 0 || group_size == 32 || group_size == 64 || group_size == 128,
                    "group_size must be None, 32, 64 or 128, got ", group_size);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim <= 1 << 20, "head_dim (last dimension) must be in [1, 2^20], got ",
                    head_dim);
  TORCH_CHECK_VALUE(group_size == 0 || head_dim % group_size == 0, "group_size (", group_size,
                    ") must divide head_dim (", head_dim, ")");
  TORCH_CHECK_VALUE(format != KVFormat::kInt4 || head_dim % 2 == 0,
                    "head_dim must be even for kv_format \"int4\" (two codes per byte), got ", head_dim);
  return int(group_size == 0 ? head_dim : group_size);
}

// Rotated key rows (stored as H k, attnkit/quant.h): head_dim 32, 64, 128 or 256, what the
// CUDA kernels' warp-per-row rotation covers. `name` is the flag's argument.
inline void check_rotation(bool rotate, int64_t head_dim, const char* name) {
  TORCH_CHECK_VALUE(!rotate || (head_dim >= 32 && head_dim <= 256 && (head_dim & (head_dim - 1)) == 0), name,
                    "=True needs head_dim 32, 64, 128 or 256 (a Hadamard rotation), got head_dim ", head_dim);
}

// (batch, seqlen, heads, head_dim) tensors; varlen (total, heads, head_dim) has no batch stride.
inline Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), t.stride(1), t.stride(2)};
  return {0, t.stride(0), t.stride(1)};
}

}  // namespace attnkit::binding
