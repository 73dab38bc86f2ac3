// The CPU prefill kernels, forward and backward, flash-style, for any walk of the key
// tiles a query tile visits (and of the query tiles that see a key tile): prefill.cpp walks
// the tiles its causal / window mask leaves (DenseWalk there), block_sparse.cpp those of the
// block lists. A tile of kBlockQ queries of one head streams over tiles of kBlockK keys with
// an online softmax, so memory stays O(seqlen) (no seqlen_q x seqlen_k matrix). Logit tiles
// are kept as keys x queries (St = K * Q^T): only the query tile is transposed, once, while
// K and V tiles are read as stored (fp32) or converted row by row (fp16 / bf16), and
// per-query softmax statistics are vectors. The backward recomputes probabilities from the
// forward's LSE in two passes: dK/dV per key tile, then dQ per query tile, so no two
// threads write the same gradient row (deterministic, no atomics).
//
// A Walk offers
//   key_tiles(b, h, q0, rows, mask, f):  f(KeyTile) for each tile of keys that query rows
//                                        [q0, q0 + rows) of q head h visit;
//   query_tiles(b, h, k0, n, mask, f):   f(q0, keys) for each query tile [q0, q0 + kBlockQ) of
//                                        q head h that visits key tile [k0, k0 + n).
// keys: which keys of the tile the pair visits (bit c: key k0 + c; kAllKeys for all, the
// dense walk's case; a block-sparse walk's column tiles hold some). Query tiles start at
// multiples of kBlockQ, key tiles of the backward at multiples of kBlockK. Logits the mask
// hides are -inf whatever the walk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "attnkit/mask.h"
#include "attnkit/quant.h"
#include "attnkit/sequence.h"
#include "attnkit/softmax.h"
#include "cpu/dispatch.h"
#include "cpu/tile_math.h"

namespace attnkit::cpu::prefill_tiles {

constexpr int kBlockQ = 64;
constexpr int kBlockK = 64;

// A tile of at most kBlockK keys a walk visits: keys k0 .. k0 + n, of which those `keys`
// selects (bit c: key k0 + c); or, with `gathered`, the n keys gathered[0 .. n), ascending
// (a block-sparse walk's columns, 64 to a tile).
struct KeyTile {
  int k0, n;
  uint64_t keys = kAllKeys;
  const int32_t* gathered = nullptr;
  int key(int c) const { return gathered != nullptr ? gathered[c] : k0 + c; }
  // key(c) clamped into [0, len): the row to read (a gathered key outside the sequence, only
  // in a non-canonical list, reads row 0 or len - 1; its logit is masked whatever is read).
  int row(int c, int len) const { return std::clamp(key(c), 0, len - 1); }
  auto key_of() const {
    return [this](int c) { return key(c); };
  }
  // Whether the tile's rows are equally spaced in a tensor (k0 .. k0 + n, all of them).
  bool contiguous() const { return gathered == nullptr && keys == kAllKeys; }
};

template <typename T>
const T* row_ptr(const void* base, const Strides& s, int b, int64_t row, int h) {
  return static_cast<const T*>(base) + offset_of(s, b, row, h);
}
template <typename T>
T* row_ptr(void* base, const Strides& s, int b, int64_t row, int h) {
  return static_cast<T*>(base) + offset_of(s, b, row, h);
}

// Logits of the keys a tile's `keys` bits leave out set to -inf: whole rows of St (n x ld).
inline void mask_unlisted_keys(float* st, int n, int ld, uint64_t keys) {
  for (int c = 0; c < n; ++c)
    if (!(keys >> c & 1u)) std::fill(st + int64_t(c) * ld, st + int64_t(c + 1) * ld, kNegInf);
}

// Rows (ld apart, D wide) of the keys left out zeroed, so that a NaN there never meets their
// zero weight in P V or dS K.
inline void zero_unlisted_rows(float* rows, int n, int64_t ld, int D, uint64_t keys) {
  for (int c = 0; c < n; ++c)
    if (!(keys >> c & 1u)) std::fill(rows + c * ld, rows + c * ld + D, 0.f);
}

// Query q of a tile sees keys [lo[q], hi[q]) and the sinks [0, min(mods.sink, hi[q]));
// padding columns see nothing. mods also carries the tile's ALiBi slope.
struct TileMask {
  alignas(32) int32_t lo[kBlockQ];
  alignas(32) int32_t hi[kBlockQ];
  int max_lo = 0, min_hi = 0;  // every query of the tile sees [max_lo, min_hi)
  ScoreMods mods;

