// Building blocks of the CPU kernels: 8-wide float vectors (GCC/Clang vector extensions,
// AVX2/FMA when compiled with -march=native, SSE or NEON otherwise), a register-blocked
// matrix product on small fp32 tiles, a vectorised exp, dtype conversion of rows, and the
// online-softmax update of a tile of logits. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "attnkit/dtype.h"
#include "attnkit/mask.h"
#include "attnkit/softmax.h"

namespace attnkit::cpu {

typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
constexpr int kVec = 8;

inline vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }
inline vec8 splat8(float x) { return vec8{} + x; }

inline float hsum8(vec8 v) {
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
}
// Max that propagates NaN (unlike std::max / fmaxf), so a NaN logit makes its row NaN.
inline vec8 nan_max8(vec8 a, vec8 b) { return (b > a) | (b != b) ? b : a; }
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }
inline float hmax8(vec8 v) {
  float m = v[0];
  for (int i = 1; i < kVec; ++i) m = nan_max(m, v[i]);
  return m;
}

// exp(x) for x <= 88, relative error ~2e-7 (Cephes polynomial). Inputs below -87 give a
// value < 2e-38 instead of 0; callers that need an exact 0 for masked logits select it.
// NaN gives NaN (the clamps below would turn it into 88.3: a finite, huge probability).
inline vec8 exp8(vec8 x) {
  const vec8 input = x;
  x = x < splat8(88.3f) ? x : splat8(88.3f);
  x = x > splat8(-87.3f) ? x : splat8(-87.3f);
  const vec8 t = x * 1.44269504088896341f + 0.5f;
  vec8 fx = __builtin_convertvector(__builtin_convertvector(t, ivec8), vec8);  // trunc
  fx = fx > t ? fx - 1.f : fx;                                                 // floor
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  vec8 y = splat8(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  const ivec8 pow2 = (__builtin_convertvector(fx, ivec8) + 127) << 23;
  vec8 scale;
  std::memcpy(&scale, &pow2, sizeof(scale));
  return input == input ? y * scale : input;
}

// softcap * tanh(x / softcap) through exp: tanh(u) = 1 - 2 / (exp(2u) + 1).
inline vec8 softcap8(vec8 x, float softcap) {
  const vec8 e = exp8(x * (2.f / softcap));
  return (1.f - 2.f / (e + 1.f)) * softcap;
}

// ---- dtype conversion of contiguous rows ------------------------------------------------

inline void load_row(const float* src, int n, float* dst, float mul) {
  for (int i = 0; i < n; ++i) dst[i] = src[i] * mul;
}
inline void load_row(const BFloat16* src, int n, float* dst, float mul) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(bits[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    dst[i] = f * mul;
  }
}
inline void load_row(const Half* src, int n, float* dst, float mul) {
  int i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(f, _mm256_set1_ps(mul)));
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]) * mul;
}

template <typename T>
inline void store_row(const float* src, int n, float mul, T* dst) {
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i] * mul);
}

// ---- matrix product on fp32 tiles ---------------------------------------------------------

// C[MR x 16] (+)= A[MR x K] * B[K x 16]. A(i, k) is A[i * lda + k], or A[k * lda + i] when
// kTransA (so a transposed operand costs nothing); B rows are contiguous.
template <int MR, bool kTransA, bool kAccumulate>
inline void gemm_micro(int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  vec8 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = kAccumulate ? load8(C + r * ldc) : vec8{};
    acc[r][1] = kAccumulate ? load8(C + r * ldc + kVec) : vec8{};
  }
  for (int k = 0; k < K; ++k) {
    const vec8 b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + kVec);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = kTransA ? A[k * lda + r] : A[r * lda + k];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(C + r * ldc, acc[r][0]);
    store8(C + r * ldc + kVec, acc[r][1]);
  }
}

