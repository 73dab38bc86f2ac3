// CPU prefill attention, forward and backward, flash-style: a tile of kBlockQ queries of one
// head streams over tiles of kBlockK keys with an online softmax, so memory stays
// O(seqlen) (no seqlen_q x seqlen_k matrix). The backward recomputes probabilities from the
// forward's LSE in two passes: dK/dV per key tile, then dQ per query tile, so no two
// threads ever write the same gradient row (deterministic, no atomics).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attnkit/mask.h"
#include "attnkit/softmax.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/tile_math.h"

namespace attnkit::cpu {
namespace {

constexpr int kBlockQ = 64;
constexpr int kBlockK = 64;

// One sequence of a dense or varlen batch: its lengths and the first row of its tokens.
struct Sequence {
  int len_q, len_k;
  int64_t q_row0, k_row0;
};

Sequence sequence_of(const AttentionParams& p, int b) {
  if (!p.is_varlen()) return {p.seqlen_q, p.seqlen_k, 0, 0};
  const int32_t* cq = p.cu_seqlens_q;
  const int32_t* ck = p.cu_seqlens_k;
  return {cq[b + 1] - cq[b], ck[b + 1] - ck[b], cq[b], ck[b]};
}

// Index of (batch b, head h, global query row) in lse: (B, H, Sq) dense, (H, total_q) varlen.
int64_t lse_index(const AttentionParams& p, int b, int h, int64_t row) {
  if (p.is_varlen()) return int64_t(h) * p.cu_seqlens_q[p.batch] + row;
  return (int64_t(b) * p.heads_q + h) * p.seqlen_q + row;
}

template <typename T>
const T* row_ptr(const void* base, const Strides& s, int b, int64_t row, int h) {
  return static_cast<const T*>(base) + b * s.batch + row * s.row + int64_t(h) * s.head;
}
template <typename T>
T* row_ptr(void* base, const Strides& s, int b, int64_t row, int h) {
  return static_cast<T*>(base) + b * s.batch + row * s.row + int64_t(h) * s.head;
}

// dst (n_pad x ld) <- rows first .. first + n of a tensor, times mul; zero padding.
template <typename T, typename RowFn>
void load_tile(RowFn row, int first, int n, int n_pad, int D, int ld, float mul, float* dst) {
  for (int r = 0; r < n; ++r) {
    load_row(row(first + r), D, dst + int64_t(r) * ld, mul);
    std::fill(dst + int64_t(r) * ld + D, dst + int64_t(r + 1) * ld, 0.f);
  }
  std::fill(dst + int64_t(n) * ld, dst + int64_t(n_pad) * ld, 0.f);
}

// dst (D x kBlockK): dst[d][c] = row(first + c)[d] for c < n, zero for the other columns.
template <typename T, typename RowFn>
void load_tile_transposed(RowFn row, int first, int n, int D, float* buf, float* dst) {
  std::fill(dst, dst + int64_t(D) * kBlockK, 0.f);
  for (int c = 0; c < n; ++c) {
    load_row(row(first + c), D, buf, 1.f);
    for (int d = 0; d < D; ++d) dst[int64_t(d) * kBlockK + c] = buf[d];
  }
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

template <typename T>
void forward(const AttentionParams& p) {
  const int D = p.head_dim, Dp = round_up(D, 2 * kVec), group = p.heads_q / p.heads_kv;
  const auto items = tile_items(p.batch, p.heads_q, kBlockQ,
                                [&](int b) { return sequence_of(p, b).len_q; });

  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(kBlockQ * Dp), acc(kBlockQ * Dp), s_tile(kBlockQ * kBlockK),
        kt(int64_t(D) * kBlockK), v_tile(kBlockK * Dp), row_buf(Dp);
    RowSoftmax state[kBlockQ];
    KeyRange visible[kBlockQ];

    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, q0] = items[it];
      const int hk = h / group;
      const Sequence seq = sequence_of(p, b);
      const AttentionMask mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right);
      const int rows = std::min(kBlockQ, seq.len_q - q0);
      auto q_row = [&](int i) { return row_ptr<T>(p.q, p.q_strides, b, seq.q_row0 + i, h); };
      auto k_row = [&](int j) { return row_ptr<T>(p.k, p.k_strides, b, seq.k_row0 + j, hk); };
      auto v_row = [&](int j) { return row_ptr<T>(p.v, p.v_strides, b, seq.k_row0 + j, hk); };

