// Neighborhood attention windows (NATTEN semantics, with dilation, stride and per-axis causal),
// once for the CPU and CUDA kernels and the C++ unit tests. docs/neighborhood.md states the
// rule; python/attnkit/reference.py (neighborhood_mask) is its independent oracle.
//
// Tokens lie on a 1-, 2- or 3-D grid, flattened row-major (the last spatial axis fastest).
// Each axis is handled on its own and the neighbourhood of a query is the product of its
// per-axis windows. On one axis of length L, with kernel K, dilation d and stride s:
//  - position x belongs to dilation group g = x % d, at index x / d inside the group, and
//    only sees keys of its own group; the group holds n = ceil((L - g) / d) positions.
//  - inside the group the queries are cut into stride groups of s consecutive indices, and
//    every query of a stride group takes the window of the group's leader (its centre,
//    the right one of two for even s; causal: its last index), clamped to n - 1.
//  - non-causal: the window is the K indices [start, start + K) with
//    start = clamp(leader - K / 2, 0, n - K): windows shift inward at the borders, so every
//    query sees exactly K keys (K / 2 before the leader, K - 1 - K / 2 after it).
//  - causal: the keys j with leader - K < j <= query index: at most K keys ending at the
//    query itself, fewer near the start (and, with stride, the earlier queries of a stride
//    group see fewer than its leader).
// Valid arguments (checked by the binding): 1 <= K, K * d <= L, 1 <= s <= K.
#pragma once

#include <cstdint>

#include "attnkit/macros.h"

namespace attnkit {

constexpr int kMaxSpatialRank = 3;

// Positions first, first + step, ... (count of them) of one axis.
struct AxisRange {
  int first;
  int count;
  int step;
  ATTNKIT_HD int last() const { return first + (count - 1) * step; }
  ATTNKIT_HD bool contains(int x) const {
    return count > 0 && x >= first && x <= last() && (step == 1 || (x - first) % step == 0);
  }
};

// The window rule of one spatial axis.
struct AxisWindow {
  int length = 1;
  int kernel = 1;
  int dilation = 1;
  int stride = 1;
  bool causal = false;

  ATTNKIT_HD int group_length(int group) const { return (length - group + dilation - 1) / dilation; }

  // Index of the stride-group leader of in-group index i (n = group length).
  ATTNKIT_HD int leader(int i, int n) const {
    const int first = i / stride * stride;
    const int lead = first + (causal ? stride - 1 : stride / 2);
    return lead < n - 1 ? lead : n - 1;
  }

  // Window of in-group query index i as in-group key indices [begin, end).
  ATTNKIT_HD void window(int i, int n, int& begin, int& end) const {
    const int lead = leader(i, n);
    if (causal) {
      begin = lead - kernel + 1 > 0 ? lead - kernel + 1 : 0;
      end = i + 1;
    } else {
      begin = lead - kernel / 2;
      begin = begin < 0 ? 0 : begin > n - kernel ? n - kernel : begin;
      end = begin + kernel;
    }
  }

  // Keys (positions) seen by the query at position x.
  ATTNKIT_HD AxisRange keys_of(int x) const {
    const int group = x % dilation, n = group_length(group);
    int begin, end;
    window(x / dilation, n, begin, end);
    return {group + begin * dilation, end - begin, dilation};
  }

