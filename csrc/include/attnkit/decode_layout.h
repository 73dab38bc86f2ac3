// Index math of the CUDA decode (csrc/cuda/decode/), torch-free and __host__ __device__
// so that ctest checks what the kernel runs (tests/cpp/test_decode_layout.cpp):
//  - where key j of kv head h of sequence b lies in a contiguous or paged cache,
//  - the work axis of a (sequence, kv head) pair: its keys, dense or sparse (selected pages
//    or tokens), also used by the CPU decode,
//  - the packing of (query, q head) into the rows of one (sequence, kv head) pair,
//  - the lean schedule's shape for one decode call (one kv head per group),
//  - the layout of the workspace: lean seq offsets, the snapshot of the clamped lengths,
//    then the fp32 partial (lse, out) slots, sized by lean_bounds() only, so the same
//    buffer serves every cache_seqlens (CUDA graphs).
#pragma once

#include <cstdint>

#include "attnkit/macros.h"
#include "attnkit/params.h"
#include "attnkit/schedule.h"

namespace attnkit {

// Most keys a decode addresses per sequence: the cache capacity handed to the kernels is
// min(capacity, kDecodeMaxKeys). Lengths are int32 anyway, and with this bound the tile
// arithmetic (tile * tile_keys + key, tile_keys <= 256) never passes INT32_MAX.
constexpr int64_t kDecodeMaxKeys = (int64_t(1) << 31) - 256;

// Element offset of the row of key `key` of kv head `head` of sequence b in a cache with
// strides s (k_strides or v_strides of DecodeParams). Paged: logical page key / page_size
// of sequence b is physical page block_table[b][key / page_size], and s.batch is the
// stride between pages. The caller keeps key < the (clamped) capacity.
ATTNKIT_HD int64_t decode_kv_offset(const DecodeParams& p, const Strides& s, int b, int key, int head) {
  int64_t offset;
  if (p.is_paged()) {
    const int64_t page = p.block_table[int64_t(b) * p.block_table_stride + key / p.page_size];
    offset = page * s.batch + int64_t(key % p.page_size) * s.row;
  } else {
    offset = int64_t(b) * s.batch + int64_t(key) * s.row;
  }
  return offset + int64_t(head) * s.head;
}

// ---- the work axis of a pair ---------------------------------------------------------
// A pair is (sequence b, kv head h), pair index b * heads_kv + h. Its work axis lists the
// keys it attends to:
//  - dense: the positions 0 .. len - 1 of the sequence (len = its clamped cache_seqlens);
//  - sparse: the selected keys in selection order; work key j is token
//    entry * unit + j % unit of entry = selection[b][h][j / unit] (unit = selection_unit),
//    and names no token (-1) where the entry is negative or the token is >= len. The axis
//    ends after the last valid entry, so -1 padding at the end costs nothing.
// Masks (causal, window) apply to the token positions, so a selection may be in any order.

// Whether entry e (< selection_len) of the selection of pair (b, head) names a token < len.
ATTNKIT_HD bool decode_entry_valid(const DecodeParams& p, int b, int head, int e, int len) {
  const int32_t entry = p.selection[(int64_t(b) * p.heads_kv + head) * p.selection_len + e];
  return entry >= 0 && int64_t(entry) * p.selection_unit < len;
}

// Token position of work key `key` of pair (b, head), or -1 when it names none.
ATTNKIT_HD int decode_key_position(const DecodeParams& p, int b, int head, int key, int len) {
  if (!p.is_sparse()) return key < len ? key : -1;
  const int e = key / p.selection_unit;
  if (key < 0 || e >= p.selection_len) return -1;
  const int32_t entry = p.selection[(int64_t(b) * p.heads_kv + head) * p.selection_len + e];
  if (entry < 0) return -1;
  const int64_t pos = int64_t(entry) * p.selection_unit + key % p.selection_unit;
  return pos < len ? int(pos) : -1;
}

// Length of the work axis of pair (b, head): dense len; sparse (last valid entry + 1) * unit.
ATTNKIT_HD int decode_pair_keys(const DecodeParams& p, int b, int head, int len) {
  if (!p.is_sparse()) return len;
  for (int e = p.selection_len - 1; e >= 0; --e)
    if (decode_entry_valid(p, b, head, e, len)) return (e + 1) * p.selection_unit;
  return 0;
}

// Row r of pair (b, kv head g) holds query r / group of q head g * group + r % group
// (group = heads_q / heads_kv): the q heads of one kv head are adjacent, as on the CPU.
struct DecodeRow {
  int query;
  int head_q;
};

ATTNKIT_HD DecodeRow decode_row(int r, int group, int kv_head) {
  return {r / group, kv_head * group + r % group};
}

// Element offset of row (query, head_q) of sequence b in out (strides p.out_strides), and
// its index in lse, laid out (batch, heads_q, seqlen_q) contiguously.
ATTNKIT_HD int64_t decode_out_offset(const DecodeParams& p, int b, DecodeRow row) {
  return b * p.out_strides.batch + row.query * p.out_strides.row + row.head_q * p.out_strides.head;
}
ATTNKIT_HD int64_t decode_lse_index(const DecodeParams& p, int b, DecodeRow row) {
  return (int64_t(b) * p.heads_q + row.head_q) * p.seqlen_q + row.query;
}

// The lean schedule of one decode call on CUDA: one kv head per group, so the schedule's
// pair index is the pair index b * heads_kv + h in both modes.
//  - dense: the schedule's sequences are the batch, its groups the kv heads, its lengths
//    cache_seqlens; max_seqlen_k is the cache capacity (contiguous: k_cache.size(1); paged:
//    block_table.size(1) * page_size), device-side lengths are clamped into it.
//  - sparse: every pair is a schedule sequence of one group (work differs per kv head),
//    of length decode_pair_keys() <= selection_len * selection_unit; the window is applied
//    per key, so the schedule sees none.
ATTNKIT_HD LeanShape decode_lean_shape(const DecodeParams& p, int tile_keys, int max_seqlen_k) {
  if (p.is_sparse())
    return {p.batch * p.heads_kv, 1, p.seqlen_q, -1, tile_keys, p.selection_len * p.selection_unit};
  return {p.batch, p.heads_kv, p.seqlen_q, p.window_left, tile_keys, max_seqlen_k};
}

// Workspace of one decode call, in bytes from its start (every part 16-byte aligned):
//   seq_offset  int64 [shape.batch + 1]           lean_seq_offsets() of this call
//   seq_len     int32 [p.batch]                   the snapshot of cache_seqlens, clamped to
//                                                 [0, capacity]: written by the first kernel,
//                                                 the only thing later kernels read of it
//   pair_keys   int32 [shape.batch]               sparse only: decode_pair_keys() per pair,
//                                                 the schedule's lengths
//   lse         float [num_slots][rows]           partial log-sum-exp per slot and row
//   out         float [num_slots][rows][head_dim] partial output, normalised
// shape = decode_lean_shape(), num_slots = lean_bounds().num_slots (<= 2 per worker),
// rows = heads_q / heads_kv * seqlen_q. None of it depends on the values of cache_seqlens
// or the selection. The schedule's lengths (lean_lengths_bytes()) are seq_len when dense.
struct DecodeWorkspace {
  int64_t seq_offset_bytes;  // offset of seq_offset (0)
  int64_t seq_len_bytes;     // offset of seq_len
  int64_t pair_keys_bytes;   // offset of pair_keys (sparse)
  int64_t lse_bytes;         // offset of lse
  int64_t out_bytes;         // offset of out
  int64_t total_bytes;
  int rows;
  int head_dim;
  bool sparse;