      load_tile<T>(q_row, q0, rows, rows, D, Dp, p.scale, q_tile.data());
      std::fill(acc.begin(), acc.begin() + rows * Dp, 0.f);
      for (int r = 0; r < rows; ++r) {
        state[r] = RowSoftmax{};
        visible[r] = mask.keys_of(q0 + r);
      }
      const KeyRange span = mask.keys_of_rows(q0, q0 + rows);

      for (int k0 = span.begin; k0 < span.end; k0 += kBlockK) {
        const int n = std::min(kBlockK, span.end - k0), n_pad = round_up(n, 2 * kVec);
        load_tile_transposed<T>(k_row, k0, n, D, row_buf.data(), kt.data());
        load_tile<T>(v_row, k0, n, n, D, Dp, 1.f, v_tile.data());
        std::fill(s_tile.begin(), s_tile.begin() + rows * kBlockK, 0.f);
        gemm_acc(rows, n_pad, D, q_tile.data(), Dp, 1, kt.data(), kBlockK, s_tile.data(), kBlockK);
        for (int r = 0; r < rows; ++r) {
          float* s = s_tile.data() + r * kBlockK;
          transform_and_mask_row(s, n_pad, n, k0, visible[r], p.softcap);
          const float factor = softmax_update_row(s, n_pad, state[r]);
          if (factor != 1.f) scale_row(acc.data() + r * Dp, Dp, factor);
        }
        gemm_acc(rows, Dp, n, s_tile.data(), kBlockK, 1, v_tile.data(), Dp, acc.data(), Dp);
      }

      for (int r = 0; r < rows; ++r) {
        store_row(acc.data() + r * Dp, D, state[r].inv_sum(),
                  row_ptr<T>(p.out, p.out_strides, b, seq.q_row0 + q0 + r, h));
        p.lse[lse_index(p, b, h, seq.q_row0 + q0 + r)] = state[r].lse();
      }
    }
  });
}

// ---- backward -------------------------------------------------------------------------------

// Scratch of one thread for one (query tile, key tile) pair of the backward.
struct BwdScratch {
  std::vector<float> q_tile, do_tile, kt, vt, k_tile, scores, probs, dscores, row_buf, acc;
  float lse[kBlockQ], delta[kBlockQ];
  KeyRange visible[kBlockQ];
  BwdScratch(int D, int Dp)
      : q_tile(kBlockQ * Dp), do_tile(kBlockQ * Dp), kt(int64_t(D) * kBlockK),
        vt(int64_t(D) * kBlockK), k_tile(kBlockK * Dp), scores(kBlockQ * kBlockK),
        probs(kBlockQ * kBlockK), dscores(kBlockQ * kBlockK), row_buf(Dp),
        acc(std::max(kBlockQ, kBlockK) * Dp) {}
};

