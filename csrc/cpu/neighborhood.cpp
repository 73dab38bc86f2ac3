// CPU neighborhood attention, forward and backward. One work item is one query row (forward,
// dQ) or one key row (dK, dV) of one head; its keys (or queries) come from attnkit/
// neighborhood.h as a box of the grid and are streamed in chunks with an online softmax, so
// memory stays O(tokens). The backward recomputes probabilities from the forward's LSE: dQ per
// query row over its keys, then dK and dV per key row over the queries that see it (the
// inverse windows), so every gradient row has one writer (deterministic, no atomics).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "attnkit/neighborhood.h"
#include "attnkit/sequence.h"
#include "attnkit/softmax.h"
#include "cpu/dispatch.h"
#include "cpu/neighborhood.h"
#include "cpu/tile_math.h"

namespace attnkit::cpu {
namespace {

constexpr int kChunk = 64;  // keys (or queries) whose logits are computed at once
constexpr int64_t kGrain = 16;

template <typename T>
const T* row_ptr(const void* base, const Strides& s, int b, int64_t token, int h) {
  return static_cast<const T*>(base) + offset_of(s, b, token, h);
}
template <typename T>
T* row_ptr(void* base, const Strides& s, int b, int64_t token, int h) {
  return static_cast<T*>(base) + offset_of(s, b, token, h);
}

// A row as fp32 padded with zeros to Dp (a multiple of 8): the row itself when it is fp32 and
// D == Dp, else converted into buf.
template <typename T>
const float* fp32_row(const T* row, int D, int Dp, float* buf) {
  if constexpr (std::is_same_v<T, float>)
    if (D == Dp) return row;
  load_row(row, D, buf, 1.f);
  std::fill(buf + D, buf + Dp, 0.f);
  return buf;
}

inline float dot(const float* a, const float* b, int Dp) {
  vec8 acc{};
  for (int d = 0; d < Dp; d += kVec) acc += load8(a + d) * load8(b + d);
  return hsum8(acc);
}

inline void axpy(float a, const float* x, float* y, int Dp) {
  for (int d = 0; d < Dp; d += kVec) store8(y + d, load8(y + d) + a * load8(x + d));
}

// Tokens of a box, listed into `tokens` (reused storage).
void list_box(const Neighborhood& nb, const GridBox& box, std::vector<int64_t>& tokens) {
  tokens.clear();
  nb.for_each(box, [&](int64_t t) { tokens.push_back(t); });
}

// (batch, head, token) of work item `it` of batch x heads x tokens.
struct RowItem {
  int b, h;
  int64_t token;
};
RowItem row_item(int64_t it, int heads, int64_t tokens) {
  return {int(it / (int64_t(heads) * tokens)), int(it / tokens % heads), it % tokens};
}

int64_t lse_index(const NeighborhoodParams& p, int b, int h, int64_t token) {
  return (int64_t(b) * p.heads_q + h) * p.nbhd.tokens() + token;
}

// Per-thread buffers of rows padded to Dp.
struct Scratch {
  std::vector<float> q, o, acc, k, v, s;
  std::vector<int64_t> tokens;
  explicit Scratch(int Dp) : q(Dp), o(Dp), acc(Dp), k(Dp), v(Dp), s(kChunk) {}
};

// ---- forward --------------------------------------------------------------------------------

template <typename T>
void forward(const NeighborhoodParams& p) {
  const int D = p.head_dim, Dp = round_up(D, kVec), group = p.heads_q / p.heads_kv;
  const int64_t tokens = p.nbhd.tokens();
  at::parallel_for(0, int64_t(p.batch) * p.heads_q * tokens, kGrain, [&](int64_t begin, int64_t end) {
    Scratch s(Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, i] = row_item(it, p.heads_q, tokens);
      const int hk = h / group;
      load_row(row_ptr<T>(p.q, p.q_strides, b, i, h), D, s.q.data(), p.scale);
      std::fill(s.q.begin() + D, s.q.end(), 0.f);
      std::fill(s.acc.begin(), s.acc.end(), 0.f);
      list_box(p.nbhd, p.nbhd.keys_of(i), s.tokens);
      RowSoftmax stats;
      for (size_t c0 = 0; c0 < s.tokens.size(); c0 += kChunk) {
        const int n = int(std::min<size_t>(kChunk, s.tokens.size() - c0));
        float chunk_max = kNegInf;
        for (int c = 0; c < n; ++c) {
          const float* k = fp32_row(row_ptr<T>(p.k, p.k_strides, b, s.tokens[c0 + c], hk), D, Dp, s.k.data());
          s.s[c] = dot(s.q.data(), k, Dp);
          chunk_max = std::max(chunk_max, s.s[c]);
        }
        const float factor = stats.rescale_to(std::max(stats.max, chunk_max));
        if (factor != 1.f) scale_row(s.acc.data(), Dp, factor);
        for (int c = 0; c < n; ++c) {
          const float prob = exp_diff(s.s[c], stats.max);
          stats.sum += prob;
          const float* v = fp32_row(row_ptr<T>(p.v, p.v_strides, b, s.tokens[c0 + c], hk), D, Dp, s.v.data());
          axpy(prob, v, s.acc.data(), Dp);
        }
      }
      store_row(s.acc.data(), D, stats.inv_sum(), row_ptr<T>(p.out, p.out_strides, b, i, h));
      p.lse[lse_index(p, b, h, i)] = stats.lse();
    }
  });
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
void backward(const NeighborhoodBwdParams& bp) {
  const NeighborhoodParams& p = bp.fwd;
  const int D = p.head_dim, Dp = round_up(D, kVec), group = p.heads_q / p.heads_kv;
  const int64_t tokens = p.nbhd.tokens();
  std::vector<float> delta(size_t(int64_t(p.batch) * p.heads_q * tokens));  // rowsum(dO * O), like lse

  // Pass 1, per query row: delta, then dQ = scale * sum_j dS_ij K_j over the row's keys.
  at::parallel_for(0, int64_t(p.batch) * p.heads_q * tokens, kGrain, [&](int64_t begin, int64_t end) {
    Scratch s(Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, h, i] = row_item(it, p.heads_q, tokens);
      const int hk = h / group;
      const float* d_o = fp32_row(row_ptr<T>(bp.dout, bp.dout_strides, b, i, h), D, Dp, s.o.data());
      load_row(row_ptr<T>(p.out, p.out_strides, b, i, h), D, s.acc.data(), 1.f);
      std::fill(s.acc.begin() + D, s.acc.end(), 0.f);
      const float row_delta = dot(d_o, s.acc.data(), Dp);
      delta[it] = row_delta;
      const float lse = p.lse[lse_index(p, b, h, i)];
      load_row(row_ptr<T>(p.q, p.q_strides, b, i, h), D, s.q.data(), p.scale);
      std::fill(s.q.begin() + D, s.q.end(), 0.f);
      std::fill(s.acc.begin(), s.acc.end(), 0.f);
      list_box(p.nbhd, p.nbhd.keys_of(i), s.tokens);
      for (const int64_t j : s.tokens) {
        const float* k = fp32_row(row_ptr<T>(p.k, p.k_strides, b, j, hk), D, Dp, s.k.data());
        const float* v = fp32_row(row_ptr<T>(p.v, p.v_strides, b, j, hk), D, Dp, s.v.data());
        const float prob = exp_diff(dot(s.q.data(), k, Dp), lse);
        axpy(prob * (dot(d_o, v, Dp) - row_delta), k, s.acc.data(), Dp);
      }
      store_row(s.acc.data(), D, p.scale, row_ptr<T>(bp.dq, bp.dq_strides, b, i, h));
    }
  });

