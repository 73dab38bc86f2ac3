// CPU block-sparse attention, forward and backward: the flash-style tile kernels of
// cpu/prefill_kernel.h walking the key tiles of each query tile's block list and columns
// (and, for dK and dV, the query tiles of each key tile's transposed lists), with the causal
// mask on top.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attnkit/block_sparse.h"
#include "attnkit/mask.h"
#include "cpu/block_sparse.h"
#include "cpu/dispatch.h"
#include "cpu/prefill_kernel.h"

namespace attnkit::cpu {
namespace {

using namespace prefill_tiles;
static_assert(kBlockQ == kBlockSparseTile && kBlockK == kBlockSparseTile,
              "a kernel tile must lie inside one block of the lists");

// The tiles a query tile visits (forward and dQ): those of the key blocks in its query
// block's list, then its columns within the rows' causal span, gathered 64 to a tile. The
// query tiles that visit a key tile (dK, dV): those of the query blocks in its key block's
// transposed list and those holding a column in it, masked to its columns.
struct BlockSparseWalk {
  const BlockSparseLayout& layout;

  template <typename F>
  void key_tiles(int b, int h, int q0, int rows, const AttentionMask& mask, F&& f) const {
    BlockListWalk walk = key_tile_walk(layout, mask, b, h, q0, q0 + rows);
    for (int t = walk.from(0); t >= 0; t = walk.from(t + 1)) f(KeyTile{t * kBlockK, std::min(kBlockK, mask.seqlen_k - t * kBlockK)});
    const ColumnChunks columns = column_chunks(layout, mask, b, h, q0, q0 + rows);
    for (int c = 0; c < columns.tiles(); ++c) f(KeyTile{0, columns.tile_size(c), kAllKeys, columns.tile(c)});
  }
  template <typename F>
  void query_tiles(int b, int h, int k0, int n, const AttentionMask& mask, F&& f) const {
    auto walk = sparse_query_tile_walk(layout, mask, b, h, k0, k0 + n);
    const int tiles_per_block = layout.block_size_q / kBlockQ;
    for (int t = walk.from(0); t >= 0; t = walk.from(t + 1))
      f(t * kBlockQ, listed_keys(layout, b, h, t / tiles_per_block, k0 / kBlockK));
  }
};

}  // namespace

void block_sparse_fwd(const AttentionParams& params, const BlockSparseLayout& layout) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward<decltype(tag)>(params, BlockSparseWalk{layout}); });
}

void block_sparse_bwd(const AttentionBwdParams& params, const BlockSparseLayout& layout) {
  dispatch_dtype(params.fwd.dtype, [&](auto tag) { backward<decltype(tag)>(params, BlockSparseWalk{layout}); });
}

void block_lists_canonical(const BlockLists& in, int batch, int32_t* out_indices, int32_t* out_counts) {
  const int64_t rows = int64_t(batch) * in.heads * in.row_blocks;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> bitmap(bitmap_words(in.col_blocks));
    for (int64_t r = begin; r < end; ++r)
      out_counts[r] = canonical_row(in.indices + r * in.list_len, in.counts[r], in.list_len, in.col_blocks,
                                    bitmap.data(), out_indices + r * in.list_len);
  });
}

void block_lists_transpose(const BlockLists& in, int batch, int32_t* out_indices, int32_t* out_counts) {
  const int64_t rows = int64_t(batch) * in.heads * in.col_blocks;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int col = int(r % in.col_blocks), h = int(r / in.col_blocks % in.heads);
      const int b = int(r / (int64_t(in.col_blocks) * in.heads));
      out_counts[r] = transpose_row(in, b, h, col, out_indices + r * in.row_blocks);
    }
  });
}

}  // namespace attnkit::cpu