// For queries in s.q_tile / s.do_tile (rows) and keys k0 .. k0 + n in s.kt / s.vt:
// probs = exp(s - lse) and dscores = d loss / d (scale * q.k), both (rows x kBlockK).
void probs_and_dscores(BwdScratch& s, int rows, int n, int D, int Dp, int k0, float softcap) {
  const int n_pad = round_up(n, 2 * kVec);
  std::fill(s.scores.begin(), s.scores.begin() + rows * kBlockK, 0.f);
  std::fill(s.dscores.begin(), s.dscores.begin() + rows * kBlockK, 0.f);
  gemm_acc(rows, n_pad, D, s.q_tile.data(), Dp, 1, s.kt.data(),
           kBlockK, s.scores.data(), kBlockK);
  // dP = dO V^T, accumulated into dscores before it is turned into dS.
  gemm_acc(rows, n_pad, D, s.do_tile.data(), Dp, 1, s.vt.data(),
           kBlockK, s.dscores.data(), kBlockK);
  for (int r = 0; r < rows; ++r) {
    float* t = s.scores.data() + r * kBlockK;
    float* prob = s.probs.data() + r * kBlockK;
    float* ds = s.dscores.data() + r * kBlockK;
    transform_and_mask_row(t, n_pad, n, k0, s.visible[r], softcap);
    // A row that sees no key has every logit masked, so its probabilities are all 0.
    const float lse = s.lse[r];
    for (int c = 0; c < n_pad; c += kVec) {
      const vec8 tv = load8(t + c);
      const vec8 pv = tv == splat8(kNegInf) ? vec8{} : exp8(tv - lse);
      vec8 dsv = pv * (load8(ds + c) - s.delta[r]);
      if (softcap > 0.f) {
        const vec8 u = tv / softcap;
        dsv = tv == splat8(kNegInf) ? vec8{} : dsv * (1.f - u * u);
      }
      store8(prob + c, pv);
      store8(ds + c, dsv);
    }
  }
}

