// Bindings of decode (contiguous and paged KV caches) and sparse_decode (selected pages or
// tokens of a paged cache): checks, allocation, params, dispatch to the CPU kernel or
// (built with CUDA) the lean-attention CUDA kernel. Both ops share one body.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attnkit/decode_layout.h"
#include "checks.h"
#include "cpu/kernels.h"
#include "quant_cache.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

constexpr int64_t kMaxDecodeQueries = 16;

#ifdef ATTNKIT_WITH_CUDA
// What the CUDA kernel needs beyond the common checks: its dtypes and head dims, and K/V
// rows on 16 bytes (it copies them with 16-byte cp.async).
void check_cuda_decode(DType dtype, int64_t head_dim, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK_VALUE(dtype == DType::kFloat16 || dtype == DType::kBFloat16,
                    "q must be float16 or bfloat16 for the CUDA decode, got float32");
  TORCH_CHECK_VALUE(cuda::decode_supports(dtype, int(head_dim)),
                    "q must have a head_dim that is a multiple of 8 up to 256 for the CUDA decode, got ", head_dim);
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    const bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && t->stride(0) % 8 == 0 &&
                         t->stride(1) % 8 == 0 && t->stride(2) % 8 == 0;
    TORCH_CHECK_VALUE(aligned, name, " must have 16-byte aligned rows for the CUDA decode (data pointer on 16 "
                      "bytes, strides of dims 0-2 multiples of 8 elements), got strides ", t->strides());
  }
}
#endif

// A sparse decode's selection: int32 (batch, kv_heads, n) indices of `unit` tokens each.
struct Selection {
  const at::Tensor& indices;
  int64_t unit;
};