// C[M x N] (+)= A[M x K] * B[K x N], N a multiple of 16 (tiles are padded to it).
template <bool kTransA, bool kAccumulate>
inline void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc) {
  constexpr int kMR = 6;
  auto a_rows = [&](int i) { return kTransA ? A + i : A + i * lda; };
  for (int j = 0; j < N; j += 2 * kVec) {
    int i = 0;
    for (; i + kMR <= M; i += kMR)
      gemm_micro<kMR, kTransA, kAccumulate>(K, a_rows(i), lda, B + j, ldb, C + i * ldc + j, ldc);
    const float* a = a_rows(i);
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 5: gemm_micro<5, kTransA, kAccumulate>(K, a, lda, B + j, ldb, c, ldc); break;
      case 4: gemm_micro<4, kTransA, kAccumulate>(K, a, lda, B + j, ldb, c, ldc); break;
      case 3: gemm_micro<3, kTransA, kAccumulate>(K, a, lda, B + j, ldb, c, ldc); break;
      case 2: gemm_micro<2, kTransA, kAccumulate>(K, a, lda, B + j, ldb, c, ldc); break;
      case 1: gemm_micro<1, kTransA, kAccumulate>(K, a, lda, B + j, ldb, c, ldc); break;
      default: break;
    }
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// ---- logits of one tile, one row per query (decode) -----------------------------------------------------------------

// In place on a row of n_pad (multiple of 8) logits for keys key0 .. key0 + n_pad: applies
// softcap, and sets keys outside `visible` (and padding beyond n_valid) to -inf.
inline void transform_and_mask_row(float* s, int n_pad, int n_valid, int key0, KeyRange visible,
                                   float softcap) {
  const int lo = (visible.begin > key0 ? visible.begin : key0) - key0;
  int hi = (visible.end < key0 + n_valid ? visible.end : key0 + n_valid) - key0;
  if (hi < lo) hi = lo;
  ivec8 idx;
  for (int c = 0; c < kVec; ++c) idx[c] = c;
  for (int c = 0; c < n_pad; c += kVec) {
    vec8 v = load8(s + c);
    if (softcap > 0.f) v = softcap8(v, softcap);
    const ivec8 col = idx + c;
    v = (col >= lo) & (col < hi) ? v : splat8(kNegInf);
    store8(s + c, v);
  }
}

// Online-softmax step of one row: s (already transformed and masked) -> probabilities
// exp(s - max) in place; returns the factor by which the row's earlier output must be scaled.
inline float softmax_update_row(float* s, int n_pad, RowSoftmax& state) {
  vec8 vmax = splat8(kNegInf);
  for (int c = 0; c < n_pad; c += kVec) {
    vmax = nan_max8(vmax, load8(s + c));
  }
  const float new_max = nan_max(state.max, hmax8(vmax));
  const float factor = state.rescale_to(new_max);
  if (new_max == kNegInf) {  // nothing visible so far: probabilities are all zero
    std::memset(s, 0, sizeof(float) * n_pad);
    return factor;
  }
  vec8 vsum{};
  for (int c = 0; c < n_pad; c += kVec) {
    const vec8 v = load8(s + c);
    const vec8 p = v == splat8(kNegInf) ? vec8{} : exp8(v - new_max);
    vsum += p;
    store8(s + c, p);
  }
  state.sum += hsum8(vsum);
  return factor;
}

inline void scale_row(float* row, int n, float factor) {
  for (int c = 0; c < n; ++c) row[c] *= factor;
}

// ---- logits of one tile, one column per query (prefill) -------------------------------------
// The prefill kernels compute St = K * Q^T (keys x queries, ld = queries): Q is transposed
// once per query tile, K and V are used as stored, and per-query statistics vectorise.

// The score modifiers of a tile, beyond softcap: query column q also sees the sink keys
// [0, min(sink, hi[q])) (AttentionMask::sees), and with alibi_slope != 0 its logit of key j
// gains alibi_bias(alibi_slope, diag0 + q, j) (diag0: the diagonal of column 0).
struct ScoreMods {
  int sink = 0;
  float alibi_slope = 0.f;
  int diag0 = 0;
};

// ALiBi biases of query columns q .. q + 7 against key j.
inline vec8 alibi8(const ScoreMods& mods, int q, int j) {
  ivec8 lane;
  for (int c = 0; c < kVec; ++c) lane[c] = c;
  const vec8 distance = __builtin_convertvector(lane + (mods.diag0 + q - j), vec8);
  return splat8(-mods.alibi_slope) * (distance < 0.f ? -distance : distance);
}

// Query q sees keys [lo[q], hi[q]) and the sinks of mods. In place on St (n keys, key c of the
// tile being key_of(c); cols query columns, a multiple of 8): softcap, then the ALiBi bias,
// then -inf outside the visible keys.
template <typename KeyOf>
void transform_and_mask_cols(float* st, int n, int ld, int cols, KeyOf key_of, const int32_t* lo, const int32_t* hi,
                             float softcap, const ScoreMods& mods) {
  for (int c = 0; c < n; ++c) {
    const int32_t j = key_of(c);
    const int32_t sink_key = j < mods.sink ? -1 : 0;  // all ones: j is a sink
    float* row = st + int64_t(c) * ld;
    for (int q = 0; q < cols; q += kVec) {
      ivec8 l, h;
      std::memcpy(&l, lo + q, sizeof(l));
      std::memcpy(&h, hi + q, sizeof(h));
      vec8 v = load8(row + q);
      if (softcap > 0.f) v = softcap8(v, softcap);
      if (mods.alibi_slope != 0.f) v += alibi8(mods, q, j);
      store8(row + q, ((l <= j) | sink_key) & (j < h) ? v : splat8(kNegInf));
    }
  }
}

// Online-softmax step for every query column of St (n x ld, already masked): probabilities
// exp(s - max) in place; max and sum per query updated; factor[q] receives the rescale
// of the query's earlier output.
inline void softmax_update_cols(float* st, int n, int ld, int cols, float* max, float* sum, float* factor) {
  for (int q = 0; q < cols; q += kVec) {
    const vec8 old_max = load8(max + q);
    vec8 new_max = old_max;
    for (int c = 0; c < n; ++c) new_max = nan_max8(new_max, load8(st + int64_t(c) * ld + q));
    const vec8 f = old_max == splat8(kNegInf) ? vec8{} : exp8(old_max - new_max);
    vec8 s = load8(sum + q) * f;
    for (int c = 0; c < n; ++c) {
      float* p = st + int64_t(c) * ld + q;
      const vec8 v = load8(p);
      const vec8 prob = v == splat8(kNegInf) ? vec8{} : exp8(v - new_max);
      s += prob;
      store8(p, prob);
    }
    store8(max + q, new_max);
    store8(sum + q, s);
    store8(factor + q, f);
  }
}

// Whether the first D values of n rows (ld apart) are all finite (no exponent of all ones;
// integer ops, so the loop vectorises).
inline bool all_finite(const float* rows, int n, int64_t ld, int D) {
  uint32_t non_finite = 0;
  for (int c = 0; c < n; ++c)
    for (int d = 0; d < D; ++d) {
      uint32_t bits;
      std::memcpy(&bits, rows + c * ld + d, sizeof(bits));
      non_finite |= (bits & 0x7f800000u) == 0x7f800000u;
    }
  return non_finite == 0;
}

// acc[r] += sum of Pt(c, r) v_c over the keys c of the tile (key c being key_of(c)) that
// query r sees, its sinks [0, min(sink, hi[r])) and [lo[r], hi[r]): P^T V without reading a
// value its row does not see, so a masked key's NaN never meets its zero probability (the
// rare path of a tile holding a non-finite value). Rows of v and acc: Dp wide.
template <typename KeyOf>
void accumulate_visible_cols(int rows, int n, const float* pt, int ld, const float* v, int64_t ldv, int Dp,
                             KeyOf key_of, const int32_t* lo, const int32_t* hi, int sink, float* acc) {
  for (int r = 0; r < rows; ++r) {
    float* o = acc + int64_t(r) * Dp;
    for (int c = 0; c < n; ++c) {
      const int j = key_of(c);
      if (!((j >= lo[r] || j < sink) && j < hi[r])) continue;
      const vec8 prob = splat8(pt[int64_t(c) * ld + r]);
      for (int d = 0; d < Dp; d += kVec) store8(o + d, load8(o + d) + prob * load8(v + c * ldv + d));
    }
  }
}

// Backward: from masked logits St (key c of the tile key_of(c), after transform_and_mask_cols with
// mods) and dPt = V * dO^T (both n x ld) to probabilities Pt = exp(s - lse) (into st) and
// dSt = Pt * (dPt - delta) * dsoftcap (into dpt).
template <typename KeyOf>
void probs_and_dscores_cols(float* st, float* dpt, int n, int ld, int cols, const float* lse, const float* delta,
                            float softcap, KeyOf key_of, const ScoreMods& mods) {
  for (int c = 0; c < n; ++c) {
    float* s_row = st + int64_t(c) * ld;
    float* dp_row = dpt + int64_t(c) * ld;
    for (int q = 0; q < cols; q += kVec) {
      const vec8 t = load8(s_row + q);
      const ivec8 masked = t == splat8(kNegInf);
      const vec8 p = masked ? vec8{} : exp8(t - load8(lse + q));
      vec8 ds = p * (load8(dp_row + q) - load8(delta + q));
      if (softcap > 0.f) {  // the derivative of the capped logit, before its ALiBi bias
        const vec8 capped = mods.alibi_slope != 0.f ? t - alibi8(mods, q, key_of(c)) : t;
        const vec8 u = capped / softcap;
        ds = ds * (1.f - u * u);
      }
      ds = masked ? vec8{} : ds;  // a masked key's value may be NaN: 0 * NaN must not reach dQ, dK
      store8(s_row + q, p);
      store8(dp_row + q, ds);
    }
  }
}

}  // namespace attnkit::cpu