  // Pass 2, per key row of a kv head: dV = sum_i P_ij dO_i and dK = sum_i dS_ij (scale Q_i)
  // over the queries of every q head of the group that see the key.
  at::parallel_for(0, int64_t(p.batch) * p.heads_kv * tokens, kGrain, [&](int64_t begin, int64_t end) {
    Scratch s(Dp);
    std::vector<float> dk(Dp);
    for (int64_t it = begin; it < end; ++it) {
      const auto [b, hk, j] = row_item(it, p.heads_kv, tokens);
      const float* k = fp32_row(row_ptr<T>(p.k, p.k_strides, b, j, hk), D, Dp, s.k.data());
      const float* v = fp32_row(row_ptr<T>(p.v, p.v_strides, b, j, hk), D, Dp, s.v.data());
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(s.acc.begin(), s.acc.end(), 0.f);  // dV
      list_box(p.nbhd, p.nbhd.queries_of(j), s.tokens);
      for (int h = hk * group; h < (hk + 1) * group; ++h)
        for (const int64_t i : s.tokens) {
          load_row(row_ptr<T>(p.q, p.q_strides, b, i, h), D, s.q.data(), p.scale);
          std::fill(s.q.begin() + D, s.q.end(), 0.f);
          const float* d_o = fp32_row(row_ptr<T>(bp.dout, bp.dout_strides, b, i, h), D, Dp, s.o.data());
          const float prob = exp_diff(dot(s.q.data(), k, Dp), p.lse[lse_index(p, b, h, i)]);
          axpy(prob, d_o, s.acc.data(), Dp);
          axpy(prob * (dot(d_o, v, Dp) - delta[lse_index(p, b, h, i)]), s.q.data(), dk.data(), Dp);
        }
      store_row(dk.data(), D, 1.f, row_ptr<T>(bp.dk, bp.dk_strides, b, j, hk));
      store_row(s.acc.data(), D, 1.f, row_ptr<T>(bp.dv, bp.dv_strides, b, j, hk));
    }
  });
}

}  // namespace

void neighborhood_fwd(const NeighborhoodParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward<decltype(tag)>(params); });
}

void neighborhood_bwd(const NeighborhoodBwdParams& params) {
  dispatch_dtype(params.fwd.dtype, [&](auto tag) { backward<decltype(tag)>(params); });
}

}  // namespace attnkit::cpu
