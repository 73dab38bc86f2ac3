// Bindings of block_sparse_fwd / block_sparse_bwd / block_lists_canonical /
// block_lists_transpose: checks of the block lists, params (q, k, v as prefill's), the key
// tiles of the column lists (and their transpose), dispatch to csrc/cpu/block_sparse.cpp or
// the CUDA kernels. Lists must be canonical (attnkit/block_sparse.h); python/attnkit/
// block_sparse.py brings them to that form.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "attnkit/block_sparse.h"
#include "checks.h"
#include "cpu/block_sparse.h"
#include "prefill.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

int64_t blocks_of(int64_t length, int64_t block_size) { return (length + block_size - 1) / block_size; }

void check_block_size(int64_t block_size, const char* name) {
  TORCH_CHECK_VALUE(block_size > 0 && block_size % kBlockSparseTile == 0 && block_size <= (1 << 20), name,
                    " must be a positive multiple of ", kBlockSparseTile, " (the kernels' tile), got ", block_size);
}

// indices (batch, heads, row_blocks, list_len) and counts (batch, heads, row_blocks), int32
// on the device of q; returns the lists over their contiguous copies (kept in `keep`).
BlockLists block_lists(const at::Tensor& indices, const char* indices_name, const at::Tensor& counts,
                       const char* counts_name, int64_t batch, int64_t heads, int64_t row_blocks, int64_t col_blocks,
                       const at::Tensor& q, std::vector<at::Tensor>& keep) {
  check_index_tensor(indices, 4, indices_name, q);
  check_index_tensor(counts, 3, counts_name, q);
  const std::vector<int64_t> rows{batch, heads, row_blocks};
  TORCH_CHECK_VALUE(indices.size(0) == batch && indices.size(1) == heads && indices.size(2) == row_blocks,
                    indices_name, " must have shape (batch, heads, blocks, list_len) with (batch, heads, blocks) = ",
                    at::IntArrayRef(rows), ", got ", indices.sizes());
  TORCH_CHECK_VALUE(counts.sizes() == at::IntArrayRef(rows), counts_name, " must have shape ", at::IntArrayRef(rows),
                    ", got ", counts.sizes());
  TORCH_CHECK_VALUE(indices.size(3) <= INT32_MAX, indices_name, " lists must be shorter than 2^31, got ",
                    indices.size(3));
  keep.push_back(indices.contiguous());
  keep.push_back(counts.contiguous());
  BlockLists lists;
  lists.indices = keep[keep.size() - 2].data_ptr<int32_t>();
  lists.counts = keep.back().data_ptr<int32_t>();
  lists.heads = int(heads);
  lists.row_blocks = int(row_blocks);
  lists.col_blocks = int(col_blocks);
  lists.list_len = int(indices.size(3));
  return lists;
}

// Packed sequences (cu_seqlens_q / cu_seqlens_k, q (total_q, heads, head_dim)) or a batch.
struct Sequences {
  const OptTensor& cu_q;
  const OptTensor& cu_k;
  int64_t max_seqlen_q, max_seqlen_k;
};

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Sequences& seqs,
                            bool causal, double scale, double softcap) {
  return make_attention_params(q, k, v, seqs.cu_q, seqs.cu_k, seqs.max_seqlen_q, seqs.max_seqlen_k, causal, scale,
                               -1, -1, softcap);
}

BlockSparseLayout make_layout(const AttentionParams& p, const at::Tensor& kv_indices, const at::Tensor& kv_counts,
                              int64_t block_size_q, int64_t block_size_k, const at::Tensor& q,
                              std::vector<at::Tensor>& keep) {
  check_block_size(block_size_q, "block_size_q");
  check_block_size(block_size_k, "block_size_k");
  BlockSparseLayout layout;
  layout.block_size_q = int(block_size_q);
  layout.block_size_k = int(block_size_k);
  layout.kv_blocks = block_lists(kv_indices, "kv_block_indices", kv_counts, "kv_block_counts", p.batch, p.heads_q,
                                 blocks_of(p.seqlen_q, block_size_q), blocks_of(p.seqlen_k, block_size_k), q, keep);
  return layout;
}

std::tuple<at::Tensor, at::Tensor> block_lists_canonical(const at::Tensor& indices, const at::Tensor& counts,
                                                         int64_t col_blocks);
std::tuple<at::Tensor, at::Tensor> block_lists_transpose(const at::Tensor& indices, const at::Tensor& counts,
                                                         int64_t col_blocks);

