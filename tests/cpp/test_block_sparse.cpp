// Unit tests of the block-list index math (attnkit/block_sparse.h) against the rule written
// out element by element: on random lists (repeats, any order, out-of-range entries, counts
// beyond the list or negative), canonical_row must give the distinct valid entries in
// ascending order; the key-tile walk of a query tile must visit, in increasing order and
// once each, exactly the key tiles that hold a key some row of the tile sees (its block
// listed, causal on top) and repeat an answer asked again; the query-tile walk of a key tile
// exactly the query tiles with a row that sees one of its keys; transpose_row exactly the
// query blocks listing a key block. With column lists (canonical: ascending keys outside the
// listed blocks) the forward must gather exactly the columns some row of the query tile sees,
// the backward walk visit the query tiles seeing a column of the key tile (and at most the
// documented extra tiles), and listed_keys give, per (query block, key tile), exactly the
// keys the rule lists.
// Run by ctest; exits non-zero on failure.
#include <algorithm>
#include <cstdio>
#include <iterator>
#include <random>
#include <set>
#include <vector>

#include "attnkit/block_sparse.h"
#include "expect.h"

namespace {

using attnkit::AttentionMask;
using attnkit::BlockLists;
using attnkit::BlockSparseLayout;
using attnkit::kBlockSparseTile;

constexpr int kTile = kBlockSparseTile;

// One random (batch 1, head 1) case: canonical lists in both directions.
struct Case {
  int seqlen_q, seqlen_k, block_q, block_k, q_blocks, k_blocks;
  bool causal;
  std::vector<int32_t> raw, raw_counts;  // as a user might give them
  std::vector<int32_t> kv, kv_counts, q, q_counts;  // canonical and transposed
  std::vector<int32_t> cols, col_counts, col_tiles, col_tile_counts, q_col_tiles, q_col_tile_counts;
  BlockSparseLayout layout;
};

Case make_case(std::mt19937& rng) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Case c;
  c.seqlen_q = pick(1, 700), c.seqlen_k = pick(1, 700);
  c.block_q = kTile * pick(1, 3), c.block_k = kTile * pick(1, 3);
  c.q_blocks = (c.seqlen_q + c.block_q - 1) / c.block_q, c.k_blocks = (c.seqlen_k + c.block_k - 1) / c.block_k;
  c.causal = pick(0, 1) == 1;
  const int list_len = pick(1, c.k_blocks + 3);
  for (int m = 0; m < c.q_blocks; ++m) {
    for (int i = 0; i < list_len; ++i) c.raw.push_back(pick(-2, c.k_blocks + 1));
    c.raw_counts.push_back(pick(-1, list_len + 2));
  }
  BlockLists raw{c.raw.data(), c.raw_counts.data(), 1, c.q_blocks, c.k_blocks, list_len};
  c.kv.resize(c.raw.size()), c.kv_counts.resize(c.q_blocks);
  std::vector<uint32_t> bitmap(attnkit::bitmap_words(c.k_blocks));
  for (int m = 0; m < c.q_blocks; ++m)
    c.kv_counts[m] = attnkit::canonical_row(raw.entries(0, 0, m), raw.count(0, 0, m), list_len, c.k_blocks,
                                            bitmap.data(), c.kv.data() + int64_t(m) * list_len);
  BlockLists kv{c.kv.data(), c.kv_counts.data(), 1, c.q_blocks, c.k_blocks, list_len};
  c.q.resize(size_t(c.k_blocks) * c.q_blocks), c.q_counts.resize(c.k_blocks);
  for (int n = 0; n < c.k_blocks; ++n)
    c.q_counts[n] = attnkit::transpose_row(kv, 0, 0, n, c.q.data() + int64_t(n) * c.q_blocks);
  c.layout.kv_blocks = kv;
  c.layout.q_blocks = BlockLists{c.q.data(), c.q_counts.data(), 1, c.k_blocks, c.q_blocks, c.q_blocks};
  c.layout.block_size_q = c.block_q, c.layout.block_size_k = c.block_k;
  if (pick(0, 2) > 0) {  // columns: random keys outside the listed blocks, ascending, distinct
    const int col_len = pick(1, 12), key_tiles = (c.seqlen_k + kTile - 1) / kTile;
    for (int m = 0; m < c.q_blocks; ++m) {
      std::set<int> keys;
      for (int i = pick(0, col_len); i > 0; --i) {
        const int j = pick(0, c.seqlen_k - 1);
        if (!attnkit::list_contains(kv.entries(0, 0, m), kv.count(0, 0, m), j / c.block_k)) keys.insert(j);
      }
      c.col_counts.push_back(int(keys.size()));
      std::vector<int32_t> row(keys.begin(), keys.end());
      row.resize(col_len, -1);
      c.cols.insert(c.cols.end(), row.begin(), row.end());
    }
    BlockLists cols{c.cols.data(), c.col_counts.data(), 1, c.q_blocks, c.seqlen_k, col_len};
    // Their tiles (canonical_row of the keys' tiles) and the transpose, as the binding builds them.
    std::vector<int32_t> tiles_raw(c.cols.size());
    for (size_t i = 0; i < c.cols.size(); ++i) tiles_raw[i] = c.cols[i] < 0 ? -1 : c.cols[i] / kTile;
    c.col_tiles.resize(c.cols.size()), c.col_tile_counts.resize(c.q_blocks);
    std::vector<uint32_t> tile_bitmap(attnkit::bitmap_words(key_tiles));
    for (int m = 0; m < c.q_blocks; ++m)
      c.col_tile_counts[m] = attnkit::canonical_row(tiles_raw.data() + int64_t(m) * col_len, c.col_counts[m], col_len,
                                                    key_tiles, tile_bitmap.data(),
                                                    c.col_tiles.data() + int64_t(m) * col_len);
    BlockLists tiles{c.col_tiles.data(), c.col_tile_counts.data(), 1, c.q_blocks, key_tiles, col_len};
    c.q_col_tiles.resize(size_t(key_tiles) * c.q_blocks), c.q_col_tile_counts.resize(key_tiles);
    for (int t = 0; t < key_tiles; ++t)
      c.q_col_tile_counts[t] = attnkit::transpose_row(tiles, 0, 0, t, c.q_col_tiles.data() + int64_t(t) * c.q_blocks);
    c.layout.columns = cols;
    c.layout.q_column_tiles = BlockLists{c.q_col_tiles.data(), c.q_col_tile_counts.data(), 1, key_tiles, c.q_blocks,
                                         c.q_blocks};
  }
  return c;
}

