// Quest (Tang et al., 2024) page bounds and their upkeep on append, shared by the CPU and
// CUDA kernels. Torch-free. For keys k of a page with per-channel min m and max M, every k_d lies in
// [m_d, M_d], so q.k = sum_d q_d k_d <= sum_d max(q_d m_d, q_d M_d): the upper bound is exact
// per channel and holds for any sign of q_d (and of the scale, folded into q first).
#pragma once

#include <limits>

#include "attnkit/macros.h"

namespace attnkit {

// One channel's contribution: max over k_d in [lo, hi] of sq * k_d (sq = scale * q_d).
ATTNKIT_HD float quest_channel_bound(float sq, float lo, float hi) {
  const float a = sq * lo, b = sq * hi;
  return a > b ? a : b;
}

// Upper bound of scale * q.k over every key of a page with channel bounds [kmin, kmax].
ATTNKIT_HD float quest_page_bound(const float* q, const float* kmin, const float* kmax, int head_dim, float scale) {
  float acc = 0.f;
  for (int d = 0; d < head_dim; ++d) acc += quest_channel_bound(scale * q[d], kmin[d], kmax[d]);
  return acc;
}

// Bounds of a page with no key yet: every key folded in replaces them.
ATTNKIT_HD void quest_empty_bounds(float& lo, float& hi) {
  lo = std::numeric_limits<float>::infinity();
  hi = -std::numeric_limits<float>::infinity();
}

// Folds one key channel value x into a page's bounds [lo, hi] as std::min / std::max do:
// a NaN x leaves them as they are, and of equal values (-0, +0) the first one stays. The
// CPU and CUDA appends fold a page's rows in the same (token) order, so their bounds are
// bit-identical.
ATTNKIT_HD void quest_fold_key(float& lo, float& hi, float x) {
  lo = x < lo ? x : lo;
  hi = hi < x ? x : hi;
}

}  // namespace attnkit
