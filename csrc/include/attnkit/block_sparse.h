// Index math of block-sparse attention (docs/block_sparse.md), shared by the CPU kernels
// (csrc/cpu/block_sparse.cpp), the CUDA mask policies (csrc/cuda/block_sparse/) and the
// transpose op. Torch-free.
//
// A block list gives, per (batch, head, row block), the column blocks that row block sees:
// the forward's lists are key blocks per query block, the backward's transposed lists query
// blocks per key block. The kernels take lists in canonical form (entries ascending and
// distinct, all in [0, col_blocks), `count` of them, padding after); canonical_row brings
// any list (unsorted, repeated, out-of-range entries: a set) to that form first. A
// non-canonical list gives wrong numbers, never an out-of-bounds access: every read is
// clamped or checked here.
#pragma once

#include <cstdint>

#include "attnkit/macros.h"
#include "attnkit/mask.h"

namespace attnkit {

// Kernels tile both sequences in 64 rows; block sizes are multiples of it, so a kernel tile
// lies inside one block.
constexpr int kBlockSparseTile = 64;

struct BlockLists {
  const int32_t* indices = nullptr;  // (batch, heads, row_blocks, list_len), contiguous
  const int32_t* counts = nullptr;   // (batch, heads, row_blocks), contiguous
  int heads = 0;
  int row_blocks = 0;
  int col_blocks = 0;  // entries index blocks [0, col_blocks)
  int list_len = 0;

  ATTNKIT_HD int64_t row_of(int b, int h, int row_block) const {
    return (int64_t(b) * heads + h) * row_blocks + row_block;
  }
  // The list of one row block: its first entry and its count, clamped to [0, list_len].
  ATTNKIT_HD const int32_t* entries(int b, int h, int row_block) const {
    return indices + row_of(b, h, row_block) * list_len;
  }
  ATTNKIT_HD int count(int b, int h, int row_block) const {
    const int c = counts[row_of(b, h, row_block)];
    return c < 0 ? 0 : c > list_len ? list_len : c;
  }
};

// Both directions of one block-sparse attention: kv_blocks (key blocks per query block,
// the forward and dQ) and q_blocks (its transpose, query blocks per key block: dK and dV).
// Optionally individual key columns per query block (MInference's vertical lines), as two
// lists (indices == nullptr: none): `columns`, canonical lists of keys (col_blocks =
// seqlen_k) none of which lies in a key block the query block lists, so every key counts
// once; and `q_column_tiles`, per key tile (of kBlockSparseTile keys) the query blocks
// holding a column in it (the transpose of the columns' tiles). The forward (and dQ) gather
// the columns 64 to a tile (ColumnChunks); dK / dV visit the key tiles holding them, masked
// to their columns (listed_keys).
struct BlockSparseLayout {
  BlockLists kv_blocks;
  BlockLists q_blocks;  // unused by the forward
  BlockLists columns;
  BlockLists q_column_tiles;  // unused by the forward
  int block_size_q = 0;  // multiples of kBlockSparseTile
  int block_size_k = 0;
};

// The tiles of `tiles_per_block` tiles of each block of a canonical list, ascending,
// restricted to the tile range [first, end) (the tiles a mask lets the row block see).
// from(t) is the first listed tile >= t, or -1; the walk remembers its entry, so calls must
// come with non-decreasing t (asking the same t again gives the same tile).
struct BlockListWalk {
  const int32_t* entries;
  int count;
  int col_blocks;
  int tiles_per_block;
  int first, end;
  int entry = 0;

  ATTNKIT_HD BlockListWalk(const int32_t* entries_, int count_, int col_blocks_, int tiles_per_block_, int first_,
                           int end_)
      : entries(entries_),
        count(count_),
        col_blocks(col_blocks_),
        tiles_per_block(tiles_per_block_),
        first(first_),
        end(end_) {}