  // Queries (positions) that see the key at position y. Both ends of a window grow with
  // the query index, so they form one range of the key's group, found by bisection.
  ATTNKIT_HD AxisRange queries_of(int y) const {
    const int group = y % dilation, n = group_length(group), j = y / dilation;
    // First query whose window ends after j, and first query whose window starts after j.
    int lo = 0, hi = n;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      int b, e;
      window(mid, n, b, e);
      if (e > j) hi = mid; else lo = mid + 1;
    }
    const int first = lo;
    hi = n;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      int b, e;
      window(mid, n, b, e);
      if (b > j) hi = mid; else lo = mid + 1;
    }
    return {group + first * dilation, lo - first, dilation};
  }

  // Smallest contiguous position range [begin, end) holding every key of the queries at
  // positions [q_begin, q_end) (all dilation groups): a tile's key span on this axis.
  // Within a group windows are monotone, so each group's first and last query bound it.
  ATTNKIT_HD void key_span(int q_begin, int q_end, int& begin, int& end) const {
    begin = length;
    end = 0;
    for (int x = q_begin; x < q_end && x < q_begin + dilation; ++x) {
      const AxisRange r = keys_of(x);
      begin = r.first < begin ? r.first : begin;
    }
    for (int x = q_end - 1; x >= q_begin && x >= q_end - dilation; --x) {
      const AxisRange r = keys_of(x);
      end = r.last() + 1 > end ? r.last() + 1 : end;
    }
    if (end < begin) end = begin;
  }

  // Smallest contiguous position range [begin, end) holding every query that sees a key at
  // positions [k_begin, k_end): a key tile's query span on this axis, for the backward.
  // Within a group the queries of a key are monotone in the key, so each group's first and
  // last key bound it.
  ATTNKIT_HD void query_span(int k_begin, int k_end, int& begin, int& end) const {
    begin = length;
    end = 0;
    for (int y = k_begin; y < k_end && y < k_begin + dilation; ++y) {
      const AxisRange r = queries_of(y);
      if (r.count > 0 && r.first < begin) begin = r.first;
    }
    for (int y = k_end - 1; y >= k_begin && y >= k_end - dilation; --y) {
      const AxisRange r = queries_of(y);
      if (r.count > 0 && r.last() + 1 > end) end = r.last() + 1;
    }
    if (end < begin) end = begin;
  }

  // Keys seen by every query at positions [q_begin, q_end), as [begin, end) (empty if none):
  // both window ends grow with the query, so the last query's begin and the first query's
  // end bound it. Dilation > 1 interleaves groups, so no key is common to a range of two or
  // more queries: it reports none then (callers use it to skip masks, so "none" is safe).
  ATTNKIT_HD void common_keys(int q_begin, int q_end, int& begin, int& end) const {
    const AxisRange first = keys_of(q_begin), last = keys_of(q_end - 1);
    begin = last.first;
    end = first.last() + 1;
    if (dilation > 1 && (q_end - q_begin > 1 || first.count > 1)) end = begin;
  }
};

// A box of grid positions: one AxisRange per spatial axis.
struct GridBox {
  AxisRange axis[kMaxSpatialRank];
};

// The neighbourhood rule of a 1-3 D grid; unused trailing axes have length 1 and kernel 1.
struct Neighborhood {
  int rank = 1;
  AxisWindow axis[kMaxSpatialRank];

  ATTNKIT_HD int64_t tokens() const {
    int64_t n = 1;
    for (int a = 0; a < rank; ++a) n *= axis[a].length;
    return n;
  }

  // Row-major flattening, last axis fastest; unused axes get coordinate 0. (Loops run over
  // all kMaxSpatialRank axes so that GPU code unrolls them and keeps arrays in registers.)
  ATTNKIT_HD void coords_of(int64_t token, int* coords) const {
    for (int a = kMaxSpatialRank - 1; a >= 0; --a) {
      coords[a] = 0;
      if (a < rank) {
        coords[a] = int(token % axis[a].length);
        token /= axis[a].length;
      }
    }
  }
  ATTNKIT_HD int64_t token_of(const int* coords) const {
    int64_t t = 0;
    for (int a = 0; a < kMaxSpatialRank; ++a)
      if (a < rank) t = t * axis[a].length + coords[a];
    return t;
  }

  ATTNKIT_HD GridBox keys_of(int64_t query) const {
    int c[kMaxSpatialRank];
    coords_of(query, c);
    GridBox box;
    for (int a = 0; a < kMaxSpatialRank; ++a) box.axis[a] = a < rank ? axis[a].keys_of(c[a]) : AxisRange{0, 1, 1};
    return box;
  }

  ATTNKIT_HD GridBox queries_of(int64_t key) const {
    int c[kMaxSpatialRank];
    coords_of(key, c);
    GridBox box;
    for (int a = 0; a < kMaxSpatialRank; ++a)
      box.axis[a] = a < rank ? axis[a].queries_of(c[a]) : AxisRange{0, 1, 1};
    return box;
  }

  ATTNKIT_HD bool sees(int64_t query, int64_t key) const {
    int qc[kMaxSpatialRank], kc[kMaxSpatialRank];
    coords_of(query, qc);
    coords_of(key, kc);
    for (int a = 0; a < kMaxSpatialRank; ++a)
      if (a < rank && !axis[a].keys_of(qc[a]).contains(kc[a])) return false;
    return true;
  }

  // Calls fn(token) for every token of box, in increasing token order.
  template <typename Fn>
  ATTNKIT_HD void for_each(const GridBox& box, Fn&& fn) const {
    const AxisRange &r0 = box.axis[0], &r1 = box.axis[1], &r2 = box.axis[2];
    const int64_t len1 = rank > 1 ? axis[1].length : 1, len2 = rank > 2 ? axis[2].length : 1;
    for (int i0 = 0; i0 < r0.count; ++i0)
      for (int i1 = 0; i1 < r1.count; ++i1) {
        const int64_t row = (int64_t(r0.first + i0 * r0.step) * len1 + r1.first + i1 * r1.step) * len2;
        for (int i2 = 0; i2 < r2.count; ++i2) fn(row + r2.first + i2 * r2.step);
      }
  }
};