  ATTNKIT_HD static int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

  ATTNKIT_HD static DecodeWorkspace make(const DecodeParams& p, const LeanShape& shape, int num_slots) {
    DecodeWorkspace w;
    w.rows = p.heads_q / p.heads_kv * p.seqlen_q;
    w.head_dim = p.head_dim;
    w.sparse = p.is_sparse();
    w.seq_offset_bytes = 0;
    w.seq_len_bytes = align16(int64_t(shape.batch + 1) * int64_t(sizeof(int64_t)));
    w.pair_keys_bytes = w.seq_len_bytes + align16(int64_t(p.batch) * int64_t(sizeof(int32_t)));
    const int64_t pair_keys = w.sparse ? int64_t(shape.batch) * int64_t(sizeof(int32_t)) : 0;
    w.lse_bytes = w.pair_keys_bytes + align16(pair_keys);
    w.out_bytes = w.lse_bytes + align16(int64_t(num_slots) * w.rows * int64_t(sizeof(float)));
    w.total_bytes = w.out_bytes + int64_t(num_slots) * w.rows * p.head_dim * int64_t(sizeof(float));
    return w;
  }

  // Byte offset of the schedule's lengths: pair_keys (sparse) or seq_len (dense).
  ATTNKIT_HD int64_t lean_lengths_bytes() const { return sparse ? pair_keys_bytes : seq_len_bytes; }

  // Indices (in floats) of row r of slot `slot` in the lse and out parts.
  ATTNKIT_HD int64_t lse_index(int slot, int r) const { return int64_t(slot) * rows + r; }
  ATTNKIT_HD int64_t out_index(int slot, int r) const { return (int64_t(slot) * rows + r) * head_dim; }
};

}  // namespace attnkit