  ATTNKIT_HD int from(int t) {
    if (t < first) t = first;
    for (; entry < count; ++entry) {
      const int block = entries[entry];
      if (block < 0 || block >= col_blocks) continue;  // only in a non-canonical list
      const int block_first = block * tiles_per_block;
      if (block_first >= end) break;  // ascending: no later block meets [first, end)
      const int lo = t > block_first ? t : block_first;
      const int block_end = block_first + tiles_per_block;
      if (lo < (block_end < end ? block_end : end)) return lo;
    }
    return -1;
  }
};

// 32-bit words of the bitmap canonical_row needs for col_blocks blocks.
ATTNKIT_HD int bitmap_words(int col_blocks) { return (col_blocks + 31) / 32; }

// The canonical form of one list, the rule every list is read by: its first `count`
// entries (count clamped to [0, list_len]) that lie in [0, col_blocks), each once, ascending,
// then -1 up to list_len. bitmap: scratch of bitmap_words(col_blocks) words. Returns the
// number of blocks. O(list_len + col_blocks / 32), no sort.
ATTNKIT_HD int canonical_row(const int32_t* entries, int count, int list_len, int col_blocks, uint32_t* bitmap,
                             int32_t* out) {
  const int words = bitmap_words(col_blocks);
  for (int w = 0; w < words; ++w) bitmap[w] = 0u;
  count = count < 0 ? 0 : count > list_len ? list_len : count;
  for (int i = 0; i < count; ++i) {
    const int block = entries[i];
    if (block >= 0 && block < col_blocks) bitmap[block / 32] |= 1u << (block % 32);
  }
  int n = 0;
  for (int w = 0; w < words; ++w)
    for (uint32_t bits = bitmap[w]; bits != 0u; bits &= bits - 1u) {
#if defined(__CUDA_ARCH__)
      const int bit = __ffs(int(bits)) - 1;
#else
      const int bit = __builtin_ctz(bits);
#endif
      out[n++] = w * 32 + bit;
    }
  for (int i = n; i < list_len; ++i) out[i] = -1;
  return n;
}

// The key tiles (kBlockSparseTile keys each) that query rows [q_begin, q_end) of (b, h) visit,
// rows inside one query block: the tiles of their block's list that their mask span reaches.
ATTNKIT_HD BlockListWalk key_tile_walk(const BlockSparseLayout& layout, const AttentionMask& mask, int b, int h,
                                       int q_begin, int q_end) {
  const BlockLists& lists = layout.kv_blocks;
  const int q_block = q_begin / layout.block_size_q;
  const KeyRange tiles = tiles_of(mask.keys_of_rows(q_begin, q_end), kBlockSparseTile);
  return BlockListWalk(lists.entries(b, h, q_block), lists.count(b, h, q_block), lists.col_blocks,
                       layout.block_size_k / kBlockSparseTile, tiles.begin, tiles.end);
}

// The query tiles (kBlockSparseTile rows each) of q head h that visit keys [k_begin, k_end)
// of b, keys inside one key block: the tiles of its block's transposed list whose rows the
// mask lets see those keys.
ATTNKIT_HD BlockListWalk query_tile_walk(const BlockSparseLayout& layout, const AttentionMask& mask, int b, int h,
                                         int k_begin, int k_end) {
  const BlockLists& lists = layout.q_blocks;
  const int k_block = k_begin / layout.block_size_k;
  const KeyRange tiles = tiles_of(mask.rows_of_keys(k_begin, k_end), kBlockSparseTile);
  return BlockListWalk(lists.entries(b, h, k_block), lists.count(b, h, k_block), lists.col_blocks,
                       layout.block_size_q / kBlockSparseTile, tiles.begin, tiles.end);
}

// The first position of a canonical list of `count` entries whose entry is >= value
// (binary search; count if none).
ATTNKIT_HD int lower_bound(const int32_t* entries, int count, int value) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (entries[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Whether a canonical list of `count` entries holds `block`.
ATTNKIT_HD bool list_contains(const int32_t* entries, int count, int block) {
  const int i = lower_bound(entries, count, block);
  return i < count && entries[i] == block;
}

// Bit c set for each key k0 + c (c < kBlockSparseTile) a canonical column list holds.
ATTNKIT_HD uint64_t column_bits(const int32_t* entries, int count, int k0) {
  uint64_t bits = 0;
  for (int i = lower_bound(entries, count, k0); i < count; ++i) {
    const int c = entries[i] - k0;
    if (c >= kBlockSparseTile) break;
    if (c >= 0) bits |= uint64_t(1) << c;  // c < 0 only in a non-canonical list
  }
  return bits;
}

// The keys of key tile `tile` that query block `q_block` of (b, h) lists, bit c for key
// tile * kBlockSparseTile + c: all when the tile's key block is listed, else its columns
// (none of which lies in a listed block). The causal rule and the sequence end come on top.
ATTNKIT_HD uint64_t listed_keys(const BlockSparseLayout& layout, int b, int h, int q_block, int tile) {
  const BlockLists& blocks = layout.kv_blocks;
  if (list_contains(blocks.entries(b, h, q_block), blocks.count(b, h, q_block),
                    tile / (layout.block_size_k / kBlockSparseTile)))
    return kAllKeys;
  const BlockLists& columns = layout.columns;
  if (columns.indices == nullptr) return 0;
  return column_bits(columns.entries(b, h, q_block), columns.count(b, h, q_block), tile * kBlockSparseTile);
}

// Two ascending walks merged: the tiles either visits, each once, ascending (a tile of a
// listed block never holds a column, so the two never give the same tile; were they to, it
// is still visited once).
struct MergedWalk {
  BlockListWalk blocks, columns;
  ATTNKIT_HD int from(int t) {
    const int a = blocks.from(t), c = columns.from(t);
    return a < 0 ? c : c < 0 ? a : a < c ? a : c;
  }
};

// The columns of a query tile's block that its rows' key span holds (positions [begin, end)
// of the block's canonical column list, found by two binary searches), as gathered tiles of
// kBlockSparseTile columns: tile c holds first[c * kBlockSparseTile ...], `count` columns in
// all (the forward gathers them instead of visiting the key tiles they lie in).
struct ColumnChunks {
  const int32_t* first;
  int count;
  ATTNKIT_HD int tiles() const { return (count + kBlockSparseTile - 1) / kBlockSparseTile; }
  ATTNKIT_HD const int32_t* tile(int c) const { return first + c * kBlockSparseTile; }
  ATTNKIT_HD int tile_size(int c) const {
    const int left = count - c * kBlockSparseTile;
    return left < kBlockSparseTile ? left : kBlockSparseTile;
  }
};

ATTNKIT_HD ColumnChunks column_chunks(const BlockSparseLayout& layout, const AttentionMask& mask, int b, int h,
                                      int q_begin, int q_end) {
  const BlockLists& lists = layout.columns;
  if (lists.indices == nullptr) return {nullptr, 0};
  const int q_block = q_begin / layout.block_size_q;
  const int32_t* entries = lists.entries(b, h, q_block);
  const int count = lists.count(b, h, q_block);
  const KeyRange keys = mask.keys_of_rows(q_begin, q_end);
  if (keys.empty()) return {entries, 0};
  const int begin = lower_bound(entries, count, keys.begin), end = lower_bound(entries, count, keys.end);
  return {entries + begin, end > begin ? end - begin : 0};  // end < begin only in a non-canonical list
}

// A walk that visits nothing.
ATTNKIT_HD BlockListWalk empty_walk() { return BlockListWalk(nullptr, 0, 0, 1, 0, 0); }

// The query tiles of q head h that visit key tile [k_begin, k_end) of b (one kBlockSparseTile
// tile): those of the query blocks listing its block or holding one of its keys as a column,
// whose rows the mask lets see the tile. A query tile of a column-holding block may see the
// tile yet none of its columns (the causal rule cuts the tile between them): it is visited,
// every logit masked.
ATTNKIT_HD MergedWalk sparse_query_tile_walk(const BlockSparseLayout& layout, const AttentionMask& mask, int b,
                                             int h, int k_begin, int k_end) {
  BlockListWalk columns = empty_walk();
  if (layout.q_column_tiles.indices != nullptr) {
    const BlockLists& lists = layout.q_column_tiles;
    const int k_tile = k_begin / kBlockSparseTile;
    const KeyRange tiles = tiles_of(mask.rows_of_keys(k_begin, k_end), kBlockSparseTile);
    columns = BlockListWalk(lists.entries(b, h, k_tile), lists.count(b, h, k_tile), lists.col_blocks,
                            layout.block_size_q / kBlockSparseTile, tiles.begin, tiles.end);
  }
  return {query_tile_walk(layout, mask, b, h, k_begin, k_end), columns};
}

// The transpose rule: row `col` of the transposed lists of (b, h) holds, ascending, every
// row block whose list contains `col` (so it is canonical too). Writes them into out
// (room for in.row_blocks entries, padded with -1) and returns their number.
ATTNKIT_HD int transpose_row(const BlockLists& in, int b, int h, int col, int32_t* out) {
  int n = 0;
  for (int r = 0; r < in.row_blocks; ++r)
    if (list_contains(in.entries(b, h, r), in.count(b, h, r), col)) out[n++] = r;
  for (int i = n; i < in.row_blocks; ++i) out[i] = -1;
  return n;
}

}  // namespace attnkit
