// Binding of paged_cache_append, the kernel behind attnkit.PagedKVCache.append: checks,
// params, dispatch to csrc/cpu/paged_cache.cpp or (built with CUDA)
// csrc/cuda/paged_cache/append.cu. The op writes k_pages, v_pages, key_min and key_max in place and returns
// nothing; python/attnkit/paged_cache.py plans the slots and registers the fake kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"
#include "cpu/paged_cache.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

void paged_cache_append(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& key_min,
                        const at::Tensor& key_max, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& slot_mapping) {
  check_rank(k_pages, 4, "k_pages", "(num_pages, page_size, kv_heads, head_dim)");
  check_rank(k, 3, "k", "(n_tokens, kv_heads, head_dim)");
  PagedAppendParams p{};
  p.dtype = dtype_of(k_pages, "k_pages");
  check_like(v_pages, "v_pages", k_pages, "k_pages");
  check_like(k, "k", k_pages, "k_pages");
  check_like(v, "v", k_pages, "k_pages");
  TORCH_CHECK_VALUE(v_pages.sizes() == k_pages.sizes(), "v_pages must have the shape of k_pages ", k_pages.sizes(),
                    ", got ", v_pages.sizes());
  const int64_t num_pages = k_pages.size(0), page_size = k_pages.size(1);
  const int64_t heads_kv = k_pages.size(2), head_dim = k_pages.size(3);
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
  TORCH_CHECK_NOT_IMPLEMENTED(k_pages.is_cpu() || k_pages.is_cuda(), "attnkit.PagedKVCache has no append kernel for ",
                              k_pages.device());
  TORCH_CHECK_VALUE(num_pages <= INT32_MAX && k.size(0) <= INT32_MAX,
                    "k_pages and k must have fewer than 2^31 pages / tokens");
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* s = slots.data_ptr<int64_t>();
  if (k_pages.is_cpu()) {  // the CUDA kernel skips slots outside the cache instead (no host sync)
    for (int64_t i = 0; i < slots.numel(); ++i)
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
#ifdef ATTNKIT_WITH_CUDA
  if (k_pages.is_cuda()) {
    const c10::cuda::CUDAGuard guard(k_pages.device());
    cuda::paged_cache_append(p, c10::cuda::getCurrentCUDAStream().stream());
    return;
  }
#endif
  cpu::paged_cache_append(p);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit, m) {
  m.def(
      "paged_cache_append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) key_min, Tensor(d!) key_max, "
      "Tensor k, Tensor v, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(attnkit, CPU, m) { m.impl("paged_cache_append", &paged_cache_append); }

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) { m.impl("paged_cache_append", &paged_cache_append); }
#endif

}  // namespace attnkit::binding
