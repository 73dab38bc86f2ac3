// Bindings of paged_cache_append and paged_cache_append_quantized, the kernels behind
// attnkit.PagedKVCache.append (plain and quantized caches): checks, params, dispatch to
// csrc/cpu/paged_cache.cpp or (built with CUDA) csrc/cuda/paged_cache/append.cu. The ops
// write the pages (and scales), key_min and key_max in place and return nothing;
// python/attnkit/paged_cache.py plans the slots and registers the fake kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/paged_cache.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

// Checks and params common to both kinds of cache: the new rows k, v (n_tokens, heads_kv,
// head_dim) of `dtype`, slot_mapping, key_min / key_max; the pages' shape is (num_pages,
// page_size, heads_kv, row) with row = head_dim for a plain cache.
PagedAppendParams append_params(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& key_min,
                                const at::Tensor& key_max, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slot_mapping, int64_t head_dim) {
  check_rank(k_pages, 4, "k_pages", "(num_pages, page_size, kv_heads, head_dim)");
  check_rank(k, 3, "k", "(n_tokens, kv_heads, head_dim)");
  PagedAppendParams p{};
  p.dtype = dtype_of(k, "k");
  check_like(v, "v", k, "k");
  TORCH_CHECK_VALUE(k.device() == k_pages.device(), "k must be on the device of k_pages (", k_pages.device(),
                    "), got ", k.device());
  TORCH_CHECK_VALUE(v_pages.sizes() == k_pages.sizes() && v_pages.scalar_type() == k_pages.scalar_type() &&
                        v_pages.device() == k_pages.device(),
                    "v_pages must be like k_pages (", k_pages.scalar_type(), " of shape ", k_pages.sizes(), " on ",
                    k_pages.device(), "), got ", v_pages.scalar_type(), " of shape ", v_pages.sizes(), " on ",
                    v_pages.device());
  const int64_t num_pages = k_pages.size(0), page_size = k_pages.size(1), heads_kv = k_pages.size(2);
  TORCH_CHECK_VALUE(k.size(1) == heads_kv && k.size(2) == head_dim, "k must be (n_tokens, ", heads_kv, ", ",
                    head_dim, "), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  for (auto [t, name] : {std::pair{&key_min, "key_min"}, std::pair{&key_max, "key_max"}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == k_pages.device(), name, " must be on the device of k_pages");
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({num_pages, heads_kv, head_dim}), name, " must have shape (",
                      num_pages, ", ", heads_kv, ", ", head_dim, "), got ", t->sizes());
    TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
  }
  for (auto [t, name] : {std::pair{&k_pages, "k_pages"}, std::pair{&v_pages, "v_pages"}, std::pair{&k, "k"},
                         std::pair{&v, "v"}}) {
    check_head_dim_contiguous(*t, name);
  }
  TORCH_CHECK_VALUE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ",
                    slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
                    "slot_mapping must have shape (n_tokens,) = (", k.size(0), ",), got ", slot_mapping.sizes());
  TORCH_CHECK_VALUE(slot_mapping.device() == k_pages.device(), "slot_mapping must be on the device of k_pages");
  TORCH_CHECK_VALUE(slot_mapping.is_contiguous(), "slot_mapping must be contiguous");
  TORCH_CHECK_NOT_IMPLEMENTED(k_pages.is_cpu() || k_pages.is_cuda(), "attnkit.PagedKVCache has no append kernel for ",
                              k_pages.device());
  TORCH_CHECK_VALUE(num_pages <= INT32_MAX && k.size(0) <= INT32_MAX,
                    "k_pages and k must have fewer than 2^31 pages / tokens");
  const int64_t* s = slot_mapping.data_ptr<int64_t>();
  if (k_pages.is_cpu()) {  // the CUDA kernel skips slots outside the cache instead (no host sync)
    for (int64_t i = 0; i < slot_mapping.numel(); ++i)
      TORCH_CHECK_VALUE(s[i] >= 0 && s[i] < num_pages * page_size, "slot_mapping[", i, "] = ", s[i],
                        " is not a slot in [0, num_pages * page_size = ", num_pages * page_size, ")");
  }
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.k_pages = k_pages.data_ptr();
  p.v_pages = v_pages.data_ptr();
  p.k_pages_strides = strides_of(k_pages);
  p.v_pages_strides = strides_of(v_pages);
  p.key_min = key_min.data_ptr<float>();
  p.key_max = key_max.data_ptr<float>();
  p.slot_mapping = s;
  p.n_tokens = int(k.size(0));
  p.num_pages = int(num_pages);
  p.heads_kv = int(heads_kv);
  p.head_dim = int(head_dim);
  p.page_size = int(page_size);
  return p;
}

