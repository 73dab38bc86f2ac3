// Online-softmax arithmetic shared by every kernel: the logit transform (scale, softcap),
// the running (max, sum) of one row, and the merge of two partial results by their
// log-sum-exp. The CPU decode, the CUDA merge kernel and (later) split-KV CUDA kernels all
// call these, so the merge rule is tested once on the CPU.
#pragma once

#include <cmath>

#include "attnkit/macros.h"

namespace attnkit {

constexpr float kNegInf = -INFINITY;

// softcap > 0: s -> softcap * tanh(s / softcap). Applied to already-scaled logits.
ATTNKIT_HD float apply_softcap(float s, float softcap) {
  return softcap > 0.f ? softcap * tanhf(s / softcap) : s;
}

// d(softcap * tanh(s / softcap)) / ds expressed through the capped value t.
ATTNKIT_HD float softcap_grad(float capped, float softcap) {
  if (softcap <= 0.f) return 1.f;
  const float t = capped / softcap;
  return 1.f - t * t;
}

// exp(a - b) that is 0 when a is -inf (also when both are -inf, where a - b is NaN).
ATTNKIT_HD float exp_diff(float a, float b) { return a == kNegInf ? 0.f : expf(a - b); }
// 2^(a - b), the same way: for logits in base 2 (log2(e) folded into the scale).
ATTNKIT_HD float exp2_diff(float a, float b) { return a == kNegInf ? 0.f : exp2f(a - b); }

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

// Running max and sum of exp(s - max) of one row. kBase2: the logits s are in base 2
// (log2(e) * the natural logits, as kernels that fold log2(e) into their scale compute
// them), the sum is of 2^(s - max), and lse() still returns the natural-log LSE.
template <bool kBase2>
struct RowSoftmaxOf {
  float max = kNegInf;
  float sum = 0.f;

  // Moves the running max to new_max (>= max) and returns the factor by which earlier
  // partial sums and outputs must be multiplied.
  ATTNKIT_HD float rescale_to(float new_max) {
    float factor;
    if constexpr (kBase2) factor = exp2_diff(max, new_max);
    else factor = exp_diff(max, new_max);
    max = new_max;
    sum *= factor;
    return factor;
  }

  // A row that saw no key (sum 0) gives lse -inf and output 0; a NaN sum (a NaN logit or
  // value among the visible keys) stays NaN in both, as in torch SDPA.
  ATTNKIT_HD float lse() const {
    if (sum == 0.f) return kNegInf;
    if constexpr (kBase2) return (max + log2f(sum)) * kLn2;
    else return max + logf(sum);
  }
  ATTNKIT_HD float inv_sum() const { return sum == 0.f ? 0.f : 1.f / sum; }
};
using RowSoftmax = RowSoftmaxOf<false>;
using RowSoftmax2 = RowSoftmaxOf<true>;  // base 2 (the CUDA decode)

// Weights to combine two partial attention results over disjoint key sets:
// out = w_a * out_a + w_b * out_b, lse = log(exp(lse_a) + exp(lse_b)).
// Both -inf (no key seen on either side) gives zero weights and lse -inf, never NaN.
struct MergeWeights {
  float w_a, w_b, lse;
};

ATTNKIT_HD MergeWeights merge_weights(float lse_a, float lse_b) {
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == kNegInf) return {0.f, 0.f, kNegInf};
  const float e_a = exp_diff(lse_a, m), e_b = exp_diff(lse_b, m);
  const float sum = e_a + e_b;
  return {e_a / sum, e_b / sum, m + logf(sum)};
}

}  // namespace attnkit
