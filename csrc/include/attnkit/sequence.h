// Where one sequence of a dense or varlen prefill batch lives, for the CPU and CUDA
// prefill kernels alike: its lengths, its first rows, element offsets of a (batch, row,
// head) and where its LSE rows start.
#pragma once

#include <cstdint>

#include "attnkit/macros.h"
#include "attnkit/params.h"

namespace attnkit {

struct Sequence {
  int len_q, len_k;
  int64_t row_q, row_k;  // first row of the sequence (varlen: in the packed tensors)
};

// Varlen lengths come from cu_seqlens and are clamped into the tensors (total_q / total_k
// rows, max_seqlen_*): the CPU binding validates them, the CUDA kernels read them on the
// device unchecked, where wrong values then give wrong numbers, never out-of-bounds accesses.
ATTNKIT_HD Sequence sequence_of(const AttentionParams& p, int b) {
  if (!p.is_varlen()) return {p.seqlen_q, p.seqlen_k, 0, 0};
  const auto clamp = [](int begin, int end, int total, int max_len, int& len) {
    begin = begin < 0 ? 0 : begin > total ? total : begin;
    end = end < begin ? begin : end > total ? total : end;
    len = end - begin < max_len ? end - begin : max_len;
    return int64_t(begin);
  };
  Sequence s{};
  s.row_q = clamp(p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1], p.total_q, p.seqlen_q, s.len_q);
  if (p.is_paged()) {  // keys live in the sequence's pages: at most its table row's capacity
    const int64_t capacity = p.block_table_stride * p.page_size;
    const int64_t len = int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
    const int64_t bound = capacity < p.seqlen_k ? capacity : p.seqlen_k;
    s.len_k = int(len < 0 ? 0 : len > bound ? bound : len);
    s.row_k = 0;
  } else {
    s.row_k = clamp(p.cu_seqlens_k[b], p.cu_seqlens_k[b + 1], p.total_k, p.seqlen_k, s.len_k);
  }
  if (p.seqused_k) {
    const int used = p.seqused_k[b] < 0 ? 0 : p.seqused_k[b];
    if (used < s.len_k) s.len_k = used;
  }
  return s;
}

// Element offset of (batch b, row, head h) in a (batch, seqlen, heads, dim) or
// (total, heads, dim) tensor.
ATTNKIT_HD int64_t offset_of(const Strides& s, int b, int64_t row, int h) {
  return b * s.batch + row * s.row + int64_t(h) * s.head;
}

// Element offset of key j of sequence b, kv head h, in k or v (strides s): row seq.row_k + j
// of packed or dense keys, or slot j % page_size of page block_table[b][j / page_size].
ATTNKIT_HD int64_t key_offset(const AttentionParams& p, const Strides& s, int b, const Sequence& seq, int j, int h) {
  if (!p.is_paged()) return offset_of(s, b, seq.row_k + j, h);
  const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
  return page * s.batch + int64_t(j % p.page_size) * s.row + int64_t(h) * s.head;
}

// Index of row 0 of (b, h) in an lse-shaped tensor: (batch, heads_q, seqlen_q) dense,
// (heads_q, total_q) varlen; the sequence's rows then follow contiguously.
ATTNKIT_HD int64_t lse_offset(const AttentionParams& p, int b, int h, const Sequence& seq) {
  if (p.is_varlen()) return int64_t(h) * p.total_q + seq.row_q;
  return (int64_t(b) * p.heads_q + h) * p.seqlen_q;
}

}  // namespace attnkit
