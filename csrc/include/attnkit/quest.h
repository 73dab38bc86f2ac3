// Quest (Tang et al., 2024) page bounds, shared by the CPU kernel and a later CUDA kernel.
// Torch-free. For keys k of a page with per-channel min m and max M, every k_d lies in
// [m_d, M_d], so q.k = sum_d q_d k_d <= sum_d max(q_d m_d, q_d M_d): the upper bound is exact
// per channel and holds for any sign of q_d (and of the scale, folded into q first).
#pragma once

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

}  // namespace attnkit
