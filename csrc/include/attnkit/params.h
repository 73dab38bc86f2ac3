// Plain parameter structs, one per op family: raw pointers, int64 strides in elements,
// sizes and flags. csrc/torch fills them once from tensors; CPU and CUDA kernels read them.
// Torch-free, so the C++ unit tests and microbenchmarks can fill them too.
#pragma once

#include <cstdint>

#include "attnkit/dtype.h"
#include "attnkit/macros.h"
#include "attnkit/quant.h"
#include "attnkit/neighborhood.h"

namespace attnkit {

// Strides of a (batch, seqlen, heads, head_dim) tensor, head_dim contiguous. For varlen
// tensors (total, heads, head_dim) batch_stride is 0 and rows are offset by cu_seqlens.
struct Strides {
  int64_t batch = 0;
  int64_t row = 0;
  int64_t head = 0;
};

// Strides of an LSE tensor viewed as (batch, heads, seqlen).
struct LseStrides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t seq = 0;
};

// Prefill forward: out, lse = attention(q, k, v).
struct AttentionParams {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // dense: (batch, heads_q, seqlen_q); varlen: (heads_q, total_q)
  Strides q_strides, k_strides, v_strides, out_strides;

  int batch;
  int heads_q;
  int heads_kv;
  int head_dim;
  int seqlen_q;  // dense: the length; varlen: max_seqlen_q (an upper bound)
  int seqlen_k;
  const int32_t* cu_seqlens_q;  // nullptr when dense
  const int32_t* cu_seqlens_k;
  int total_q;  // varlen: rows of q and k; the CUDA kernels clamp cu_seqlens into them
  int total_k;

  float scale;
  float softcap;  // 0 = off
  bool causal;
  int window_left;  // -1 = unbounded
  int window_right;

  // Paged keys (varlen only; nullptr: k and v are packed rows): k and v are pages
  // (num_pages, page_size, kv_heads, head_dim), k_strides / v_strides with batch = the page
  // stride; sequence b has cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys, key t in page
  // block_table[b * block_table_stride + t / page_size], slot t % page_size.
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int page_size = 0;
  // Optional per-sequence key cap (nullptr: none): sequence b uses its first seqused_k[b] keys.
  const int32_t* seqused_k = nullptr;

  // Quantized keys and values (varlen only; k_quant.data == nullptr: not quantized;
  // docs/quantization.md): k / v are k_quant.data / v_quant.data, and k_strides / v_strides
  // count rows (token, kv head) of QuantizedRows instead of elements. Rotated keys (rows
  // hold H k) come with q already rotated by the binding: (H q) . (H k) = q . k.
  QuantizedRows k_quant, v_quant;

  // Sink tokens (AttentionMask): with a left window, keys 0 .. sink_tokens - 1 stay visible.
  int sink_tokens = 0;
  // ALiBi (nullptr: none): float32 slope of (sequence b, q head h) at
  // alibi_slopes[b * alibi_batch_stride + h] (stride 0: one slope per head for every sequence).
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  ATTNKIT_HD bool is_varlen() const { return cu_seqlens_q != nullptr; }
  ATTNKIT_HD bool is_paged() const { return block_table != nullptr; }
  ATTNKIT_HD bool is_quantized() const { return k_quant.data != nullptr; }
  ATTNKIT_HD float alibi_slope(int b, int h) const {
    return alibi_slopes ? alibi_slopes[b * alibi_batch_stride + h] : 0.f;
  }
};

// The gradient side of a backward pass (prefill and neighborhood): dout in; dq, dk, dv out.
struct AttentionGrads {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  Strides dout_strides, dq_strides, dk_strides, dv_strides;

  // fp32 scratch of the CUDA backward (unused by the CPU kernels), allocated by the caller:
  // dq_accum laid out like q (dense (batch, seqlen_q, heads_q, head_dim), varlen
  // (total_q, heads_q, head_dim), neighborhood the tokens view of q) and zeroed by the
  // kernel's pre-pass; delta = rowsum(dO * O) laid out like lse.
  float* dq_accum = nullptr;
  Strides dq_accum_strides;
  float* delta = nullptr;
  // Optional (nullptr: none) gradient of the loss with respect to lse, laid out like lse.
  // d lse / d s_j = P_j, so it enters as delta -= grad_lse: dS = P (dP - delta + grad_lse).
  const float* grad_lse = nullptr;
};