std::tuple<at::Tensor, at::Tensor> run_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                              const std::optional<at::Tensor>& block_table, double scale,
                                              double softcap, int64_t window_left,
                                              const std::optional<Selection>& selection, const CacheQuant& quant) {
  check_rank(q, 4, "q", "(batch, seqlen_q, heads, head_dim)");
  const char* cache_layout = block_table ? "(num_pages, page_size, kv_heads, head_dim)"
                                         : "(batch, max_seqlen, kv_heads, head_dim)";
  check_rank(k_cache, 4, "k_cache", cache_layout);
  check_rank(v_cache, 4, "v_cache", cache_layout);
  DecodeParams p{};
  p.dtype = dtype_of(q, "q");
  if (!set_quantized_cache(quant, q, k_cache, v_cache, "k_cache", "v_cache", p.k_quant, p.v_quant)) {
    check_like(k_cache, "k_cache", q, "q");
    check_like(v_cache, "v_cache", q, "q");
  }
  check_head_dim_contiguous(q, "q");
  check_head_dim_contiguous(k_cache, "k_cache");
  check_head_dim_contiguous(v_cache, "v_cache");
  const int64_t batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), head_dim = q.size(3);
  TORCH_CHECK_VALUE(seqlen_q >= 1 && seqlen_q <= kMaxDecodeQueries, "q must hold 1 to ", kMaxDecodeQueries,
                    " queries per sequence (dim 1), got ", seqlen_q);
  TORCH_CHECK_VALUE(head_dim > 0, "q must have head_dim > 0");
  TORCH_CHECK_VALUE(p.is_quantized() || k_cache.size(3) == head_dim, "k_cache must have the head_dim of q (",
                    head_dim, "), got ", k_cache.size(3));
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  const int64_t heads_kv = k_cache.size(2);
  TORCH_CHECK_VALUE(heads_kv > 0 && heads_q % heads_kv == 0, "q heads (", heads_q,
                    ") must be a multiple of k_cache heads (", heads_kv, ")");
  TORCH_CHECK_VALUE(batch * seqlen_q * heads_q <= INT32_MAX, "q must have fewer than 2^31 rows (batch x seqlen_q x "
                    "heads), got ", q.sizes());
  check_options(window_left, -1, softcap);
  check_index_tensor(cache_seqlens, 1, "cache_seqlens", q);
  TORCH_CHECK_VALUE(cache_seqlens.size(0) == batch, "cache_seqlens must have batch = ", batch, " entries, got ",
                    cache_seqlens.size(0));
  const at::Tensor seqlens = cache_seqlens.contiguous();

  int64_t capacity;
  at::Tensor table;
  if (block_table) {
    check_index_tensor(*block_table, 2, "block_table", q);
    TORCH_CHECK_VALUE(block_table->size(0) == batch, "block_table must have batch = ", batch, " rows, got ",
                      block_table->size(0));
    table = block_table->contiguous();
    p.page_size = int(k_cache.size(1));
    TORCH_CHECK_VALUE(p.page_size > 0, "k_cache must have page_size > 0");
    capacity = table.size(1) * p.page_size;
    p.block_table = table.data_ptr<int32_t>();
    p.block_table_stride = table.size(1);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == batch, "k_cache must have the batch size of q (", batch, "), got ",
                      k_cache.size(0), "; pass block_table for a paged cache");
    capacity = k_cache.size(1);
  }
  // Lengths are int32: a capacity past kDecodeMaxKeys (e.g. a wide block_table of large
  // pages) addresses nothing more, and bounding it keeps the kernels' key arithmetic in
  // int32 (attnkit/decode_layout.h). Stays int64 until here: int(capacity) would wrap.
  capacity = std::min<int64_t>(capacity, kDecodeMaxKeys);
  at::Tensor indices;
  if (selection) {
    const char* name = selection->unit == 1 ? "token_indices" : "page_indices";
    check_index_tensor(selection->indices, 3, name, q);
    TORCH_CHECK_VALUE(selection->indices.size(0) == batch && selection->indices.size(1) == heads_kv &&
                          selection->indices.size(2) > 0,
                      name, " must have shape (batch, kv_heads, n) = (", batch, ", ", heads_kv, ", n >= 1), got ",
                      selection->indices.sizes());
    TORCH_CHECK_VALUE(selection->unit >= 1 && selection->indices.size(2) * selection->unit <= kDecodeMaxKeys,
                      "tokens_per_index must be >= 1 and select at most ", kDecodeMaxKeys, " tokens, got ",
                      selection->unit);
    indices = selection->indices.contiguous();
    p.selection = indices.data_ptr<int32_t>();
    p.selection_len = int(indices.size(2));
    p.selection_unit = int(selection->unit);
  }
  if (q.is_cpu()) {  // values are checked where reading them costs no device sync
    const int32_t* len = seqlens.data_ptr<int32_t>();
    const int64_t num_pages = k_cache.size(0);
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= capacity, "cache_seqlens[", b, "] = ", len[b],
                        " is outside [0, ", capacity, "], the capacity of ",
                        block_table ? "block_table (pages per sequence x page_size)" : "k_cache (dim 1)");
      if (!block_table) continue;
      const int32_t* row = p.block_table + b * p.block_table_stride;
      for (int64_t i = 0; i < (len[b] + p.page_size - 1) / p.page_size; ++i)
        TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < num_pages, "block_table[", b, ", ", i, "] = ", row[i],
                          " is not a page id in [0, ", num_pages, ")");
    }
  }
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) check_cuda_decode(p.dtype, head_dim, k_cache, v_cache);
#endif

  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_strides = strides_of(q);
  p.out_strides = strides_of(out);
  p.k_strides = p.is_quantized() ? row_strides(k_cache) : strides_of(k_cache);
  p.v_strides = p.is_quantized() ? row_strides(v_cache) : strides_of(v_cache);
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.heads_q = int(heads_q);
  p.heads_kv = int(heads_kv);
  p.head_dim = int(head_dim);
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.window_left = window_as_int(window_left);
  if (batch == 0 || heads_q == 0) return {out, lse};  // nothing to compute; no 0-block launch
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    // Workers and workspace depend on the shapes only (no read of cache_seqlens), so the
    // call is capturable in a CUDA graph (the caching allocator serves captures too).
    // decode_workers() is cached per device and kernel instantiation.
    const int workers = cuda::decode_workers(p);
    const int64_t bytes = cuda::decode_workspace_bytes(p, int(capacity), workers);
    const at::Tensor workspace = at::empty({bytes}, q.options().dtype(at::kByte));
    cuda::decode(p, int(capacity), workers, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    return {out, lse};
  }
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(q.is_cpu(), "attnkit.decode has no kernel for ", q.device());
  cpu::decode(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                          double scale, double softcap, int64_t window_left,
                                          const std::optional<std::string>& kv_format, int64_t group_size,
                                          const std::optional<at::Tensor>& k_scale,
                                          const std::optional<at::Tensor>& k_zero,
                                          const std::optional<at::Tensor>& v_scale,
                                          const std::optional<at::Tensor>& v_zero, bool rotated_keys) {
  return run_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, window_left, std::nullopt,
                    {kv_format, group_size, k_scale, k_zero, v_scale, v_zero, rotated_keys});
}

// Selection entries are not checked: an entry < 0 or naming tokens past the end selects
// nothing (attnkit/decode_layout.h), so any values are safe.
std::tuple<at::Tensor, at::Tensor> sparse_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                 const at::Tensor& block_table, const at::Tensor& indices,
                                                 int64_t tokens_per_index, double scale, double softcap,
                                                 const std::optional<std::string>& kv_format, int64_t group_size,
                                                 const std::optional<at::Tensor>& k_scale,
                                                 const std::optional<at::Tensor>& k_zero,
                                                 const std::optional<at::Tensor>& v_scale,
                                                 const std::optional<at::Tensor>& v_zero, bool rotated_keys) {
  return run_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, -1,
                    Selection{indices, tokens_per_index},
                    {kv_format, group_size, k_scale, k_zero, v_scale, v_zero, rotated_keys});
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("decode", &decode);
  m.impl("sparse_decode", &sparse_decode);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("decode", &decode);
  m.impl("sparse_decode", &sparse_decode);
}
#endif

}  // namespace attnkit::binding