// Tokens [begin, end) of the flattened grid as a bounding box: per axis [lo, hi) positions.
ATTNKIT_HD void token_bounds(const Neighborhood& nb, int64_t begin, int64_t end, int* lo, int* hi) {
  int first[kMaxSpatialRank], last[kMaxSpatialRank];
  nb.coords_of(begin, first);
  nb.coords_of(end - 1, last);
  bool spread = false;  // an outer axis already differs: this one spans its whole length
  for (int a = 0; a < kMaxSpatialRank; ++a) {
    lo[a] = spread ? 0 : first[a];
    hi[a] = spread ? nb.axis[a].length : last[a] + 1;
    spread = spread || first[a] != last[a];
  }
}

// Which side of the attention matrix a TileWalk walks.
enum class TileSide {
  kKeys,     // the key tiles that a query range may need (the forward)
  kQueries,  // the query tiles whose queries may see a key range (the backward)
};

// The tiles (of `block` consecutive flattened tokens) on `side` that may pair with tokens
// [begin, end) of the other side: those meeting the box of the range's per-axis spans
// (key_span or query_span). The box is cut into lines along the last axis; each line is a
// contiguous token range, so its tiles form a range, and lines come in increasing token
// order. next() returns them in increasing order without repeats (two short lines may share
// a tile), then -1.
struct TileWalk {
  int rank;
  int lengths[kMaxSpatialRank];
  int lo[kMaxSpatialRank], hi[kMaxSpatialRank];  // the box on `side`
  int last_lo, last_hi;   // the box on the last axis (axis rank - 1)
  int line[2];            // leading coordinates of the next line (axes 0 .. rank - 2)
  int64_t tile, tile_end;  // tiles of the current line not yet returned
  int block;

  ATTNKIT_HD TileWalk(const Neighborhood& nb, int64_t begin, int64_t end, int block_, TileSide side)
      : rank(nb.rank), last_lo(0), last_hi(0), tile(0), tile_end(0), block(block_) {
    int from_lo[kMaxSpatialRank], from_hi[kMaxSpatialRank];
    token_bounds(nb, begin, end, from_lo, from_hi);
    for (int a = 0; a < kMaxSpatialRank; ++a) {
      lengths[a] = a < rank ? nb.axis[a].length : 1;
      lo[a] = 0, hi[a] = 1;
      if (a < rank && side == TileSide::kKeys) nb.axis[a].key_span(from_lo[a], from_hi[a], lo[a], hi[a]);
      if (a < rank && side == TileSide::kQueries) nb.axis[a].query_span(from_lo[a], from_hi[a], lo[a], hi[a]);
      if (a == rank - 1) last_lo = lo[a], last_hi = hi[a];
    }
    line[0] = rank > 1 ? lo[0] : 0;
    line[1] = rank > 2 ? lo[1] : 0;
  }

  ATTNKIT_HD int64_t next() {
    while (tile >= tile_end) {
      if (rank > 1 && line[0] >= hi[0]) return -1;
      if (rank == 1 && line[0] > 0) return -1;
      // Token of (line, lo) on the last axis.
      int64_t base = 0;
      if (rank == 2) base = int64_t(line[0]) * lengths[1];
      if (rank == 3) base = (int64_t(line[0]) * lengths[1] + line[1]) * lengths[2];
      const int64_t first_tile = (base + last_lo) / block;
      tile_end = (base + last_hi - 1) / block + 1;
      tile = tile > first_tile ? tile : first_tile;
      // Advance to the following line.
      if (rank == 3 && ++line[1] < hi[1]) continue;
      if (rank == 3) line[1] = lo[1];
      ++line[0];
    }
    return tile++;
  }
};

// True when every query of tokens [q_begin, q_end) sees every key of tokens [k_begin, k_end)
// (both ranges inside the grid), so a tile needs no per-element mask. Conservative: judged
// on bounding boxes.
ATTNKIT_HD bool tile_fully_visible(const Neighborhood& nb, int64_t q_begin, int64_t q_end, int64_t k_begin,
                                   int64_t k_end) {
  int qlo[kMaxSpatialRank], qhi[kMaxSpatialRank], klo[kMaxSpatialRank], khi[kMaxSpatialRank];
  token_bounds(nb, q_begin, q_end, qlo, qhi);
  token_bounds(nb, k_begin, k_end, klo, khi);
  for (int a = 0; a < kMaxSpatialRank; ++a) {
    if (a >= nb.rank) break;
    int begin, end;
    nb.axis[a].common_keys(qlo[a], qhi[a], begin, end);
    if (klo[a] < begin || khi[a] > end) return false;
  }
  return true;
}

ATTNKIT_HD int64_t box_size(const GridBox& box) {
  return int64_t(box.axis[0].count) * box.axis[1].count * box.axis[2].count;
}

}  // namespace attnkit
