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

// The tiles the causal / window / sink mask leaves: for a query tile, the sink keys below
// the span of its rows' windows, then that span; for a key tile, the query tiles that hold a
// row seeing one of its keys (AttentionMask::rows_of_keys).
struct DenseWalk {
  template <typename F>
  void key_tiles(int, int, int q0, int rows, const AttentionMask& mask, F&& f) const {
    KeyRange span = mask.keys_of_rows(q0, q0 + rows);
    const int sinks_end = mask.sink_keys_of_rows(q0, q0 + rows).end;
    if (sinks_end > 0 && sinks_end >= span.begin)
      span.begin = 0;  // the sinks reach the window: one span from key 0
    else
      for (int k0 = 0; k0 < sinks_end; k0 += kBlockK) f(KeyTile{k0, std::min(kBlockK, sinks_end - k0)});
    for (int k0 = span.begin; k0 < span.end; k0 += kBlockK) f(KeyTile{k0, std::min(kBlockK, span.end - k0)});
  }
  template <typename F>
  void query_tiles(int, int, int k0, int n, const AttentionMask& mask, F&& f) const {
    const RowRange rows = mask.rows_of_keys(k0, k0 + n);
    for (int q0 = rows.begin / kBlockQ * kBlockQ; q0 < rows.end; q0 += kBlockQ) f(q0, kAllKeys);
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