bool is_column(const Case& c, int m, int j) {
  if (c.cols.empty()) return false;
  const int col_len = int(c.cols.size()) / c.q_blocks;
  for (int i = 0; i < c.col_counts[m]; ++i)
    if (c.cols[size_t(m) * col_len + i] == j) return true;
  return false;
}

// The set of key blocks query block m lists, from the raw list by the documented rule.
std::set<int> listed(const Case& c, int m) {
  const int list_len = int(c.raw.size()) / c.q_blocks;
  const int count = std::max(0, std::min(list_len, int(c.raw_counts[m])));
  std::set<int> blocks;
  for (int i = 0; i < count; ++i) {
    const int n = c.raw[size_t(m) * list_len + i];
    if (n >= 0 && n < c.k_blocks) blocks.insert(n);
  }
  return blocks;
}

bool sees(const Case& c, int i, int j) {
  const int m = i / c.block_q;
  return (listed(c, m).count(j / c.block_k) || is_column(c, m, j)) && (!c.causal || j <= i + c.seqlen_k - c.seqlen_q);
}

void check_case(const Case& c) {
  const int list_len = int(c.raw.size()) / c.q_blocks;
  for (int m = 0; m < c.q_blocks; ++m) {
    const std::set<int> want = listed(c, m);
    EXPECT(c.kv_counts[m] == int(want.size()), "block %d: count %d, want %zu", m, c.kv_counts[m], want.size());
    int i = 0;
    for (int n : want) EXPECT(c.kv[size_t(m) * list_len + i++] == n, "block %d entry %d", m, i - 1);
    for (; i < list_len; ++i) EXPECT(c.kv[size_t(m) * list_len + i] == -1, "block %d padding %d", m, i);
  }
  for (int n = 0; n < c.k_blocks; ++n) {
    std::vector<int> want;
    for (int m = 0; m < c.q_blocks; ++m)
      if (listed(c, m).count(n)) want.push_back(m);
    EXPECT(c.q_counts[n] == int(want.size()), "key block %d: transposed count %d", n, c.q_counts[n]);
    for (size_t i = 0; i < want.size(); ++i) EXPECT(c.q[size_t(n) * c.q_blocks + i] == want[i], "transposed");
  }
  const AttentionMask mask(c.seqlen_q, c.seqlen_k, c.causal, -1, -1);
  for (int q0 = 0; q0 < c.seqlen_q; q0 += kTile) {  // forward: key tiles and columns of each query tile
    const int q_end = std::min(c.seqlen_q, q0 + kTile), m = q0 / c.block_q;
    std::vector<int> want, got, want_columns, got_columns;
    for (int t = 0; t * kTile < c.seqlen_k; ++t) {  // tiles of listed blocks holding a key the rows see
      bool any = false;
      for (int i = q0; i < q_end && !any; ++i)
        for (int j = t * kTile; j < std::min(c.seqlen_k, (t + 1) * kTile) && !any; ++j)
          any = listed(c, m).count(j / c.block_k) && sees(c, i, j);
      if (any) want.push_back(t);
    }
    for (int j = 0; j < c.seqlen_k; ++j) {  // columns some row sees
      bool any = false;
      for (int i = q0; i < q_end && !any; ++i) any = is_column(c, m, j) && sees(c, i, j);
      if (any) want_columns.push_back(j);
    }
    attnkit::BlockListWalk walk = attnkit::key_tile_walk(c.layout, mask, 0, 0, q0, q_end);
    for (int t = walk.from(0); t >= 0; t = walk.from(t + 1)) {
      EXPECT(walk.from(t + 1) == walk.from(t + 1), "from() must repeat its answer");
      got.push_back(t);
    }
    const attnkit::ColumnChunks chunks = attnkit::column_chunks(c.layout, mask, 0, 0, q0, q_end);
    for (int t = 0; t < chunks.tiles(); ++t) {
      EXPECT(chunks.tile_size(t) > 0 && chunks.tile_size(t) <= kTile, "gathered tile %d size %d", t,
             chunks.tile_size(t));
      got_columns.insert(got_columns.end(), chunks.tile(t), chunks.tile(t) + chunks.tile_size(t));
    }
    EXPECT(got == want, "query tile %d: %zu key tiles visited, %zu hold a key its rows see", q0, got.size(),
           want.size());
    EXPECT(got_columns == want_columns, "query tile %d: %zu columns gathered, %zu seen", q0, got_columns.size(),
           want_columns.size());
    for (int t = 0; t * kTile < c.seqlen_k; ++t) {  // the keys of each (query block, key tile) pair
      uint64_t want_keys = 0;
      for (int j = t * kTile; j < std::min(c.seqlen_k, (t + 1) * kTile); ++j)
        if (listed(c, m).count(j / c.block_k) || is_column(c, m, j)) want_keys |= uint64_t(1) << (j - t * kTile);
      const uint64_t in_sequence = c.seqlen_k - t * kTile >= kTile ? attnkit::kAllKeys
                                                                     : (uint64_t(1) << (c.seqlen_k - t * kTile)) - 1;
      EXPECT((attnkit::listed_keys(c.layout, 0, 0, m, t) & in_sequence) == want_keys,
             "query block %d key tile %d: listed keys differ", m, t);
    }
  }
  for (int k0 = 0; k0 < c.seqlen_k; k0 += kTile) {  // backward: query tiles of each key tile
    const int k_end = std::min(c.seqlen_k, k0 + kTile);
    std::vector<int> want, got;
    for (int t = 0; t * kTile < c.seqlen_q; ++t) {
      bool any = false;
      for (int i = t * kTile; i < std::min(c.seqlen_q, (t + 1) * kTile) && !any; ++i)
        for (int j = k0; j < k_end && !any; ++j) any = sees(c, i, j);
      if (any) want.push_back(t);
    }
    auto walk = attnkit::sparse_query_tile_walk(c.layout, mask, 0, 0, k0, k_end);
    for (int t = walk.from(0); t >= 0; t = walk.from(t + 1)) got.push_back(t);
    // Besides those, the walk may visit query tiles of blocks holding a column in the key tile
    // whose rows see the tile but none of those columns (documented; every logit masked).
    std::vector<int> extra;
    std::set_difference(got.begin(), got.end(), want.begin(), want.end(), std::back_inserter(extra));
    EXPECT(std::includes(got.begin(), got.end(), want.begin(), want.end()) &&
               std::is_sorted(got.begin(), got.end()) && std::adjacent_find(got.begin(), got.end()) == got.end(),
           "key tile %d: %zu query tiles visited, %zu see one of its keys", k0, got.size(), want.size());
    for (int t : extra) {
      bool holds_column = false;
      for (int j = k0; j < k_end; ++j) holds_column |= is_column(c, t * kTile / c.block_q, j);
      EXPECT(holds_column, "key tile %d: query tile %d visited without a reason", k0, t);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(19);
  for (int trial = 0; trial < 300; ++trial) check_case(make_case(rng));
  if (failures == 0) std::printf("block_sparse: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
