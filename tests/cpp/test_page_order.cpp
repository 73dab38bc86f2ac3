// Unit tests of the select_pages rules (attnkit/page_order.h) and the key bound upkeep of
// the paged cache append (attnkit/quest.h), the math the CPU and CUDA kernels share:
// the score key orders like the scores (NaN last, -0 == +0), page_rank breaks ties to the
// lower page, the row layout matches a plain set-based selection, and folding keys into
// page bounds behaves as std::min / std::max. Run by ctest.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "attnkit/page_order.h"
#include "attnkit/quest.h"
#include "expect.h"

namespace {

using attnkit::page_rank;
using attnkit::page_score_key;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

void test_score_key() {
  const float ascending[] = {-kInf, -std::numeric_limits<float>::max(), -1e10f, -1.f, -1e-30f,
                             -std::numeric_limits<float>::denorm_min(), 0.f,
                             std::numeric_limits<float>::denorm_min(), 1e-30f, 1.f, 3.5f, 1e10f,
                             std::numeric_limits<float>::max(), kInf};
  const int n = sizeof(ascending) / sizeof(float);
  EXPECT(page_score_key(kNaN) == 0u, "NaN key %u", page_score_key(kNaN));
  EXPECT(page_score_key(-kNaN) == 0u, "negative NaN key %u", page_score_key(-kNaN));
  EXPECT(page_score_key(-0.f) == page_score_key(0.f), "-0 and +0 share a key");
  for (int i = 0; i < n; ++i) {
    EXPECT(page_score_key(ascending[i]) > 0u, "number %g above NaN", ascending[i]);
    if (i > 0)
      EXPECT(page_score_key(ascending[i - 1]) < page_score_key(ascending[i]), "key(%g) < key(%g)", ascending[i - 1],
             ascending[i]);
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 100.f);
  for (int t = 0; t < 100000; ++t) {
    const float a = normal(rng), b = t % 3 ? normal(rng) : a;
    EXPECT((a < b) == (page_score_key(a) < page_score_key(b)) && (a == b) == (page_score_key(a) == page_score_key(b)),
           "order of %g and %g", a, b);
  }
}

void test_rank() {
  EXPECT(page_rank(1.f, 3) > page_rank(1.f, 4), "ties to the lower page");
  EXPECT(page_rank(0.f, 9) > page_rank(-0.f, 10) && page_rank(-0.f, 2) > page_rank(0.f, 3), "-0 ties with +0");
  EXPECT(page_rank(2.f, 1000) > page_rank(1.f, 0), "score first");
  EXPECT(page_rank(-kInf, 5) > page_rank(kNaN, 0), "NaN last");
  EXPECT(page_rank(kNaN, 0) > page_rank(kNaN, 1), "NaN ties to the lower page");
  EXPECT(page_rank(0.f, 0) > page_rank(0.f, std::numeric_limits<int>::max()), "largest page index");
}

// The row select_pages writes for `valid` pages when the top candidates are `top`
// (ascending), built from sets as attnkit.reference.select_pages does.
std::vector<int> plain_row(int valid, const std::vector<int>& top, int sink, int recent, int width) {
  std::set<int> keep(top.begin(), top.end());
  for (int j = 0; j < std::min(sink, valid); ++j) keep.insert(j);
  for (int j = std::max(valid - recent, 0); j < valid; ++j) keep.insert(j);
  std::vector<int> row(keep.begin(), keep.end());
  row.resize(width, -1);
  return row;
}

void test_selection_layout() {
  int cases = 0;
  for (int valid = 0; valid <= 12; ++valid)
    for (int top_k = 0; top_k <= 14; top_k += 1 + top_k / 3)
      for (int sink = 0; sink <= 5; ++sink)
        for (int recent = 0; recent <= 5; ++recent) {
          const attnkit::PageSelection s = attnkit::page_selection(valid, top_k, sink, recent);
          const int width = top_k + sink + recent;
          EXPECT(s.sink_end == std::min(sink, valid) && s.recent_begin >= s.sink_end && s.recent_begin <= valid,
                 "bounds valid=%d sink=%d recent=%d", valid, sink, recent);
          EXPECT(s.top == std::min(top_k, s.candidates()), "top valid=%d top_k=%d", valid, top_k);
          // Take the last `top` candidates as the chosen ones: any choice lays out the same.
          std::vector<int> top;
          for (int j = s.recent_begin - s.top; j < s.recent_begin; ++j) top.push_back(j);
          const std::vector<int> want = plain_row(valid, top, sink, recent, width);
          for (int w = 0; w < width; ++w) {
            const int got = s.is_top_slot(w) ? top[w - s.sink_end] : s.fixed_page(w);
            EXPECT(got == want[w], "valid=%d top_k=%d sink=%d recent=%d slot %d: %d != %d", valid, top_k, sink,
                   recent, w, got, want[w]);
          }
          ++cases;
        }
  EXPECT(cases > 1000, "%d cases", cases);
  EXPECT(attnkit::is_past_end(-kInf) && !attnkit::is_past_end(kNaN) && !attnkit::is_past_end(-1e38f),
         "only -inf ends a row");
}

void test_fold() {
  float lo, hi;
  attnkit::quest_empty_bounds(lo, hi);
  EXPECT(lo == kInf && hi == -kInf, "empty bounds");
  attnkit::quest_fold_key(lo, hi, kNaN);
  EXPECT(lo == kInf && hi == -kInf, "NaN leaves empty bounds");
  for (float x : {2.f, -3.f, kNaN, 5.f, 0.5f}) attnkit::quest_fold_key(lo, hi, x);
  EXPECT(lo == -3.f && hi == 5.f, "min / max [%g, %g]", lo, hi);
  attnkit::quest_empty_bounds(lo, hi);
  attnkit::quest_fold_key(lo, hi, -0.f);
  attnkit::quest_fold_key(lo, hi, 0.f);
  EXPECT(std::signbit(lo) && std::signbit(hi), "the first of -0 / +0 stays");
  attnkit::quest_empty_bounds(lo, hi);
  attnkit::quest_fold_key(lo, hi, 0.f);
  attnkit::quest_fold_key(lo, hi, -0.f);
  EXPECT(!std::signbit(lo) && !std::signbit(hi), "the first of +0 / -0 stays");
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  attnkit::quest_empty_bounds(lo, hi);
  float want_lo = kInf, want_hi = -kInf;
  for (int i = 0; i < 1000; ++i) {
    const float x = normal(rng);
    attnkit::quest_fold_key(lo, hi, x);
    want_lo = std::min(want_lo, x);
    want_hi = std::max(want_hi, x);
  }
  EXPECT(lo == want_lo && hi == want_hi, "as std::min / std::max");
}

}  // namespace

int main() {
  test_score_key();
  test_rank();
  test_selection_layout();
  test_fold();
  if (failures == 0) std::printf("test_page_order: ok\n");
  return failures == 0 ? 0 : 1;
}
