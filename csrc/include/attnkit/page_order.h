// The rules of select_pages, shared by the CPU and CUDA kernels so both choose the very same
// pages: which scores end a row, the order of pages (score, then lower index; NaN last) as
// one integer key, and where sinks, top pages, recent pages and padding go in a row.
// Torch-free.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "attnkit/macros.h"

namespace attnkit {

// page_scores writes -inf exactly at and past a sequence's end; a row's valid pages are
// the ones before its first -inf.
ATTNKIT_HD bool is_past_end(float score) { return score == -std::numeric_limits<float>::infinity(); }

ATTNKIT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// Orderable key of a score: a larger score gets a larger key, -0 and +0 (equal scores)
// share one key, and NaN gets 0, below every number. Flipping the sign bit of a positive
// float and every bit of a negative one makes unsigned order match float order.
ATTNKIT_HD uint32_t page_score_key(float score) {
  if (score != score) return 0u;
  const uint32_t bits = float_bits(score == 0.f ? 0.f : score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Total order of the candidate pages of a row: higher rank = chosen first. Score key in
// the high word, the complemented page index in the low word (ties to the lower index), so
// distinct pages never tie.
ATTNKIT_HD uint64_t page_rank(float score, int page) {
  return (uint64_t(page_score_key(score)) << 32) | (0xFFFFFFFFu - uint32_t(page));
}

// One row of select_pages with `valid` pages: sinks [0, sink_end), candidates
// [sink_end, recent_begin) of which `top` are chosen, recents [recent_begin, valid).
// Output slots: sinks, the chosen candidates ascending, recents, then -1 padding.
struct PageSelection {
  int valid;
  int sink_end;
  int recent_begin;
  int top;

  ATTNKIT_HD int candidates() const { return recent_begin - sink_end; }
  ATTNKIT_HD bool is_top_slot(int slot) const { return slot >= sink_end && slot < sink_end + top; }
  // The page of an output slot outside the top block: a sink, a recent page or -1.
  ATTNKIT_HD int32_t fixed_page(int slot) const {
    if (slot < sink_end) return slot;
    const int page = slot - sink_end - top + recent_begin;
    return page < valid ? page : -1;
  }
};

ATTNKIT_HD PageSelection page_selection(int valid, int top_k, int sink_pages, int recent_pages) {
  PageSelection s;
  s.valid = valid;
  s.sink_end = sink_pages < valid ? sink_pages : valid;
  s.recent_begin = valid - recent_pages > s.sink_end ? valid - recent_pages : s.sink_end;
  s.top = top_k < s.candidates() ? top_k : s.candidates();
  return s;
}

}  // namespace attnkit
