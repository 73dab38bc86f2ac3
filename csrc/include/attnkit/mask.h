// Which keys a query row may see: causal (bottom-right aligned), sliding window and sink
// tokens; and the ALiBi bias of a logit. One definition used by the CPU kernels, the CUDA
// kernels and the C++ unit tests.
// docs/semantics.md states the rule; python/attnkit/reference.py is its oracle.
#pragma once

#include <cstdint>

#include "attnkit/macros.h"

namespace attnkit {

// A half-open index range [begin, end): keys of a query, queries of a key block, tiles.
struct KeyRange {
  int begin;  // first visible key
  int end;    // one past the last visible key; end <= begin means the row sees nothing
  ATTNKIT_HD bool empty() const { return end <= begin; }
  ATTNKIT_HD bool contains(int j) const { return j >= begin && j < end; }
};

using RowRange = KeyRange;

// A tile's key bits (bit c: key c of the tile) when a walk visits all its keys; a sparse walk
// may visit only some (attnkit/block_sparse.h: listed_keys).
constexpr uint64_t kAllKeys = ~uint64_t(0);

// Tiles of `tile` indices that intersect r: [first tile, one past the last tile).
ATTNKIT_HD KeyRange tiles_of(KeyRange r, int tile) {
  if (r.empty()) return {0, 0};
  return {r.begin / tile, (r.end + tile - 1) / tile};
}

// Mask of one (sequence, head): seqlen_q queries against seqlen_k keys.
// window_left / window_right = -1 means unbounded; causal forces window_right = 0.
// sink_tokens = n (StreamingLLM's attention sinks, FA3's sink_token_length): with a left
// window, keys 0 .. n - 1 stay visible to every row whose window reaches past them on the
// right (a row sees its window [begin, end) and the sinks [0, min(n, end))).
struct AttentionMask {
  int seqlen_q;
  int seqlen_k;
  int window_left;
  int window_right;
  int sink_tokens;  // 0 unless window_left bounds the rows

  ATTNKIT_HD AttentionMask(int seqlen_q_, int seqlen_k_, bool causal, int window_left_,
                           int window_right_, int sink_tokens_ = 0)
      : seqlen_q(seqlen_q_),
        seqlen_k(seqlen_k_),
        window_left(unbounded_if_past_all(window_left_, seqlen_q_, seqlen_k_)),
        window_right(causal ? 0 : unbounded_if_past_all(window_right_, seqlen_q_, seqlen_k_)),
        sink_tokens(window_left >= 0 ? sink_tokens_ : 0) {}

  // A window of at least max(seqlen_q, seqlen_k) hides no key (a row's diagonal lies in
  // [seqlen_k - seqlen_q, seqlen_k - 1]), so it is unbounded. Mapping it to -1 keeps every
  // sum below (d - window_left, d + window_right + 1, ...) inside int32 for any int window.
  ATTNKIT_HD static int unbounded_if_past_all(int window, int seqlen_q, int seqlen_k) {
    return window >= seqlen_q && window >= seqlen_k ? -1 : window;
  }

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

  // The sink keys a row with window range `keys` sees: [0, sink_end(keys)). A row whose
  // window is empty has keys.end == 0 (an empty row lies left of key 0: the window ends
  // before it, since a left window cannot pass seqlen_k), so it sees no sink either.
  ATTNKIT_HD int sink_end(KeyRange keys) const { return sink_tokens < keys.end ? sink_tokens : keys.end; }

  // Whether a row with window range `keys` sees key j (its window or a sink).
  ATTNKIT_HD bool sees(KeyRange keys, int j) const { return keys.contains(j) || (j >= 0 && j < sink_end(keys)); }

  // Union of the sink keys of queries [q_begin, q_end): the last row's, whose end is the
  // largest. Key tiles below the window union hold only these.
  ATTNKIT_HD KeyRange sink_keys_of_rows(int q_begin, int q_end) const {
    return {0, q_end > q_begin ? sink_end(keys_of(q_end - 1)) : 0};
  }

  // Union of the window key ranges of queries [q_begin, q_end): both ends are monotone in the
  // query index, so the first and last rows bound it. Empty if every row is empty.
  ATTNKIT_HD KeyRange keys_of_rows(int q_begin, int q_end) const {
    KeyRange first = keys_of(q_begin), last = keys_of(q_end - 1);
    int begin = first.begin, end = last.end;
    // Skip leading empty rows (their range collapses to a point that may lie past end).
    if (first.empty()) begin = last.empty() ? end : first_nonempty_begin(q_begin, q_end);
    if (end < begin) end = begin;
    return {begin, end};
  }

  // Queries that see at least one key of [k_begin, k_end) (the backward's rows of a key
  // block). Both ends of keys_of are monotone, so the set is one range: rows whose end
  // passes k_begin and whose begin stays below k_end (or, when k_begin is a sink, any
  // later row: sinks have no upper row bound). Such rows are never empty.
  ATTNKIT_HD RowRange rows_of_keys(int k_begin, int k_end) const {
    if (k_begin < 0) k_begin = 0;
    if (k_end > seqlen_k) k_end = seqlen_k;
    if (k_end <= k_begin || seqlen_q <= 0) return {0, 0};
    const int shift = seqlen_k - seqlen_q;  // diagonal(i) = i + shift
    int begin = 0, end = seqlen_q;
    // end(i) = d + window_right + 1 > k_begin  <=>  i >= k_begin - window_right - shift
    if (window_right >= 0 && k_begin - window_right - shift > begin) begin = k_begin - window_right - shift;
    // begin(i) = d - window_left < k_end  <=>  i < k_end + window_left - shift
    if (window_left >= 0 && k_begin >= sink_tokens && k_end + window_left - shift < end)
      end = k_end + window_left - shift;
    if (end < begin) end = begin;
    return {begin, end};
  }

  // True when every query of [q_begin, q_end) sees every key of [k_begin, k_end), so a
  // tile needs no per-element mask. The key range must lie inside the sequence.
  ATTNKIT_HD bool block_fully_visible(int q_begin, int q_end, int k_begin, int k_end) const {
    if (q_end > seqlen_q) q_end = seqlen_q;
    if (q_end <= q_begin) return true;  // no real rows: nothing to mask
    if (k_end > seqlen_k) return false;
    const KeyRange first = keys_of(q_begin), last = keys_of(q_end - 1);
    // begins and ends grow with the row: the last row's begin is the largest, the first
    // row's end the smallest. Keys below sink_tokens need only the end bound.
    const int first_non_sink = k_begin > sink_tokens ? k_begin : sink_tokens;
    return (last.begin <= first_non_sink || k_end <= sink_tokens) && first.end >= k_end && !first.empty();
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

// ALiBi (Press et al.), FlashAttention's definition: the logit of query i and key j gains
// -slope * |i + seqlen_k - seqlen_q - j| = -slope * |diagonal(i) - j|, after the softcap.
ATTNKIT_HD float alibi_bias(float slope, int diagonal, int key) {
  const float distance = float(diagonal - key);
  return -slope * (distance < 0.f ? -distance : distance);
}

}  // namespace attnkit