void run_append(const PagedAppendParams& p, const at::Tensor& k_pages) {
#ifdef ATTNKIT_WITH_CUDA
  if (k_pages.is_cuda()) {
    const c10::cuda::CUDAGuard guard(k_pages.device());
    cuda::paged_cache_append(p, c10::cuda::getCurrentCUDAStream().stream());
    return;
  }
#endif
  cpu::paged_cache_append(p);
}

void paged_cache_append(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& key_min,
                        const at::Tensor& key_max, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& slot_mapping) {
  check_rank(k_pages, 4, "k_pages", "(num_pages, page_size, kv_heads, head_dim)");
  check_like(k, "k", k_pages, "k_pages");
  run_append(append_params(k_pages, v_pages, key_min, key_max, k, v, slot_mapping, k_pages.size(3)), k_pages);
}

// A quantized cache (docs/quantization.md): pages of uint8 codes, (num_pages, page_size,
// heads_kv, head_dim / channels_per_byte), and float32 scales / zeros per group; rows are
// quantized as quantize_kv(k - key_offset[token_seq], rotate=rotate_keys) and
// quantize_kv(v) would quantize them.
void paged_cache_append_quantized(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& k_scale,
                                  const std::optional<at::Tensor>& k_zero, const at::Tensor& v_scale,
                                  const std::optional<at::Tensor>& v_zero, const at::Tensor& key_min,
                                  const at::Tensor& key_max, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& slot_mapping, const std::optional<at::Tensor>& key_offset,
                                  const std::optional<at::Tensor>& token_seq, const std::string& kv_format,
                                  int64_t group_size, bool rotate_keys) {
  check_rank(k, 3, "k", "(n_tokens, kv_heads, head_dim)");
  const int64_t head_dim = k.size(2);
  const KVFormat format = format_of(kv_format);
  const int group = channels_per_group(format, group_size, head_dim);
  TORCH_CHECK_VALUE(head_dim % 32 == 0 && head_dim <= 256,
                    "k must have a head_dim that is a multiple of 32, at most 256, for a quantized cache, got ",
                    head_dim);
  check_rotation(rotate_keys, head_dim, "rotate_keys");
  check_rank(k_pages, 4, "k_pages", "(num_pages, page_size, kv_heads, head_dim / channels_per_byte)");
  TORCH_CHECK_VALUE(k_pages.scalar_type() == at::kByte && k_pages.is_contiguous() &&
                        k_pages.size(3) == head_dim / channels_per_byte(format),
                    "k_pages must be contiguous uint8 codes with ", head_dim / channels_per_byte(format),
                    " bytes per row, got ", k_pages.scalar_type(), " of shape ", k_pages.sizes());
  PagedAppendParams p = append_params(k_pages, v_pages, key_min, key_max, k, v, slot_mapping, head_dim);
  TORCH_CHECK_VALUE(v_pages.is_contiguous(), "v_pages must be contiguous");
  const std::vector<int64_t> scales_vec{k_pages.size(0), k_pages.size(1), k_pages.size(2), head_dim / group};
  const at::IntArrayRef scales_shape(scales_vec);
  const bool has_zero = format != KVFormat::kFp8E4M3;
  for (auto [t, name] : {std::pair{&k_scale, "k_scale"}, std::pair{&v_scale, "v_scale"}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device() == k_pages.device() && t->is_contiguous() &&
                          t->sizes() == scales_shape,
                      name, " must be a contiguous float32 tensor of shape ", scales_shape, " on ", k_pages.device(),
                      ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  for (auto [t, name] : {std::pair{&k_zero, "k_zero"}, std::pair{&v_zero, "v_zero"}}) {
    TORCH_CHECK_VALUE(t->has_value() == has_zero, name, has_zero ? " is required for kv_format \"" : " must be None for kv_format \"",
                      kv_format, "\"");
    if (has_zero)
      TORCH_CHECK_VALUE((*t)->scalar_type() == at::kFloat && (*t)->device() == k_pages.device() &&
                            (*t)->is_contiguous() && (*t)->sizes() == scales_shape,
                        name, " must be like k_scale, got ", (*t)->scalar_type(), " of shape ", (*t)->sizes());
  }
  TORCH_CHECK_VALUE(key_offset.has_value() == token_seq.has_value(), "key_offset and token_seq go together");
  if (key_offset) {
    TORCH_CHECK_VALUE(key_offset->scalar_type() == at::kFloat && key_offset->device() == k_pages.device() &&
                          key_offset->is_contiguous() && key_offset->dim() == 3 &&
                          key_offset->size(1) == k_pages.size(2) && key_offset->size(2) == head_dim,
                      "key_offset must be a contiguous float32 tensor (sequences, ", k_pages.size(2), ", ", head_dim,
                      ") on ", k_pages.device(), ", got ", key_offset->scalar_type(), " of shape ",
                      key_offset->sizes());
    TORCH_CHECK_VALUE(token_seq->scalar_type() == at::kLong && token_seq->device() == k_pages.device() &&
                          token_seq->is_contiguous() && token_seq->sizes() == at::IntArrayRef({k.size(0)}),
                      "token_seq must be a contiguous int64 tensor (n_tokens,) = (", k.size(0), ",) on ",
                      k_pages.device(), ", got ", token_seq->scalar_type(), " of shape ", token_seq->sizes());
    if (k_pages.is_cpu()) {  // the CUDA kernel trusts it (PagedKVCache builds it from checked ids)
      const int64_t* seq = token_seq->data_ptr<int64_t>();
      for (int64_t i = 0; i < k.size(0); ++i)
        TORCH_CHECK_VALUE(seq[i] >= 0 && seq[i] < key_offset->size(0), "token_seq[", i, "] = ", seq[i],
                          " is not a row of key_offset");
    }
    p.key_offset = key_offset->data_ptr<float>();
    p.token_seq = token_seq->data_ptr<int64_t>();
  }
  p.quantized = true;
  p.format = format;
  p.group_size = group;
  p.rotate_keys = rotate_keys;
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  p.k_zero = has_zero ? k_zero->data_ptr<float>() : nullptr;
  p.v_zero = has_zero ? v_zero->data_ptr<float>() : nullptr;
  run_append(p, k_pages);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit, m) {
  m.def(
      "paged_cache_append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) key_min, Tensor(d!) key_max, "
      "Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def(
      "paged_cache_append_quantized(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) k_scale, Tensor(d!)? k_zero, "
      "Tensor(e!) v_scale, Tensor(f!)? v_zero, Tensor(g!) key_min, Tensor(h!) key_max, Tensor k, Tensor v, "
      "Tensor slot_mapping, Tensor? key_offset, Tensor? token_seq, str kv_format, int group_size, bool rotate_keys) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("paged_cache_append", &paged_cache_append);
  m.impl("paged_cache_append_quantized", &paged_cache_append_quantized);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("paged_cache_append", &paged_cache_append);
  m.impl("paged_cache_append_quantized", &paged_cache_append_quantized);
}
#endif

}  // namespace attnkit::binding
