// The quantized KV caches of the bindings (decode, sparse_decode, paged prefill): the
// schemas' quantization arguments, checked into attnkit::QuantizedRows.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attnkit/quant.h"
#include "checks.h"

namespace attnkit::binding {

// The scales of a quantized cache (docs/quantization.md), as the schemas pass them.
struct CacheQuant {
  const std::optional<std::string>& kv_format;  // nullopt: the caches hold q's dtype
  int64_t group_size;
  const std::optional<at::Tensor>& k_scale;
  const std::optional<at::Tensor>& k_zero;
  const std::optional<at::Tensor>& v_scale;
  const std::optional<at::Tensor>& v_zero;
  bool rotated_keys;  // K rows hold H k (attnkit/quant.h)
};

// Checks a quantized cache's codes and scales against q and returns its rows: data uint8
// (..., kv_heads, head_dim / channels_per_byte), scale / zero float32 (..., kv_heads,
// groups), all contiguous on q's device; zero None for fp8. head_dim must be a multiple of
// 32, so the 8 channels the CPU kernel reads and the 16 bytes a CUDA thread loads lie in
// one group.
inline QuantizedRows quantized_rows(const at::Tensor& q, const CacheQuant& quant, const at::Tensor& data, const char* name,
                             const std::optional<at::Tensor>& scale, const char* scale_name,
                             const std::optional<at::Tensor>& zero, const char* zero_name) {
  const int64_t head_dim = q.size(-1);
  QuantizedRows rows;
  rows.format = format_of(*quant.kv_format);
  rows.group_size = channels_per_group(rows.format, quant.group_size, head_dim);
  rows.head_dim = int(head_dim);
  TORCH_CHECK_VALUE(head_dim % 32 == 0, "q must have a head_dim that is a multiple of 32 for a quantized cache, got ",
                    head_dim);
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte, name, " must be uint8 (the codes of a quantized cache), got ",
                    data.scalar_type());
  TORCH_CHECK_VALUE(data.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ",
                    data.device());
  TORCH_CHECK_VALUE(data.size(-1) == rows.row_bytes(), name, " must have head_dim / ",
                    channels_per_byte(rows.format), " = ", rows.row_bytes(), " bytes per row for kv_format \"",
                    *quant.kv_format, "\", got ", data.size(-1));
  TORCH_CHECK_VALUE(data.is_contiguous(), name, " must be contiguous (a quantized cache), got strides ", data.strides());
  std::vector<int64_t> groups_shape(data.sizes().begin(), data.sizes().end());
  groups_shape.back() = rows.groups();
  for (auto [t, tname] : {std::pair{&scale, scale_name}, std::pair{&zero, zero_name}}) {
    if (rows.format == KVFormat::kFp8E4M3 && t == &zero) {
      TORCH_CHECK_VALUE(!t->has_value(), tname, " must be None for kv_format \"fp8_e4m3\"");
      continue;
    }
    TORCH_CHECK_VALUE(t->has_value(), tname, " is required for kv_format \"", *quant.kv_format, "\"");
    const at::Tensor& u = **t;
    TORCH_CHECK_VALUE(u.scalar_type() == at::kFloat && u.device() == q.device() && u.is_contiguous() &&
                          u.sizes() == at::IntArrayRef(groups_shape),
                      tname, " must be a contiguous float32 tensor of shape ", at::IntArrayRef(groups_shape), " on ",
                      q.device(), ", got ", u.scalar_type(), " of shape ", u.sizes(), " on ", u.device());
  }
  rows.data = data.data_ptr<uint8_t>();
  rows.scale = scale->data_ptr<float>();
  rows.zero = zero ? zero->data_ptr<float>() : nullptr;
  return rows;
}

// Strides of a quantized cache in rows (token, kv head), as DecodeParams and AttentionParams
// count them: (pages or batch, tokens, kv_heads, bytes), or varlen (tokens, kv_heads, bytes).
inline Strides row_strides(const at::Tensor& data) {
  const int64_t bytes = data.size(-1);
  if (data.dim() == 3) return {0, data.stride(0) / bytes, data.stride(1) / bytes};
  return {data.stride(0) / bytes, data.stride(1) / bytes, data.stride(2) / bytes};
}

// Fills k_rows / v_rows from a quantized cache (kv_format given) after checking it, and
// returns true; without kv_format checks that no other quantization argument is given and
// returns false. k_name / v_name name the cache arguments in errors.
inline bool set_quantized_cache(const CacheQuant& quant, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const char* k_name, const char* v_name, QuantizedRows& k_rows,
                                QuantizedRows& v_rows) {
  if (quant.kv_format) {
    k_rows = quantized_rows(q, quant, k, k_name, quant.k_scale, "k_scale", quant.k_zero, "k_zero");
    v_rows = quantized_rows(q, quant, v, v_name, quant.v_scale, "v_scale", quant.v_zero, "v_zero");
    check_rotation(quant.rotated_keys, q.size(-1), "rotated_keys");
    k_rows.rotated = quant.rotated_keys;
    return true;
  }
  TORCH_CHECK_VALUE(!quant.rotated_keys, "rotated_keys is only for a quantized cache (kv_format given)");
  for (auto [t, name] : {std::pair{&quant.k_scale, "k_scale"}, std::pair{&quant.k_zero, "k_zero"},
                         std::pair{&quant.v_scale, "v_scale"}, std::pair{&quant.v_zero, "v_zero"}})
    TORCH_CHECK_VALUE(!t->has_value(), name, " is only for a quantized cache (kv_format given)");
  return false;
}

}  // namespace attnkit::binding
