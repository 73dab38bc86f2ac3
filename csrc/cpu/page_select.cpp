// CPU page selection for sparse decode: Quest page scores (the bound math is
// attnkit/quest.h, shared with CUDA) and the top-k choice of pages per (sequence, kv head)
// (the order and row layout are attnkit/page_order.h, shared with CUDA).
#include "cpu/page_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "attnkit/page_order.h"
#include "attnkit/quest.h"

namespace attnkit::cpu {

void page_scores(const PageScoresParams& p) {
  if (p.q_dtype != DType::kFloat32) throw std::invalid_argument("attnkit: the CPU page_scores reads float32 q");
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int group = p.heads_q / p.heads_kv;
  const int64_t items = int64_t(p.batch) * p.heads_kv * p.max_pages;  // (b, g, page), row-major
  at::parallel_for(0, items, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int page = int(i % p.max_pages);
      const int g = int(i / p.max_pages % p.heads_kv);
      const int b = int(i / (int64_t(p.max_pages) * p.heads_kv));
      const int64_t valid = (int64_t(p.cache_seqlens[b]) + p.page_size - 1) / p.page_size;
      if (page >= valid) {
        p.scores[i] = kNegInf;
        continue;
      }
      const int64_t phys = p.block_table[int64_t(b) * p.max_pages + page];
      const int64_t meta = (phys * p.heads_kv + g) * p.head_dim;
      float best = kNegInf;
      for (int s = 0; s < p.seqlen_q; ++s)
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const float* q = static_cast<const float*>(p.q) + b * p.q_strides.batch + s * p.q_strides.row + h * p.q_strides.head;
          best = std::max(best, quest_page_bound(q, p.key_min + meta, p.key_max + meta, p.head_dim, p.scale));
        }
      p.scores[i] = best;
    }
  });
}

void select_pages(const SelectPagesParams& p) {
  const int width = p.top_k + p.sink_pages + p.recent_pages;
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> candidates;
    for (int64_t r = begin; r < end; ++r) {
      const float* scores = p.scores + r * p.max_pages;
      int32_t* out = p.pages + r * width;
      int valid = 0;
      while (valid < p.max_pages && !is_past_end(scores[valid])) ++valid;
      const PageSelection sel = page_selection(valid, p.top_k, p.sink_pages, p.recent_pages);
      candidates.resize(sel.candidates());
      std::iota(candidates.begin(), candidates.end(), sel.sink_end);
      auto before = [&](int32_t a, int32_t b) { return page_rank(scores[a], a) > page_rank(scores[b], b); };
      std::partial_sort(candidates.begin(), candidates.begin() + sel.top, candidates.end(), before);
      std::sort(candidates.begin(), candidates.begin() + sel.top);
      for (int w = 0; w < width; ++w)
        out[w] = sel.is_top_slot(w) ? candidates[w - sel.sink_end] : sel.fixed_page(w);
    }
  });
}

}  // namespace attnkit::cpu
