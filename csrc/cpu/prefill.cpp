// CPU prefill attention, forward and backward: the flash-style tile kernels of
// cpu/prefill_kernel.h walking the key tiles the causal / window mask leaves.
#include <algorithm>

#include "attnkit/mask.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/prefill_kernel.h"

namespace attnkit::cpu {
namespace {

using namespace prefill_tiles;

// The tiles the causal / window mask leaves: for a query tile, the span of its rows' keys;
// for a key tile, the query tiles whose span meets it.
struct DenseWalk {
  template <typename F>
  void key_tiles(int, int, int q0, int rows, const AttentionMask& mask, F&& f) const {
    const KeyRange span = mask.keys_of_rows(q0, q0 + rows);
    for (int k0 = span.begin; k0 < span.end; k0 += kBlockK) f(k0, std::min(kBlockK, span.end - k0));
  }
  template <typename F>
  void query_tiles(int, int, int k0, int n, const AttentionMask& mask, F&& f) const {
    for (int q0 = 0; q0 < mask.seqlen_q; q0 += kBlockQ) {
      const KeyRange span = mask.keys_of_rows(q0, std::min(mask.seqlen_q, q0 + kBlockQ));
      if (!span.empty() && span.end > k0 && span.begin < k0 + n) f(q0);
    }
  }
};

}  // namespace

void attention_fwd(const AttentionParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward<decltype(tag)>(params, DenseWalk{}); });
}

void attention_bwd(const AttentionBwdParams& params) {
  dispatch_dtype(params.fwd.dtype, [&](auto tag) { backward<decltype(tag)>(params, DenseWalk{}); });
}

}  // namespace attnkit::cpu
