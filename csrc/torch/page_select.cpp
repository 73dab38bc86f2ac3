// Schemas and bindings of page_scores and select_pages (sparse decode page selection):
// checks, allocation, params, dispatch to csrc/cpu/page_select.cpp or (built with CUDA)
// csrc/cuda/page_select/page_select.cu. The schemas are a fragment of the attnkit library
// declared in ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"
#include "cpu/page_select.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

void check_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

at::Tensor page_scores(const at::Tensor& q, const at::Tensor& key_min, const at::Tensor& key_max,
                       const at::Tensor& block_table, const at::Tensor& cache_seqlens, int64_t page_size,
                       double scale) {
  check_rank(q, 4, "q", "(batch, seqlen_q, heads, head_dim)");
  dtype_of(q, "q");
  check_rank(key_min, 3, "key_min", "(num_pages, kv_heads, head_dim)");
  check_rank(key_max, 3, "key_max", "(num_pages, kv_heads, head_dim)");
  check_float32(key_min, "key_min");
  check_float32(key_max, "key_max");
  for (auto [t, name] : {std::pair{&key_min, "key_min"}, std::pair{&key_max, "key_max"}})
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " must be on the device of q (", q.device(), "), got ",
                      t->device());
  TORCH_CHECK_VALUE(key_max.sizes() == key_min.sizes(), "key_max must have the shape of key_min ", key_min.sizes(),
                    ", got ", key_max.sizes());
  const int64_t batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), head_dim = q.size(3);
  const int64_t num_pages = key_min.size(0), heads_kv = key_min.size(1);
  TORCH_CHECK_VALUE(seqlen_q >= 1, "q must hold at least one query per sequence (dim 1), got ", seqlen_q);
  TORCH_CHECK_VALUE(key_min.size(2) == head_dim, "key_min must have the head_dim of q (", head_dim, "), got ",
                    key_min.size(2));
  TORCH_CHECK_VALUE(heads_kv > 0 && heads_q % heads_kv == 0, "q heads (", heads_q,
                    ") must be a multiple of key_min heads (", heads_kv, ")");
  TORCH_CHECK_VALUE(page_size > 0, "page_size must be > 0, got ", page_size);
  check_index_tensor(block_table, 2, "block_table", q);
  check_index_tensor(cache_seqlens, 1, "cache_seqlens", q);
  TORCH_CHECK_VALUE(block_table.size(0) == batch, "block_table must have batch = ", batch, " rows, got ",
                    block_table.size(0));
  TORCH_CHECK_VALUE(cache_seqlens.size(0) == batch, "cache_seqlens must have batch = ", batch, " entries, got ",
                    cache_seqlens.size(0));
  const int64_t max_pages = block_table.size(1);
  TORCH_CHECK_NOT_IMPLEMENTED(q.is_cpu() || q.is_cuda(), "attnkit.page_scores has no kernel for ", q.device());
  TORCH_CHECK_VALUE(num_pages <= INT32_MAX && max_pages <= INT32_MAX && heads_q <= INT32_MAX,
                    "key_min, block_table and q must have fewer than 2^31 pages / heads");

  const at::Tensor table = block_table.contiguous(), seqlens = cache_seqlens.contiguous();
  const int32_t* len = seqlens.data_ptr<int32_t>();
  const int32_t* rows = table.data_ptr<int32_t>();
  if (q.is_cpu()) {  // values are checked where reading them costs no device sync
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= max_pages * page_size, "cache_seqlens[", b, "] = ", len[b],
                        " is outside [0, ", max_pages * page_size,
                        "], the capacity of block_table (pages per sequence x page_size)");
      for (int64_t i = 0; i < (len[b] + page_size - 1) / page_size; ++i) {
        const int32_t page = rows[b * max_pages + i];
        TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "block_table[", b, ", ", i, "] = ", page,
                          " is not a page id in [0, ", num_pages, ") (key_min dim 0)");
      }
    }
  }

  // Decode queries are few: the CPU kernel reads a float32 copy, the CUDA kernel converts
  // as it reads. Both need head_dim contiguous.
  const at::Tensor q_rows = q.size(3) <= 1 || q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor qf = q.is_cpu() ? q_rows.to(at::kFloat) : q_rows;
  const at::Tensor kmin = key_min.contiguous(), kmax = key_max.contiguous();
  at::Tensor scores = at::empty({batch, heads_kv, max_pages}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  PageScoresParams p{};
  p.q = qf.data_ptr();
  p.q_dtype = dtype_of(qf, "q");
  p.q_strides = strides_of(qf);
  p.key_min = kmin.data_ptr<float>();
  p.key_max = kmax.data_ptr<float>();
  p.block_table = rows;
  p.cache_seqlens = len;
  p.scores = scores.data_ptr<float>();
  p.batch = int(batch);
  p.seqlen_q = int(seqlen_q);
  p.heads_q = int(heads_q);
  p.heads_kv = int(heads_kv);
  p.head_dim = int(head_dim);
  p.num_pages = int(num_pages);
  p.max_pages = int(max_pages);
  p.page_size = int(page_size);
  p.scale = float(scale);
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    cuda::page_scores(p, c10::cuda::getCurrentCUDAStream().stream());
    return scores;
  }
