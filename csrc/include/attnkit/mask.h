// Which keys a query row may see: causal (bottom-right aligned) and sliding window.
// One definition used by the CPU kernels, the CUDA kernels and the C++ unit tests.
// docs/semantics.md states the rule; python/attnkit/reference.py is its oracle.
#pragma once

#include "attnkit/macros.h"

namespace attnkit {

struct KeyRange {
  int begin;  // first visible key
  int end;    // one past the last visible key; end <= begin means the row sees nothing
  ATTNKIT_HD bool empty() const { return end <= begin; }
  ATTNKIT_HD bool contains(int j) const { return j >= begin && j < end; }
};

// Mask of one (sequence, head): seqlen_q queries against seqlen_k keys.
// window_left / window_right = -1 means unbounded; causal forces window_right = 0.
struct AttentionMask {
  int seqlen_q;
  int seqlen_k;
  int window_left;
  int window_right;

  ATTNKIT_HD AttentionMask(int seqlen_q_, int seqlen_k_, bool causal, int window_left_,
                           int window_right_)
      : seqlen_q(seqlen_q_),
        seqlen_k(seqlen_k_),
        window_left(window_left_),
        window_right(causal ? 0 : window_right_) {}

  // Bottom-right alignment: the last query sees up to the last key.
  ATTNKIT_HD int diagonal(int query) const { return query + seqlen_k - seqlen_q; }

  ATTNKIT_HD KeyRange keys_of(int query) const {
    const int d = diagonal(query);
    int begin = 0, end = seqlen_k;
    if (window_left >= 0 && d - window_left > begin) begin = d - window_left;
    if (window_right >= 0 && d + window_right + 1 < end) end = d + window_right + 1;
    if (end < begin) end = begin;
    return {begin, end};
  }

  // Union of the key ranges of queries [q_begin, q_end): both ends are monotone in the
  // query index, so the first and last rows bound it. Empty if every row is empty.
  ATTNKIT_HD KeyRange keys_of_rows(int q_begin, int q_end) const {
    KeyRange first = keys_of(q_begin), last = keys_of(q_end - 1);
    int begin = first.begin, end = last.end;
    // Skip leading empty rows (their range collapses to a point that may lie past end).
    if (first.empty()) begin = last.empty() ? end : first_nonempty_begin(q_begin, q_end);
    if (end < begin) end = begin;
    return {begin, end};
  }

 private:
  ATTNKIT_HD int first_nonempty_begin(int q_begin, int q_end) const {
    // Rows become non-empty once d + window_right >= 0 and d - window_left < seqlen_k;
    // with monotone ranges a short scan from the top finds the first visible row.
    for (int i = q_begin; i < q_end; ++i) {
      KeyRange r = keys_of(i);
      if (!r.empty()) return r.begin;
    }
    return keys_of(q_end - 1).end;
  }
};

}  // namespace attnkit