  void set(const AttentionMask& mask, int q0, int rows, float alibi_slope) {
    max_lo = 0;
    min_hi = mask.seqlen_k;
    for (int r = 0; r < kBlockQ; ++r) {
      const KeyRange keys = r < rows ? mask.keys_of(q0 + r) : KeyRange{0, 0};
      lo[r] = keys.begin;
      hi[r] = keys.end;
      if (r < rows) {
        max_lo = std::max(max_lo, keys.begin);
        min_hi = std::min(min_hi, keys.end);
      }
    }
    mods = {mask.sink_tokens, alibi_slope, mask.diagonal(q0)};
  }
  // Whether every query sees every key of the tile (gathered keys: ascending, checked by
  // their first and last against the window every query sees).
  bool all_visible(const KeyTile& t) const {
    if (t.gathered != nullptr) return t.n == 0 || (t.gathered[0] >= max_lo && t.gathered[t.n - 1] < min_hi);
    return (std::max(t.k0, mods.sink) >= max_lo || t.k0 + t.n <= mods.sink) && t.k0 + t.n <= min_hi;
  }
  // Softcaps, biases and masks the logits of the tile's keys (a no-op when none applies),
  // then hides the keys its `keys` bits leave out.
  void apply(float* st, const KeyTile& t, int cols, float softcap) const {
    if (softcap != 0.f || mods.alibi_slope != 0.f || !all_visible(t))
      transform_and_mask_cols(st, t.n, kBlockQ, cols, t.key_of(), lo, hi, softcap, mods);
    if (t.keys != kAllKeys) mask_unlisted_keys(st, t.n, kBlockQ, t.keys);
  }
};

// An fp32 view of rows first .. first + n of one head of a tensor: the tensor itself when it
// is fp32, its rows are equally spaced (`strided`: not so across the pages of a paged K / V)
// and, if padded, D is a multiple of 16 so rows can be read to Dp; else a copy converted into
// buf (ld Dp, columns D .. Dp zero). Returns the pointer and sets ld.
template <typename T, typename RowFn>
const float* fp32_rows(RowFn row, int first, int n, int D, int Dp, bool padded, float* buf, int64_t& ld,
                       bool strided = true) {
  if constexpr (std::is_same_v<T, float>) {
    if (strided && (!padded || D % (2 * kVec) == 0)) {
      ld = n > 1 ? row(first + 1) - row(first) : Dp;
      return row(first);
    }
  }
  for (int r = 0; r < n; ++r) {
    load_row(row(first + r), D, buf + int64_t(r) * Dp, 1.f);
    std::fill(buf + int64_t(r) * Dp + D, buf + int64_t(r + 1) * Dp, 0.f);
  }
  ld = Dp;
  return buf;
}

// Rows first .. first + n of a quantized K or V (row(j): the QuantizedRows index of key j)
// dequantized into buf (ld Dp, columns D .. Dp zero) 16 code bytes at a time through
// attnkit/quant.h, so the values equal dequantize_kv's.
template <typename RowFn>
void dequantized_rows(const QuantizedRows& rows, RowFn row, int first, int n, int D, int Dp, float* buf) {
  dispatch_kv_format(rows.format, [&](auto format) {
    constexpr KVFormat F = decltype(format)::value;
    for (int r = 0; r < n; ++r) {
      const int64_t index = row(first + r);
      float* out = buf + int64_t(r) * Dp;
      for (int byte = 0; byte < rows.row_bytes(); byte += 16) {
        const int channel = byte * channels_per_byte(F);
        uint32_t words[4];
        std::memcpy(words, rows.codes(index, channel), sizeof(words));
        dequantize_16_bytes<F>(words, rows.scale_at(index, channel), rows.zero_at(index, channel), out + channel);
      }
      std::fill(out + D, out + Dp, 0.f);
    }
  });
}

// dst (D x kBlockQ) = (mul * rows first .. first + n)^T, columns n .. kBlockQ zero.
template <typename T, typename RowFn>
void load_transposed(RowFn row, int first, int n, int D, float mul, float* buf, float* dst) {
  for (int c = 0; c < n; ++c) {
    load_row(row(first + c), D, buf, mul);
    for (int d = 0; d < D; ++d) dst[int64_t(d) * kBlockQ + c] = buf[d];
  }
  for (int d = 0; d < D; ++d) std::fill(dst + int64_t(d) * kBlockQ + n, dst + int64_t(d + 1) * kBlockQ, 0.f);
}

// Work list: one entry per (batch, head, tile start), tiles of `block` rows.
struct TileItem {
  int b, h, start;
};

template <typename LenFn>
std::vector<TileItem> tile_items(int batch, int heads, int block, LenFn len) {
  std::vector<TileItem> items;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int s = 0; s < len(b); s += block) items.push_back({b, h, s});
  return items;
}