// Prefill backward: dq, dk, dv from dout, recomputing probabilities from lse.
struct AttentionBwdParams : AttentionGrads {
  AttentionParams fwd;  // q, k, v, out, lse as in the forward
};

// Decode: a few queries per sequence against a contiguous or paged KV cache.
struct DecodeParams {
  DType dtype;
  const void* q;  // (batch, seqlen_q, heads_q, head_dim)
  const void* k_cache;
  const void* v_cache;
  void* out;   // like q
  float* lse;  // (batch, heads_q, seqlen_q)
  Strides q_strides, out_strides;
  // Contiguous cache: batch/row/head strides. Paged: batch = stride between pages.
  Strides k_strides, v_strides;

  int batch;
  int seqlen_q;
  int heads_q;
  int heads_kv;
  int head_dim;
  const int32_t* cache_seqlens;  // (batch,)

  const int32_t* block_table;  // nullptr for a contiguous cache
  int64_t block_table_stride;  // elements between rows of block_table
  int page_size;               // paged only

  float scale;
  float softcap;
  int window_left;  // -1 = unbounded

  // Sparse decode (nullptr = dense): per (sequence, kv head) a list of selected logical
  // pages (selection_unit = page_size) or tokens (selection_unit = 1), int32 (batch,
  // heads_kv, selection_len) contiguous; entries < 0 or past the sequence's end select
  // nothing. attnkit/decode_layout.h maps the selected keys to cache rows.
  const int32_t* selection = nullptr;
  int selection_len = 0;
  int selection_unit = 0;  // tokens per entry

  // Quantized cache (docs/quantization.md; k_quant.data == nullptr: not quantized):
  // k_cache / v_cache are k_quant.data / v_quant.data, and k_strides / v_strides count rows
  // (token, kv head) of QuantizedRows instead of elements.
  QuantizedRows k_quant, v_quant;

  ATTNKIT_HD bool is_paged() const { return block_table != nullptr; }
  ATTNKIT_HD bool is_sparse() const { return selection != nullptr; }
  ATTNKIT_HD bool is_quantized() const { return k_quant.data != nullptr; }
};

// merge_attention_states: two partial results over disjoint keys -> one.
// out tensors are viewed as (batch, seqlen, heads, head_dim); lse as (batch, heads, seqlen).
struct MergeParams {
  DType dtype;
  const void* out_a;
  const void* out_b;
  void* out;
  const float* lse_a;
  const float* lse_b;
  float* lse;
  Strides out_a_strides, out_b_strides, out_strides;
  LseStrides lse_a_strides, lse_b_strides, lse_strides;
  int batch;
  int seqlen;
  int heads;
  int head_dim;
};

// PagedKVCache append: row i of k / v (n_tokens, heads_kv, head_dim) goes to slot
// slot_mapping[i] = page * page_size + offset of k_pages / v_pages (num_pages, page_size,
// heads_kv, head_dim), and the page's per-head, per-channel key_min / key_max (num_pages,
// heads_kv, head_dim, float32, contiguous) take the stored key. Writing offset 0 starts a
// fresh page, so its min / max are reset first; rows of one page come in offset order and,
// for the CUDA kernel, one after the other (it folds each such run in one thread per
// channel; PagedKVCache writes them so). The CUDA kernel skips slots outside the cache
// (values the CPU binding checks, which CUDA cannot without a host sync).
struct PagedAppendParams {
  DType dtype;
  const void* k;
  const void* v;
  Strides k_strides, v_strides;  // row and head; batch unused
  void* k_pages;
  void* v_pages;
  Strides k_pages_strides, v_pages_strides;  // batch = stride between pages
  float* key_min;
  float* key_max;
  const int64_t* slot_mapping;  // (n_tokens,), each in [0, num_pages * page_size), distinct
  int n_tokens;
  int num_pages;
  int heads_kv;
  int head_dim;
  int page_size;

