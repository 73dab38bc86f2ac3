// Unit tests of the neighbourhood windows (attnkit/neighborhood.h) against the rule written
// out key by key (docs/neighborhood.md, NATTEN's definition): for every axis length up to 13,
// kernel, dilation, stride and causal flag, keys_of must list exactly the visible keys,
// queries_of exactly the queries that see a key, key_span the tight bound of a query range's
// keys; kernel == length (dilation 1, non-causal) must be full attention; and the N-D product
// (sees, keys_of, queries_of, for_each) must match the per-axis rule on random 2-D and 3-D
// grids, and the key-tile walk and fully-visible test of the CUDA kernel on random query
// ranges and tile sizes. Run by ctest; exits non-zero on failure.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "attnkit/neighborhood.h"
#include "expect.h"

namespace {

using attnkit::AxisRange;
using attnkit::AxisWindow;
using attnkit::GridBox;
using attnkit::Neighborhood;

// The rule, phrased as NATTEN's mask: same dilation group; non-causal: the key lies within
// K / 2 before or K - 1 - K / 2 after the window centre, the leader clamped away from the
// borders; causal: at or before the query and less than K before the leader.
bool visible(const AxisWindow& w, int x, int y) {
  const int d = w.dilation, K = w.kernel, s = w.stride;
  if (x % d != y % d) return false;
  const int n = (w.length - x % d + d - 1) / d, i = x / d, j = y / d;
  if (w.causal) {
    const int leader = std::min(i / s * s + s - 1, n - 1);
    return j <= i && leader - j < K;
  }
  const int leader = std::min(i / s * s + s / 2, n - 1);
  const int left = K / 2, right = K - 1 - K / 2;
  const int centre = std::clamp(leader, left, n - 1 - right);
  return (centre - j >= 0 && centre - j <= left) || (j - centre >= 0 && j - centre <= right);
}

std::vector<int> members(const AxisRange& r) {
  std::vector<int> v;
  for (int c = 0; c < r.count; ++c) v.push_back(r.first + c * r.step);
  return v;
}

int axes_checked = 0;

void check_axis(const AxisWindow& w) {
  ++axes_checked;
  const int L = w.length;
  for (int x = 0; x < L; ++x) {
    std::vector<int> expected;
    for (int y = 0; y < L; ++y)
      if (visible(w, x, y)) expected.push_back(y);
    const std::vector<int> got = members(w.keys_of(x));
    EXPECT(got == expected, "keys_of(%d): L %d K %d d %d s %d causal %d: %zu keys, expected %zu", x, L, w.kernel,
           w.dilation, w.stride, int(w.causal), got.size(), expected.size());
    if (!w.causal)
      EXPECT(int(got.size()) == w.kernel, "non-causal query %d sees %zu keys, not K %d", x, got.size(), w.kernel);
    if (w.kernel == L && w.dilation == 1 && !w.causal)
      EXPECT(int(got.size()) == L, "kernel == length must be full attention (query %d)", x);
  }
  for (int y = 0; y < L; ++y) {
    std::vector<int> expected;
    for (int x = 0; x < L; ++x)
      if (visible(w, x, y)) expected.push_back(x);
    const std::vector<int> got = members(w.queries_of(y));
    EXPECT(got == expected, "queries_of(%d): L %d K %d d %d s %d causal %d", y, L, w.kernel, w.dilation, w.stride,
           int(w.causal));
  }
  for (int a = 0; a < L; ++a)
    for (int b = a + 1; b <= L; ++b) {
      int lo = L, hi = 0;
      for (int x = a; x < b; ++x)
        for (int y = 0; y < L; ++y)
          if (visible(w, x, y)) lo = std::min(lo, y), hi = std::max(hi, y + 1);
      int begin, end;
      w.key_span(a, b, begin, end);
      EXPECT(begin == lo && end == hi, "key_span(%d, %d) = [%d, %d), expected [%d, %d)", a, b, begin, end, lo, hi);
      lo = L, hi = 0;
      for (int y = a; y < b; ++y)
        for (int x = 0; x < L; ++x)
          if (visible(w, x, y)) lo = std::min(lo, x), hi = std::max(hi, x + 1);
      w.query_span(a, b, begin, end);
      if (hi == 0) hi = lo = begin;  // no query sees these keys: any empty range
      EXPECT(begin == lo && end == hi, "query_span(%d, %d) = [%d, %d), expected [%d, %d)", a, b, begin, end, lo,
             hi);
    }
}

void check_grid(const Neighborhood& nb) {
  const int64_t n = nb.tokens();
  for (int64_t q = 0; q < n; ++q) {
    int c[3];
    nb.coords_of(q, c);
    EXPECT(nb.token_of(c) == q, "token_of(coords_of(%lld))", (long long)q);
    std::vector<int64_t> listed;
    nb.for_each(nb.keys_of(q), [&](int64_t t) { listed.push_back(t); });
    EXPECT(int64_t(listed.size()) == attnkit::box_size(nb.keys_of(q)), "box_size");
    EXPECT(std::is_sorted(listed.begin(), listed.end()), "for_each order");
    std::vector<int64_t> expected;
    for (int64_t k = 0; k < n; ++k) {
      int kc[3];
      nb.coords_of(k, kc);
      bool all = true;
      for (int a = 0; a < nb.rank; ++a) all = all && visible(nb.axis[a], c[a], kc[a]);
      EXPECT(nb.sees(q, k) == all, "sees(%lld, %lld)", (long long)q, (long long)k);
      if (all) expected.push_back(k);
    }
    EXPECT(listed == expected, "N-D keys_of(%lld) (rank %d)", (long long)q, nb.rank);
    std::vector<int64_t> queries, expected_queries;
    nb.for_each(nb.queries_of(q), [&](int64_t t) { queries.push_back(t); });
    for (int64_t x = 0; x < n; ++x)
      if (nb.sees(x, q)) expected_queries.push_back(x);
    EXPECT(queries == expected_queries, "N-D queries_of(%lld) (rank %d)", (long long)q, nb.rank);
  }
}

// The tile walk of a token range must return, in increasing order, every tile on its side
// holding a token paired with one of the range (a key a query of the range sees, or a query
// that sees a key of the range); tile_fully_visible must only claim what holds.
void check_tiles(const Neighborhood& nb, std::mt19937& rng) {
  const int64_t n = nb.tokens();
  for (int trial = 0; trial < 20; ++trial) {
    const int block = 1 + int(rng() % 12);
    const int64_t rb = int64_t(rng() % n), re = rb + 1 + int64_t(rng() % (n - rb));
    for (const attnkit::TileSide side : {attnkit::TileSide::kKeys, attnkit::TileSide::kQueries}) {
      const bool keys = side == attnkit::TileSide::kKeys;
      const auto pairs = [&](int64_t in_range, int64_t other) {
        return keys ? nb.sees(in_range, other) : nb.sees(other, in_range);
      };
      std::vector<bool> needed((n + block - 1) / block, false);
      for (int64_t t = rb; t < re; ++t)
        for (int64_t o = 0; o < n; ++o)
          if (pairs(t, o)) needed[o / block] = true;
      attnkit::TileWalk walk(nb, rb, re, block, side);
      std::vector<int64_t> tiles;
      for (int64_t t = walk.next(); t >= 0; t = walk.next()) tiles.push_back(t);
      EXPECT(std::is_sorted(tiles.begin(), tiles.end()) &&
                 std::adjacent_find(tiles.begin(), tiles.end()) == tiles.end(),
             "tile walk not strictly increasing");
      EXPECT(tiles.empty() || (tiles.front() >= 0 && tiles.back() < int64_t(needed.size())), "tile out of range");
      for (size_t t = 0; t < needed.size(); ++t)
        EXPECT(!needed[t] || std::binary_search(tiles.begin(), tiles.end(), int64_t(t)),
               "tile %zu holds a partner of tokens [%lld, %lld) but the %s walk skips it (block %d)", t,
               (long long)rb, (long long)re, keys ? "key" : "query", block);
      for (int64_t t : tiles) {
        const int64_t ob = t * block, oe = std::min(n, ob + block);
        bool all = true;
        for (int64_t x = rb; x < re; ++x)
          for (int64_t o = ob; o < oe; ++o) all = all && pairs(x, o);
        const bool claimed = keys ? attnkit::tile_fully_visible(nb, rb, re, ob, oe)
                                  : attnkit::tile_fully_visible(nb, ob, oe, rb, re);
        EXPECT(!claimed || all, "tile_fully_visible claims a masked pair");
      }
    }
  }
}

}  // namespace