// ---- forward --------------------------------------------------------------------------------

template <typename T, typename Walk>
void forward(const AttentionParams& p, const Walk& walk) {
  const int D = p.head_dim, Dp = round_up(D, 2 * kVec), group = p.heads_q / p.heads_kv;
  const auto items = tile_items(p.batch, p.heads_q, kBlockQ, [&](int b) { return sequence_of(p, b).len_q; });

  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(int64_t(D) * kBlockQ), acc(kBlockQ * Dp), st(kBlockK * kBlockQ), k_buf(kBlockK * Dp),
        v_buf(kBlockK * Dp), row_buf(Dp);
    alignas(32) float max[kBlockQ], sum[kBlockQ], factor[kBlockQ];
    TileMask tile_mask;

    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, q0] = items[it];
      const int hk = h / group;
      const Sequence seq = sequence_of(p, b);
      const AttentionMask mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right, p.sink_tokens);
      const int rows = std::min(kBlockQ, seq.len_q - q0), cols = round_up(rows, 2 * kVec);
      auto q_row = [&](int i) { return row_ptr<T>(p.q, p.q_strides, b, seq.row_q + i, h); };
      // The tile's keys of K or V as fp32 rows (ld set): in place where they are fp32 and
      // equally spaced (paged keys are within one page only) and the tile is contiguous,
      // else converted or dequantized, the rows of keys left out zeroed (mask_keys).
      auto key_rows = [&](const void* base, const Strides& s, const QuantizedRows& quant, const KeyTile& t,
                          bool padded, bool mask_keys, float* buf, int64_t& ld) {
        auto index = [&](int c) { return key_offset(p, s, b, seq, t.row(c, seq.len_k), hk); };
        if (p.is_quantized()) {
          dequantized_rows(quant, index, 0, t.n, D, Dp, buf);
          ld = Dp;
        } else {
          auto row = [&](int c) { return static_cast<const T*>(base) + index(c); };
          const bool strided = !p.is_paged() || t.k0 / p.page_size == (t.k0 + t.n - 1) / p.page_size;
          const float* rows = fp32_rows<T>(row, 0, t.n, D, Dp, padded, buf, ld, strided && t.contiguous());
          if (rows != buf) return rows;
        }
        if (mask_keys && t.keys != kAllKeys) zero_unlisted_rows(buf, t.n, ld, D, t.keys);
        return static_cast<const float*>(buf);
      };

      load_transposed<T>(q_row, q0, rows, D, p.scale, row_buf.data(), qt.data());
      tile_mask.set(mask, q0, rows, p.alibi_slope(b, h));
      std::fill(acc.begin(), acc.begin() + rows * Dp, 0.f);
      std::fill(max, max + kBlockQ, kNegInf);
      std::fill(sum, sum + kBlockQ, 0.f);

      walk.key_tiles(b, h, q0, rows, mask, [&](const KeyTile& t) {
        const int n = t.n;
        int64_t ldk, ldv;
        const float* k = key_rows(p.k, p.k_strides, p.k_quant, t, false, false, k_buf.data(), ldk);
        gemm<false, false>(n, cols, D, k, ldk, qt.data(), kBlockQ, st.data(), kBlockQ);
        tile_mask.apply(st.data(), t, cols, p.softcap);
        softmax_update_cols(st.data(), n, kBlockQ, cols, max, sum, factor);
        for (int r = 0; r < rows; ++r)
          if (factor[r] != 1.f) scale_row(acc.data() + r * Dp, Dp, factor[r]);
        const float* v = key_rows(p.v, p.v_strides, p.v_quant, t, true, true, v_buf.data(), ldv);
        if (tile_mask.all_visible(t) || all_finite(v, n, ldv, D))
          gemm<true, true>(rows, Dp, n, st.data(), kBlockQ, v, ldv, acc.data(), Dp);
        else  // a NaN / inf value of a key some rows do not see must not meet their 0 probability
          accumulate_visible_cols(rows, n, st.data(), kBlockQ, v, ldv, Dp, t.key_of(), tile_mask.lo, tile_mask.hi,
                                  tile_mask.mods.sink, acc.data());
      });

      for (int r = 0; r < rows; ++r) {
        const RowSoftmax stats{max[r], sum[r]};
        store_row(acc.data() + r * Dp, D, stats.inv_sum(), row_ptr<T>(p.out, p.out_strides, b, seq.row_q + q0 + r, h));
        p.lse[lse_offset(p, b, h, seq) + q0 + r] = stats.lse();
      }
    }
  });
}