// The column lists of a layout: canonical columns (key indices, none in a listed block) per
// query block as given and, with `transposed`, the query blocks per key tile holding one
// (the backward's; from the columns' tiles). No columns: both stay empty.
void add_columns(BlockSparseLayout& layout, const AttentionParams& p, const OptTensor& column_indices,
                 const OptTensor& column_counts, bool transposed, const at::Tensor& q, std::vector<at::Tensor>& keep) {
  TORCH_CHECK_VALUE(column_indices.has_value() == column_counts.has_value(),
                    "column_indices and column_counts must be given together");
  if (!column_indices) return;
  const int64_t q_blocks = layout.kv_blocks.row_blocks, key_tiles = blocks_of(p.seqlen_k, kBlockSparseTile);
  layout.columns = block_lists(*column_indices, "column_indices", *column_counts, "column_counts", p.batch,
                               p.heads_q, q_blocks, p.seqlen_k, q, keep);
  if (!transposed) return;
  const at::Tensor columns = keep[keep.size() - 2], counts = keep.back();
  const at::Tensor tiles = at::where(columns >= 0, at::div(columns, kBlockSparseTile, "floor"), -1);
  auto [tile_indices, tile_counts] = block_lists_canonical(tiles, counts, key_tiles);
  auto [q_indices, q_counts] = block_lists_transpose(tile_indices, tile_counts, key_tiles);
  layout.q_column_tiles = block_lists(q_indices, "transposed column tiles", q_counts, "transposed column tile counts",
                                      p.batch, p.heads_q, key_tiles, q_blocks, q, keep);
}

#ifdef ATTNKIT_WITH_CUDA
void check_cuda(const AttentionParams& p, const char* op) {
  TORCH_CHECK_VALUE(p.dtype != DType::kFloat32, "attnkit.", op,
                    " on CUDA takes float16 or bfloat16 q, k, v (dtype float32 runs on the CPU only)");
  TORCH_CHECK_VALUE(cuda::block_sparse_supports(p.dtype, p.head_dim), "attnkit.", op,
                    " on CUDA needs head_dim a multiple of 8 and at most 128, got head_dim ", p.head_dim);
  TORCH_CHECK_VALUE(p.batch <= 65535 && p.heads_q <= 65535, "attnkit.", op,
                    " on CUDA takes at most 65535 sequences and heads, got batch ", p.batch, " and ", p.heads_q,
                    " heads");
}
#endif

std::tuple<at::Tensor, at::Tensor> block_sparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& kv_indices, const at::Tensor& kv_counts,
                                                    int64_t block_size_q, int64_t block_size_k, bool causal,
                                                    double scale, double softcap, const OptTensor& column_indices,
                                                    const OptTensor& column_counts, const OptTensor& cu_q,
                                                    const OptTensor& cu_k, int64_t max_seqlen_q,
                                                    int64_t max_seqlen_k) {
  const c10::DeviceGuard guard(q.device());
  const FoldedScale folded = fold_scale_for_cuda(q, scale);
  const at::Tensor qd = for_device(folded.q), kd = for_device(k), vd = for_device(v);
  AttentionParams p = make_params(qd, kd, vd, {cu_q, cu_k, max_seqlen_q, max_seqlen_k}, causal, folded.scale, softcap);
  std::vector<at::Tensor> keep;
  BlockSparseLayout layout = make_layout(p, kv_indices, kv_counts, block_size_q, block_size_k, q, keep);
  add_columns(layout, p, column_indices, column_counts, false, q, keep);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = p.is_varlen() ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                                 : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr<float>();
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda(p, "block_sparse_attention");
    if (q.numel() > 0) cuda::block_sparse_fwd(p, layout, c10::cuda::getCurrentCUDAStream().stream());
    return {out, lse};
  }
#endif
  if (q.numel() > 0) cpu::block_sparse_fwd(p, layout);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> block_lists_canonical(const at::Tensor& indices, const at::Tensor& counts,
                                                         int64_t col_blocks) {
  const c10::DeviceGuard guard(indices.device());
  check_index_tensor(indices, 4, "indices", indices);
  TORCH_CHECK_VALUE(col_blocks >= 0 && col_blocks <= INT32_MAX / 2, "col_blocks must be in [0, 2^30), got ",
                    col_blocks);
  std::vector<at::Tensor> keep;
  const BlockLists in = block_lists(indices, "indices", counts, "counts", indices.size(0), indices.size(1),
                                    indices.size(2), col_blocks, indices, keep);
  at::Tensor out_indices = at::empty(indices.sizes(), indices.options());
  at::Tensor out_counts = at::empty(counts.sizes(), counts.options());
  if (out_counts.numel() == 0) return {out_indices, out_counts};
#ifdef ATTNKIT_WITH_CUDA
  if (indices.is_cuda()) {
    at::Tensor bitmaps = at::empty({out_counts.numel(), bitmap_words(int(col_blocks))}, indices.options());
    cuda::block_lists_canonical(in, int(indices.size(0)), reinterpret_cast<uint32_t*>(bitmaps.data_ptr<int32_t>()),
                                out_indices.data_ptr<int32_t>(), out_counts.data_ptr<int32_t>(),
                                c10::cuda::getCurrentCUDAStream().stream());
    return {out_indices, out_counts};
  }
#endif
  cpu::block_lists_canonical(in, int(indices.size(0)), out_indices.data_ptr<int32_t>(),
                             out_counts.data_ptr<int32_t>());
  return {out_indices, out_counts};
}

