// CPU merge_attention_states: out = w_a * out_a + w_b * out_b with the weights of
// merge_weights() (attnkit/softmax.h), the same rule the CUDA kernel applies.
#include <ATen/Parallel.h>

#include <vector>

#include "attnkit/softmax.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/tile_math.h"

namespace attnkit::cpu {
namespace {

template <typename T>
void merge_impl(const MergeParams& p) {
  const int64_t rows = int64_t(p.batch) * p.seqlen * p.heads;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> a(p.head_dim), b(p.head_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int h = int(row % p.heads);
      const int s = int(row / p.heads % p.seqlen);
      const int bi = int(row / (int64_t(p.heads) * p.seqlen));
      auto lse_at = [&](const float* lse, const LseStrides& st) {
        return lse[bi * st.batch + h * st.head + s * st.seq];
      };
      auto out_at = [&](const void* out, const Strides& st) {
        return static_cast<const T*>(out) + bi * st.batch + s * st.row + h * st.head;
      };
      const MergeWeights w = merge_weights(lse_at(p.lse_a, p.lse_a_strides), lse_at(p.lse_b, p.lse_b_strides));
      load_row(out_at(p.out_a, p.out_a_strides), p.head_dim, a.data(), w.w_a);
      load_row(out_at(p.out_b, p.out_b_strides), p.head_dim, b.data(), w.w_b);
      for (int d = 0; d < p.head_dim; ++d) a[d] += b[d];
      store_row(a.data(), p.head_dim, 1.f,
                static_cast<T*>(p.out) + bi * p.out_strides.batch + s * p.out_strides.row + h * p.out_strides.head);
      p.lse[bi * p.lse_strides.batch + h * p.lse_strides.head + s * p.lse_strides.seq] = w.lse;
    }
  });
}

}  // namespace

void merge_attention_states(const MergeParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { merge_impl<decltype(tag)>(params); });
}

}  // namespace attnkit::cpu