// ---- backward -------------------------------------------------------------------------------

template <typename T, typename Walk>
void backward(const AttentionBwdParams& bp, const Walk& walk) {
  const AttentionParams& p = bp.fwd;
  const int D = p.head_dim, Dp = round_up(D, 2 * kVec), group = p.heads_q / p.heads_kv;
  const int64_t tile_elems = int64_t(D) * kBlockQ;
  const auto q_items = tile_items(p.batch, p.heads_q, kBlockQ, [&](int b) { return sequence_of(p, b).len_q; });
  // Index of each query tile in q_items, to find its precomputed transposed tiles.
  std::vector<int64_t> first_tile(int64_t(p.batch) * p.heads_q + 1, 0);
  for (const TileItem& t : q_items) ++first_tile[int64_t(t.b) * p.heads_q + t.h + 1];
  for (size_t i = 1; i < first_tile.size(); ++i) first_tile[i] += first_tile[i - 1];
  auto tile_of = [&](int b, int h, int q0) { return first_tile[int64_t(b) * p.heads_q + h] + q0 / kBlockQ; };

  // Pass 0, per query tile: delta = rowsum(dO * O) (laid out like lse), and the transposed
  // tiles (scale * Q)^T and dO^T that both passes multiply with (O(seqlen) memory).
  std::vector<float> delta(std::max<int64_t>(1, first_tile.back()) * kBlockQ);
  std::vector<float> qt_all(q_items.size() * tile_elems), dot_all(q_items.size() * tile_elems);
  at::parallel_for(0, int64_t(q_items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(Dp), d_o(Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, q0] = q_items[it];
      const Sequence seq = sequence_of(p, b);
      const int rows = std::min(kBlockQ, seq.len_q - q0);
      auto q_row = [&](int i) { return row_ptr<T>(p.q, p.q_strides, b, seq.row_q + i, h); };
      auto do_row = [&](int i) { return row_ptr<T>(bp.dout, bp.dout_strides, b, seq.row_q + i, h); };
      load_transposed<T>(q_row, q0, rows, D, p.scale, o.data(), qt_all.data() + it * tile_elems);
      load_transposed<T>(do_row, q0, rows, D, 1.f, o.data(), dot_all.data() + it * tile_elems);
      for (int r = 0; r < kBlockQ; ++r) {
        float dot = 0.f;
        if (r < rows) {
          load_row(row_ptr<T>(p.out, p.out_strides, b, seq.row_q + q0 + r, h), D, o.data(), 1.f);
          load_row(do_row(q0 + r), D, d_o.data(), 1.f);
          for (int d = 0; d < D; ++d) dot += o[d] * d_o[d];
        }
        const bool lse_used = r < rows && bp.grad_lse;  // d lse / d s = P: delta -= grad_lse
        delta[it * kBlockQ + r] = lse_used ? dot - bp.grad_lse[lse_offset(p, b, h, seq) + q0 + r] : dot;
      }
    }
  });

  // Per-thread scratch and the query-side vectors of one tile.
  struct Scratch {
    std::vector<float> st, dpt, k_buf, v_buf, q_buf, do_buf, acc_a, acc_b;
    alignas(32) float lse[kBlockQ];
    TileMask mask;
    Scratch(int Dp)
        : st(kBlockK * kBlockQ), dpt(kBlockK * kBlockQ), k_buf(kBlockK * Dp), v_buf(kBlockK * Dp),
          q_buf(kBlockQ * Dp), do_buf(kBlockQ * Dp), acc_a(std::max(kBlockK, kBlockQ) * Dp),
          acc_b(kBlockK * Dp) {}
  };
  auto load_lse = [&](Scratch& s, int b, int h, const Sequence& seq, int q0, int rows) {
    for (int r = 0; r < kBlockQ; ++r)
      s.lse[r] = r < rows ? p.lse[lse_offset(p, b, h, seq) + q0 + r] : INFINITY;  // padding: p = 0
  };
  // Probabilities Pt (in s.st) and dSt (in s.dpt) of the keys of key tile t, k (ldk) and values
  // v (ldv), against query tile `tile` (a key t leaves out has P = dS = 0).
  auto recompute = [&](Scratch& s, int64_t tile, const float* k, int64_t ldk, const float* v, int64_t ldv,
                       const KeyTile& t, int cols) {
    gemm<false, false>(t.n, cols, D, k, ldk, qt_all.data() + tile * tile_elems, kBlockQ, s.st.data(), kBlockQ);
    gemm<false, false>(t.n, cols, D, v, ldv, dot_all.data() + tile * tile_elems, kBlockQ, s.dpt.data(), kBlockQ);
    s.mask.apply(s.st.data(), t, cols, p.softcap);
    probs_and_dscores_cols(s.st.data(), s.dpt.data(), t.n, kBlockQ, cols, s.lse, delta.data() + tile * kBlockQ,
                           p.softcap, t.key_of(), s.mask.mods);
  };

  // Pass 1: dK and dV, one key tile of one kv head per item, over every query that sees it.
  const auto k_items = tile_items(p.batch, p.heads_kv, kBlockK, [&](int b) { return sequence_of(p, b).len_k; });
  at::parallel_for(0, int64_t(k_items.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch s(Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, hk, k0] = k_items[it];
      const Sequence seq = sequence_of(p, b);
      const AttentionMask mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right, p.sink_tokens);
      const int n = std::min(kBlockK, seq.len_k - k0);
      auto k_row = [&](int j) { return row_ptr<T>(p.k, p.k_strides, b, seq.row_k + j, hk); };
      auto v_row = [&](int j) { return row_ptr<T>(p.v, p.v_strides, b, seq.row_k + j, hk); };
      int64_t ldk, ldv;
      const float* k = fp32_rows<T>(k_row, k0, n, D, Dp, false, s.k_buf.data(), ldk);
      const float* v = fp32_rows<T>(v_row, k0, n, D, Dp, false, s.v_buf.data(), ldv);
      float* dk = s.acc_a.data();
      float* dv = s.acc_b.data();
      std::fill(dk, dk + n * Dp, 0.f);
      std::fill(dv, dv + n * Dp, 0.f);
      for (int h = hk * group; h < (hk + 1) * group; ++h) {
        walk.query_tiles(b, h, k0, n, mask, [&](int q0, uint64_t keys) {
          const int rows = std::min(kBlockQ, seq.len_q - q0), cols = round_up(rows, 2 * kVec);
          s.mask.set(mask, q0, rows, p.alibi_slope(b, h));
          load_lse(s, b, h, seq, q0, rows);
          recompute(s, tile_of(b, h, q0), k, ldk, v, ldv, KeyTile{k0, n, keys}, cols);
          auto q_row = [&](int i) { return row_ptr<T>(p.q, p.q_strides, b, seq.row_q + i, h); };
          auto do_row = [&](int i) { return row_ptr<T>(bp.dout, bp.dout_strides, b, seq.row_q + i, h); };
          int64_t ldq, lddo;
          const float* q = fp32_rows<T>(q_row, q0, rows, D, Dp, true, s.q_buf.data(), ldq);
          const float* d_o = fp32_rows<T>(do_row, q0, rows, D, Dp, true, s.do_buf.data(), lddo);
          gemm<false, true>(n, Dp, rows, s.st.data(), kBlockQ, d_o, lddo, dv, Dp);   // dV += P^T dO
          gemm<false, true>(n, Dp, rows, s.dpt.data(), kBlockQ, q, ldq, dk, Dp);     // dK += dS^T Q
        });
      }
      for (int c = 0; c < n; ++c) {
        store_row(dk + c * Dp, D, p.scale, row_ptr<T>(bp.dk, bp.dk_strides, b, seq.row_k + k0 + c, hk));
        store_row(dv + c * Dp, D, 1.f, row_ptr<T>(bp.dv, bp.dv_strides, b, seq.row_k + k0 + c, hk));
      }
    }
  });

  // Pass 2: dQ, one query tile per item, over the key tiles it sees.
  at::parallel_for(0, int64_t(q_items.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch s(Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, q0] = q_items[it];
      const int hk = h / group;
      const Sequence seq = sequence_of(p, b);
      const AttentionMask mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right, p.sink_tokens);
      const int rows = std::min(kBlockQ, seq.len_q - q0), cols = round_up(rows, 2 * kVec);
      s.mask.set(mask, q0, rows, p.alibi_slope(b, h));
      load_lse(s, b, h, seq, q0, rows);
      float* dq = s.acc_a.data();
      std::fill(dq, dq + rows * Dp, 0.f);
      walk.key_tiles(b, h, q0, rows, mask, [&](const KeyTile& t) {
        const int n = t.n;
        auto k_row = [&](int c) { return row_ptr<T>(p.k, p.k_strides, b, seq.row_k + t.row(c, seq.len_k), hk); };
        auto v_row = [&](int c) { return row_ptr<T>(p.v, p.v_strides, b, seq.row_k + t.row(c, seq.len_k), hk); };
        int64_t ldk, ldv;
        const float* k = fp32_rows<T>(k_row, 0, n, D, Dp, true, s.k_buf.data(), ldk, t.contiguous());
        if (t.keys != kAllKeys) zero_unlisted_rows(s.k_buf.data(), n, ldk, D, t.keys);  // dS K: as P V
        const float* v = fp32_rows<T>(v_row, 0, n, D, Dp, false, s.v_buf.data(), ldv, t.gathered == nullptr);
        recompute(s, it, k, ldk, v, ldv, t, cols);
        if (s.mask.all_visible(t) || all_finite(k, n, ldk, D))
          gemm<true, true>(rows, Dp, n, s.dpt.data(), kBlockQ, k, ldk, dq, Dp);  // dQ += dS K
        else  // as in the forward: a masked key's NaN must not meet its dS of 0
          accumulate_visible_cols(rows, n, s.dpt.data(), kBlockQ, k, ldk, Dp, t.key_of(), s.mask.lo, s.mask.hi,
                                  s.mask.mods.sink, dq);
      });
      for (int r = 0; r < rows; ++r)
        store_row(dq + r * Dp, D, p.scale, row_ptr<T>(bp.dq, bp.dq_strides, b, seq.row_q + q0 + r, h));
    }
  });
}

}  // namespace attnkit::cpu::prefill_tiles
