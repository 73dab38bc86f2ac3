// Re-layouts of SM80 MMA accumulator fragments, host-callable so that
// tests/cpp/test_prefill_layouts.cu checks them against CuTe's own partitioning.
#pragma once

#include <cute/layout.hpp>

namespace attnkit::cuda::prefill {

using namespace cute;

// The accumulator of SM80 m16n8k16 MMAs, ((2 cols, 2 rows), MMA_M, MMA_N), viewed as
// (rows, cols) = ((2, MMA_M), (2, MMA_N)) so row-wise softmax can loop over it.
template <typename Layout>
CUTE_HOST_DEVICE auto rowcol(Layout l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The same accumulator re-read as the A operand of the next MMA (P in O += P V): two
// neighbouring n8 tiles form one k16 slice, ((2, 2, 2), MMA_M, MMA_N / 2).
template <typename Layout>
CUTE_HOST_DEVICE auto acc_as_operand_a(Layout l) {
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0, 0>(d), get<0, 1>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

}  // namespace attnkit::cuda::prefill