  // Quantized cache (docs/quantization.md; quantized == false: plain): each row (token, kv
  // head) is quantized on the way in. k_pages / v_pages then hold its codes, contiguous
  // (num_pages, page_size, heads_kv, head_dim / channels_per_byte), and k_scale, k_zero,
  // v_scale, v_zero one float32 per group, contiguous (num_pages, page_size, heads_kv,
  // head_dim / group_size); zeros nullptr for fp8. Keys are stored as
  // quantize(H^rotate_keys (k - key_offset[token_seq[i]])), where key_offset (nullptr: none)
  // is float32 (sequences, heads_kv, head_dim) and token_seq (n_tokens,) its row per token.
  // key_min / key_max fold the keys as given.
  bool quantized = false;
  KVFormat format = KVFormat::kInt8;
  int group_size = 0;
  bool rotate_keys = false;
  float* k_scale = nullptr;
  float* k_zero = nullptr;
  float* v_scale = nullptr;
  float* v_zero = nullptr;
  const float* key_offset = nullptr;
  const int64_t* token_seq = nullptr;
};

// page_scores: per (sequence, kv head, logical page) the Quest upper bound of the scaled
// logits of the group's queries over the page's keys (attnkit/quest.h), max-combined over
// the heads of the group and the queries; -inf for pages at or past the sequence's end.
struct PageScoresParams {
  const void* q;  // (batch, seqlen_q, heads_q, head_dim), read as float32; CPU: float32 only
  DType q_dtype;
  Strides q_strides;
  const float* key_min;  // float32 (num_pages, heads_kv, head_dim), contiguous
  const float* key_max;  // like key_min
  const int32_t* block_table;  // (batch, max_pages) logical -> physical page, contiguous
  const int32_t* cache_seqlens;  // (batch,)
  float* scores;  // float32 (batch, heads_kv, max_pages), contiguous
  int batch;
  int seqlen_q;
  int heads_q;
  int heads_kv;
  int head_dim;
  int num_pages;  // key_min dim 0
  int max_pages;
  int page_size;
  float scale;
};

// select_pages: per (sequence, kv head) the sink, recent and top_k highest-scoring logical
// pages, ascending, -1 padded.
struct SelectPagesParams {
  const float* scores;  // float32 (batch * heads_kv, max_pages), contiguous; -inf = past the end
  int32_t* pages;  // int32 (batch * heads_kv, top_k + sink_pages + recent_pages)
  int64_t rows;  // batch * heads_kv
  int max_pages;
  int top_k;
  int sink_pages;
  int recent_pages;
};

// quantize_kv / dequantize_kv (docs/quantization.md): `rows` rows of head_dim channels, each
// cut into groups of group_size channels (head_dim for one group per row); data holds
// head_dim / channels_per_byte(format) bytes per row, scale and zero one float32 per group
// (zero unused by fp8). All tensors contiguous.
struct QuantizeKVParams {
  KVFormat format;
  DType dtype;  // of x
  const void* x;  // (rows, head_dim)
  uint8_t* data;  // (rows, head_dim / channels_per_byte)
  float* scale;  // (rows, head_dim / group_size)
  float* zero;  // like scale; nullptr for fp8
  int64_t rows;
  int head_dim;
  int group_size;
  bool rotate = false;  // quantize H x (head_dim a power of two; attnkit/quant.h)
};

struct DequantizeKVParams {
  KVFormat format;
  DType dtype;  // of out
  const uint8_t* data;
  const float* scale;
  const float* zero;  // nullptr for fp8
  void* out;  // (rows, head_dim)
  int64_t rows;
  int head_dim;
  int group_size;
  bool rotated = false;  // rows hold H x: out = H (their values) = x
};

// Neighborhood attention forward: q, k, v (batch, *spatial, heads, head_dim) viewed with the
// spatial axes flattened row-major into one token axis, so Strides.row is the token stride.
struct NeighborhoodParams {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (batch, heads_q, tokens), contiguous
  Strides q_strides, k_strides, v_strides, out_strides;
  int batch;
  int heads_q;
  int heads_kv;
  int head_dim;
  Neighborhood nbhd;  // grid shape and window rule (attnkit/neighborhood.h)
  float scale;
};

// Neighborhood attention backward: dq, dk, dv from dout, recomputing probabilities from lse.
struct NeighborhoodBwdParams : AttentionGrads {
  NeighborhoodParams fwd;  // q, k, v, out, lse as in the forward
};

}  // namespace attnkit