#endif
  cpu::page_scores(p);
  return scores;
}

at::Tensor select_pages(const at::Tensor& scores, int64_t top_k, int64_t sink_pages, int64_t recent_pages) {
  check_rank(scores, 3, "scores", "(batch, kv_heads, max_pages)");
  check_float32(scores, "scores");
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(sink_pages >= 0, "sink_pages must be >= 0, got ", sink_pages);
  TORCH_CHECK_VALUE(recent_pages >= 0, "recent_pages must be >= 0, got ", recent_pages);
  const int64_t width = top_k + sink_pages + recent_pages;
  TORCH_CHECK_VALUE(width <= INT32_MAX, "top_k + sink_pages + recent_pages must fit in int32, got ", width);
  TORCH_CHECK_NOT_IMPLEMENTED(scores.is_cpu() || scores.is_cuda(), "attnkit.select_pages has no kernel for ",
                              scores.device());
  TORCH_CHECK_VALUE(scores.size(0) * scores.size(1) <= INT32_MAX && scores.size(2) <= INT32_MAX,
                    "scores must have fewer than 2^31 rows (batch x kv_heads) and pages, got shape ", scores.sizes());
  at::Tensor pages = at::empty({scores.size(0), scores.size(1), width}, scores.options().dtype(at::kInt));
  if (pages.numel() == 0) return pages;
  const at::Tensor s = scores.contiguous();
  SelectPagesParams p{};
  p.scores = s.data_ptr<float>();
  p.pages = pages.data_ptr<int32_t>();
  p.rows = scores.size(0) * scores.size(1);
  p.max_pages = int(scores.size(2));
  p.top_k = int(top_k);
  p.sink_pages = int(sink_pages);
  p.recent_pages = int(recent_pages);
#ifdef ATTNKIT_WITH_CUDA
  if (scores.is_cuda()) {
    const c10::cuda::CUDAGuard guard(scores.device());
    cuda::select_pages(p, c10::cuda::getCurrentCUDAStream().stream());
    return pages;
  }
#endif
  cpu::select_pages(p);
  return pages;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit, m) {
  m.def(
      "page_scores(Tensor q, Tensor key_min, Tensor key_max, Tensor block_table, Tensor cache_seqlens, "
      "int page_size, float scale) -> Tensor");
  m.def("select_pages(Tensor scores, int top_k, int sink_pages, int recent_pages) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("page_scores", &page_scores);
  m.impl("select_pages", &select_pages);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("page_scores", &page_scores);
  m.impl("select_pages", &select_pages);
}
#endif

}  // namespace attnkit::binding