int main() {
  for (int L = 1; L <= 13; ++L)
    for (int d = 1; d <= L; ++d)
      for (int K = 1; K * d <= L; ++K)
        for (int s = 1; s <= K; ++s)
          for (bool causal : {false, true}) check_axis(AxisWindow{L, K, d, s, causal});

  std::mt19937 rng(7);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int trial = 0; trial < 60; ++trial) {
    Neighborhood nb;
    nb.rank = 2 + trial % 2;
    for (int a = 0; a < nb.rank; ++a) {
      AxisWindow& w = nb.axis[a];
      w.length = pick(1, 9);
      w.dilation = pick(1, std::max(1, w.length / 2));
      w.kernel = pick(1, w.length / w.dilation);
      w.stride = pick(1, w.kernel);
      w.causal = pick(0, 1) == 1;
    }
    check_grid(nb);
    check_tiles(nb, rng);
  }
  // Full attention: every tile is fully visible and the walk visits all of them.
  Neighborhood full;
  full.rank = 2;
  full.axis[0] = AxisWindow{5, 5, 1, 1, false};
  full.axis[1] = AxisWindow{7, 7, 1, 1, false};
  EXPECT(attnkit::tile_fully_visible(full, 3, 20, 0, 35), "kernel == length must need no mask");
  attnkit::TileWalk walk(full, 10, 12, 4, attnkit::TileSide::kKeys);
  int tiles = 0;
  while (walk.next() >= 0) ++tiles;
  EXPECT(tiles == 9, "full attention walks %d of 9 tiles", tiles);
  std::printf("neighborhood: %d axis configurations and 60 grids checked, %d failures\n", axes_checked, failures);
  return failures == 0 ? 0 : 1;
}