std::tuple<at::Tensor, at::Tensor> block_lists_transpose(const at::Tensor& indices, const at::Tensor& counts,
                                                         int64_t col_blocks) {
  const c10::DeviceGuard guard(indices.device());
  check_index_tensor(indices, 4, "indices", indices);
  TORCH_CHECK_VALUE(col_blocks >= 0 && col_blocks <= INT32_MAX, "col_blocks must be in [0, 2^31), got ", col_blocks);
  std::vector<at::Tensor> keep;
  const BlockLists in = block_lists(indices, "indices", counts, "counts", indices.size(0), indices.size(1),
                                    indices.size(2), col_blocks, indices, keep);
  at::Tensor out_indices = at::empty({indices.size(0), indices.size(1), col_blocks, indices.size(2)},
                                     indices.options());
  at::Tensor out_counts = at::empty({indices.size(0), indices.size(1), col_blocks}, indices.options());
  if (out_counts.numel() == 0) return {out_indices, out_counts};
#ifdef ATTNKIT_WITH_CUDA
  if (indices.is_cuda()) {
    cuda::block_lists_transpose(in, int(indices.size(0)), out_indices.data_ptr<int32_t>(),
                                out_counts.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
    return {out_indices, out_counts};
  }
#endif
  cpu::block_lists_transpose(in, int(indices.size(0)), out_indices.data_ptr<int32_t>(),
                             out_counts.data_ptr<int32_t>());
  return {out_indices, out_counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& kv_indices, const at::Tensor& kv_counts, const at::Tensor& q_indices,
    const at::Tensor& q_counts, int64_t block_size_q, int64_t block_size_k, bool causal, double scale,
    double softcap, const OptTensor& grad_lse, const OptTensor& column_indices, const OptTensor& column_counts,
    const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const c10::DeviceGuard guard(q.device());
  const FoldedScale folded = fold_scale_for_cuda(q, scale);
  const at::Tensor qd = for_device(folded.q), kd = for_device(k), vd = for_device(v);
  const AttentionParams p =
      make_params(qd, kd, vd, {cu_q, cu_k, max_seqlen_q, max_seqlen_k}, causal, folded.scale, softcap);
  std::vector<at::Tensor> keep;
  BlockSparseLayout layout = make_layout(p, kv_indices, kv_counts, block_size_q, block_size_k, q, keep);
  layout.q_blocks = block_lists(q_indices, "q_block_indices", q_counts, "q_block_counts", p.batch, p.heads_q,
                                layout.kv_blocks.col_blocks, layout.kv_blocks.row_blocks, q, keep);
  add_columns(layout, p, column_indices, column_counts, true, q, keep);
  AttentionBwdBuffers bw = prepare_attention_bwd(dout, q, k, v, out, lse, grad_lse, p);
  if (bw.nothing_to_do) return {bw.dq, bw.dk, bw.dv};
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda(p, "block_sparse_attention backward");
    cuda::block_sparse_bwd(bw.params, layout, c10::cuda::getCurrentCUDAStream().stream());
    unfold_dq(bw.dq, folded);
    return {bw.dq, bw.dk, bw.dv};
  }
#endif
  cpu::block_sparse_bwd(bw.params, layout);
  return {bw.dq, bw.dk, bw.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("block_sparse_fwd", &block_sparse_fwd);
  m.impl("block_sparse_bwd", &block_sparse_bwd);
  m.impl("block_lists_canonical", &block_lists_canonical);
  m.impl("block_lists_transpose", &block_lists_transpose);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("block_sparse_fwd", &block_sparse_fwd);
  m.impl("block_sparse_bwd", &block_sparse_bwd);
  m.impl("block_lists_canonical", &block_lists_canonical);
  m.impl("block_lists_transpose", &block_lists_transpose);
}
#endif

}  // namespace attnkit::binding
