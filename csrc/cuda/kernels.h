// Entry points of the CUDA kernels (torch-free): csrc/torch fills the params and passes
// the current stream. Each returns after launching; launch errors throw std::runtime_error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attnkit/block_sparse.h"
#include "attnkit/params.h"

namespace attnkit::cuda {

void merge_attention_states(const MergeParams& params, cudaStream_t stream);

// Prefill (flash-style, FlashAttention-2 algorithm), fp16/bf16, head_dim a multiple of 8
// up to 256 (kernels are built for 64, 96, 128 and 256; others round up and mask columns).
// q/k/v/out row and head strides must be multiples of 8 elements and pointers 16-byte
// aligned. Lengths in cu_seqlens are read on the device only (no host sync).
bool attention_supports(DType dtype, int head_dim);
void attention_fwd(const AttentionParams& params, cudaStream_t stream);
// Needs params.dq_accum and params.delta (see AttentionBwdParams).
void attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

// Decode (lean / stream-K schedule of attnkit/schedule.h), fp16/bf16, head_dim a multiple
// of 8 up to 256 (kernels for 64, 128 and 256; others pad columns), contiguous or paged cache (any page size; docs/decode.md). K/V rows must start on
// 16 bytes: cache pointers 16-byte aligned, cache strides multiples of 8 elements; out
// contiguous. cache_seqlens and block_table are read on the device only (no host sync);
// lengths are clamped to [0, max_seqlen_k], the cache capacity (contiguous: k_cache.size(1);
// paged: block_table.size(1) * page_size, at most kDecodeMaxKeys). `workers` CTAs share the
// KV tiles (default: decode_workers(), SMs x resident CTAs per SM of the instantiation that
// runs params, on the current device, cached); the workspace (decode_workspace_bytes(), any
// contents, O(workers x rows x head_dim) plus a few ints per sequence or pair) depends on the
// shapes and `workers` only, so one allocation serves every cache_seqlens and a decode
// step can be captured in a CUDA graph. cache_seqlens is read by the first launch only.
bool decode_supports(DType dtype, int head_dim);
int decode_workers(const DecodeParams& params);
int64_t decode_workspace_bytes(const DecodeParams& params, int max_seqlen_k, int workers);
void decode(const DecodeParams& params, int max_seqlen_k, int workers, void* workspace, cudaStream_t stream);

// PagedKVCache append (attnkit/paged_cache.py), any DType: key / value rows to their slots
// and the fused key_min / key_max upkeep of attnkit/quest.h, bit-identical to the CPU
// kernel. slot_mapping is read on the device only; slots outside the cache are skipped. A
// page's rows must come one after the other in token order (see PagedAppendParams).
void paged_cache_append(const PagedAppendParams& params, cudaStream_t stream);

// Quest page scores (attnkit/quest.h); q of any DType, read as float32. cache_seqlens and
// block_table are read on the device only: lengths are clamped to [0, max_pages *
// page_size], and a block_table entry outside [0, num_pages) scores NaN (docs/sparse.md).
void page_scores(const PageScoresParams& params, cudaStream_t stream);
// Top-k page choice (attnkit/page_order.h), bit-identical to the CPU kernel. Both ops
// allocate nothing and never sync: capturable in a CUDA graph.
void select_pages(const SelectPagesParams& params, cudaStream_t stream);
// Neighborhood attention forward and backward (the prefill kernels with a neighbourhood mask
// policy, docs/neighborhood.md), fp16/bf16, head_dim a multiple of 8 up to 128 (kernels for
// 64 and 128). Rows (tokens) and heads of q/k/v/out: strides multiples of 8 elements,
// pointers 16-byte aligned; lse (batch, heads_q, tokens) contiguous. The backward needs the
// fp32 scratch dq_accum (like q) and delta (like lse).
bool neighborhood_supports(DType dtype, int head_dim);
void neighborhood_fwd(const NeighborhoodParams& params, cudaStream_t stream);
void neighborhood_bwd(const NeighborhoodBwdParams& params, cudaStream_t stream);
// Block-sparse attention forward and backward (the prefill kernels with a block-list mask
// policy on 64 x 64 tiles, docs/block_sparse.md), fp16/bf16, head_dim a multiple of 8 up to
// 128, layouts as neighborhood's; lists canonical (attnkit/block_sparse.h), read on the device
// only (a wrong list gives wrong numbers, never an out-of-bounds read). The backward needs
// layout.q_blocks (block_lists_transpose) and the fp32 scratch dq_accum and delta.
bool block_sparse_supports(DType dtype, int head_dim);
void block_sparse_fwd(const AttentionParams& params, const BlockSparseLayout& layout, cudaStream_t stream);
void block_sparse_bwd(const AttentionBwdParams& params, const BlockSparseLayout& layout, cudaStream_t stream);
// canonical_row of attnkit/block_sparse.h for every list, one thread per list; bitmaps:
// scratch of bitmap_words(in.col_blocks) words per list (any contents).
void block_lists_canonical(const BlockLists& in, int batch, uint32_t* bitmaps, int32_t* out_indices,
                           int32_t* out_counts, cudaStream_t stream);
// The transpose rule of attnkit/block_sparse.h: out_indices (batch, heads, in.col_blocks,
// in.row_blocks) and out_counts (batch, heads, in.col_blocks), contiguous.
void block_lists_transpose(const BlockLists& in, int batch, int32_t* out_indices, int32_t* out_counts,
                           cudaStream_t stream);

}  // namespace attnkit::cuda
