// CPU page selection for sparse decode: Quest page scores (the bound math is
// attnkit/quest.h, shared with CUDA) and the top-k choice of pages per (sequence, kv head).
#include "cpu/page_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attnkit/quest.h"

namespace attnkit::cpu {

void page_scores(const PageScoresParams& p) {
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
          const float* q = p.q + b * p.q_strides.batch + s * p.q_strides.row + h * p.q_strides.head;
          best = std::max(best, quest_page_bound(q, p.key_min + meta, p.key_max + meta, p.head_dim, p.scale));
        }
      p.scores[i] = best;
    }
  });
}

namespace {

// Valid pages are the leading ones whose score is not -inf (page_scores writes -inf exactly
// at and past a sequence's end).
int valid_pages(const float* scores, int max_pages) {
  int n = 0;
  while (n < max_pages && !(std::isinf(scores[n]) && scores[n] < 0)) ++n;
  return n;
}

}  // namespace

void select_pages(const SelectPagesParams& p) {
  const int width = p.top_k + p.sink_pages + p.recent_pages;
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> middle;
    for (int64_t r = begin; r < end; ++r) {
      const float* scores = p.scores + r * p.max_pages;
      int32_t* out = p.pages + r * width;
      const int n = valid_pages(scores, p.max_pages);
      const int sink_end = std::min(p.sink_pages, n);
      const int recent_begin = std::max(n - p.recent_pages, sink_end);
      // Pages strictly between the sinks and the recents compete for top_k: higher score
      // first, ties (and NaN, ranked last) by lower page index.
      middle.clear();
      for (int j = sink_end; j < recent_begin; ++j) middle.push_back(j);
      const int k = std::min<int>(p.top_k, int(middle.size()));
      auto better = [&](int32_t a, int32_t b) {
        const float sa = scores[a], sb = scores[b];
        const bool na = std::isnan(sa), nb = std::isnan(sb);
        if (na != nb) return nb;
        if (!na && sa != sb) return sa > sb;
        return a < b;
      };
      std::partial_sort(middle.begin(), middle.begin() + k, middle.end(), better);
      std::sort(middle.begin(), middle.begin() + k);
      int w = 0;
      for (int j = 0; j < sink_end; ++j) out[w++] = j;
      for (int i = 0; i < k; ++i) out[w++] = middle[i];
      for (int j = recent_begin; j < n; ++j) out[w++] = j;
      while (w < width) out[w++] = -1;
    }
  });
}

}  // namespace attnkit::cpu