template <typename T>
void backward(const AttentionBwdParams& bp) {
  const AttentionParams& p = bp.fwd;
  const int D = p.head_dim, Dp = round_up(D, 2 * kVec), group = p.heads_q / p.heads_kv;
  const int64_t total_q = p.is_varlen() ? p.cu_seqlens_q[p.batch] : int64_t(p.batch) * p.seqlen_q;

  // delta = rowsum(dO * O), laid out like lse.
  std::vector<float> delta(total_q * p.heads_q);
  const auto q_items = tile_items(p.batch, p.heads_q, kBlockQ,
                                  [&](int b) { return sequence_of(p, b).len_q; });
  at::parallel_for(0, int64_t(q_items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D), d_o(D);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, q0] = q_items[it];
      const Sequence seq = sequence_of(p, b);
      for (int i = q0; i < std::min(q0 + kBlockQ, seq.len_q); ++i) {
        const int64_t row = seq.q_row0 + i;
        load_row(row_ptr<T>(p.out, p.out_strides, b, row, h), D, o.data(), 1.f);
        load_row(row_ptr<T>(bp.dout, bp.dout_strides, b, row, h), D, d_o.data(), 1.f);
        float sum = 0.f;
        for (int d = 0; d < D; ++d) sum += o[d] * d_o[d];
        delta[lse_index(p, b, h, row)] = sum;
      }
    }
  });

  // Loads the query-side tiles (scaled q, dO, lse, delta, visible keys) of one query tile.
  auto load_query_side = [&](BwdScratch& s, int b, int h, const Sequence& seq,
                             const AttentionMask& mask, int q0, int rows) {
    auto q_row = [&](int i) { return row_ptr<T>(p.q, p.q_strides, b, seq.q_row0 + i, h); };
    auto do_row = [&](int i) { return row_ptr<T>(bp.dout, bp.dout_strides, b, seq.q_row0 + i, h); };
    load_tile<T>(q_row, q0, rows, rows, D, Dp, p.scale, s.q_tile.data());
    load_tile<T>(do_row, q0, rows, rows, D, Dp, 1.f, s.do_tile.data());
    for (int r = 0; r < rows; ++r) {
      const int64_t idx = lse_index(p, b, h, seq.q_row0 + q0 + r);
      s.lse[r] = p.lse[idx];
      s.delta[r] = delta[idx];
      s.visible[r] = mask.keys_of(q0 + r);
    }
  };
  auto load_key_side = [&](BwdScratch& s, int b, int hk, const Sequence& seq, int k0, int n,
                           bool with_rows) {
    auto k_row = [&](int j) { return row_ptr<T>(p.k, p.k_strides, b, seq.k_row0 + j, hk); };
    auto v_row = [&](int j) { return row_ptr<T>(p.v, p.v_strides, b, seq.k_row0 + j, hk); };
    load_tile_transposed<T>(k_row, k0, n, D, s.row_buf.data(), s.kt.data());
    load_tile_transposed<T>(v_row, k0, n, D, s.row_buf.data(), s.vt.data());
    if (with_rows) load_tile<T>(k_row, k0, n, n, D, Dp, 1.f, s.k_tile.data());
  };

  // Pass 1: dK and dV, one key tile of one kv head per item, over every query that sees it.
  const auto k_items = tile_items(p.batch, p.heads_kv, kBlockK,
                                  [&](int b) { return sequence_of(p, b).len_k; });
  at::parallel_for(0, int64_t(k_items.size()), 1, [&](int64_t begin, int64_t end) {
    BwdScratch s(D, Dp);
    std::vector<float> dk_acc(kBlockK * Dp), dv_acc(kBlockK * Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, hk, k0] = k_items[it];
      const Sequence seq = sequence_of(p, b);
      const AttentionMask mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right);
      const int n = std::min(kBlockK, seq.len_k - k0);
      load_key_side(s, b, hk, seq, k0, n, false);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int h = hk * group; h < (hk + 1) * group; ++h) {
        for (int q0 = 0; q0 < seq.len_q; q0 += kBlockQ) {
          const int rows = std::min(kBlockQ, seq.len_q - q0);
          const KeyRange span = mask.keys_of_rows(q0, q0 + rows);
          if (span.empty() || span.end <= k0 || span.begin >= k0 + n) continue;
          load_query_side(s, b, h, seq, mask, q0, rows);
          probs_and_dscores(s, rows, n, D, Dp, k0, p.softcap);
          // dV += P^T dO and dK += dS^T (scale q): transposed A through its strides.
          gemm_acc(n, Dp, rows, s.probs.data(), 1, kBlockK, s.do_tile.data(), Dp, dv_acc.data(), Dp);
          gemm_acc(n, Dp, rows, s.dscores.data(), 1, kBlockK, s.q_tile.data(), Dp, dk_acc.data(), Dp);
        }
      }
      for (int c = 0; c < n; ++c) {
        store_row(dk_acc.data() + c * Dp, D, 1.f,
                  row_ptr<T>(bp.dk, bp.dk_strides, b, seq.k_row0 + k0 + c, hk));
        store_row(dv_acc.data() + c * Dp, D, 1.f,
                  row_ptr<T>(bp.dv, bp.dv_strides, b, seq.k_row0 + k0 + c, hk));
      }
    }
  });

  // Pass 2: dQ, one query tile per item, over the key tiles it sees.
  at::parallel_for(0, int64_t(q_items.size()), 1, [&](int64_t begin, int64_t end) {
    BwdScratch s(D, Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, q0] = q_items[it];
      const int hk = h / group;
      const Sequence seq = sequence_of(p, b);
      const AttentionMask mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right);
      const int rows = std::min(kBlockQ, seq.len_q - q0);
      load_query_side(s, b, h, seq, mask, q0, rows);
      std::fill(s.acc.begin(), s.acc.begin() + rows * Dp, 0.f);
      const KeyRange span = mask.keys_of_rows(q0, q0 + rows);
      for (int k0 = span.begin; k0 < span.end; k0 += kBlockK) {
        const int n = std::min(kBlockK, span.end - k0);
        load_key_side(s, b, hk, seq, k0, n, true);
        probs_and_dscores(s, rows, n, D, Dp, k0, p.softcap);
        gemm_acc(rows, Dp, n, s.dscores.data(), kBlockK, 1, s.k_tile.data(), Dp, s.acc.data(), Dp);
      }
      for (int r = 0; r < rows; ++r)
        store_row(s.acc.data() + r * Dp, D, p.scale,
                  row_ptr<T>(bp.dq, bp.dq_strides, b, seq.q_row0 + q0 + r, h));
    }
  });
}

}  // namespace

void attention_fwd(const AttentionParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward<decltype(tag)>(params); });
}

void attention_bwd(const AttentionBwdParams& params) {
  dispatch_dtype(params.fwd.dtype, [&](auto tag) { backward<decltype(tag)>(params); });
}

}  // namespace attnkit::cpu
