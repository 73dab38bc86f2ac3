// CPU PagedKVCache append: copy (or quantize) each new key / value row into its slot and
// fold the key into its page's per-channel min / max (the Quest page metadata).
#include "cpu/paged_cache.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "attnkit/quant.h"
#include "attnkit/quest.h"
#include "cpu/dispatch.h"
#include "cpu/quant.h"

namespace attnkit::cpu {
namespace {

// Quantizes key and value row (token i, kv head h) into the token's slot of a quantized
// cache: the key minus its sequence's offset, rotated when asked (cpu::quantize_row, the
// bits of quantize_kv). `row` is head_dim floats of scratch.
template <typename T>
void store_quantized(const PagedAppendParams& p, int i, int64_t h, const T* k_src, const T* v_src, float* row) {
  const int64_t dst = p.slot_mapping[i] * p.heads_kv + h;  // row (slot, kv head) of the contiguous pages
  const float* offset = p.key_offset ? p.key_offset + (p.token_seq[i] * p.heads_kv + h) * p.head_dim : nullptr;
  for (int d = 0; d < p.head_dim; ++d) row[d] = offset ? to_float(k_src[d]) - offset[d] : to_float(k_src[d]);
  quantize_row(p.format, p.group_size, p.rotate_keys, row, p.head_dim, dst, static_cast<uint8_t*>(p.k_pages),
               p.k_scale, p.k_zero);
  for (int d = 0; d < p.head_dim; ++d) row[d] = to_float(v_src[d]);
  quantize_row(p.format, p.group_size, false, row, p.head_dim, dst, static_cast<uint8_t*>(p.v_pages), p.v_scale,
               p.v_zero);
}

// One kv head per task: its min / max rows are touched by that task only, and its tokens go
// in order, so a page's offset-0 reset comes before the page's other rows.
template <typename T>
void append_impl(const PagedAppendParams& p) {
  at::parallel_for(0, p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> key_row(p.head_dim);
    for (int64_t h = begin; h < end; ++h) {
      for (int i = 0; i < p.n_tokens; ++i) {
        const int64_t page = p.slot_mapping[i] / p.page_size;
        const int64_t offset = p.slot_mapping[i] % p.page_size;
        const T* k_src = static_cast<const T*>(p.k) + i * p.k_strides.row + h * p.k_strides.head;
        const T* v_src = static_cast<const T*>(p.v) + i * p.v_strides.row + h * p.v_strides.head;
        if (p.quantized) {
          store_quantized(p, i, h, k_src, v_src, key_row.data());
        } else {
          T* k_dst = static_cast<T*>(p.k_pages) + page * p.k_pages_strides.batch + offset * p.k_pages_strides.row +
                     h * p.k_pages_strides.head;
          T* v_dst = static_cast<T*>(p.v_pages) + page * p.v_pages_strides.batch + offset * p.v_pages_strides.row +
                     h * p.v_pages_strides.head;
          std::memcpy(k_dst, k_src, sizeof(T) * p.head_dim);
          std::memcpy(v_dst, v_src, sizeof(T) * p.head_dim);
        }
        float* kmin = p.key_min + (page * p.heads_kv + h) * p.head_dim;
        float* kmax = p.key_max + (page * p.heads_kv + h) * p.head_dim;
        for (int d = 0; d < p.head_dim; ++d) {
          if (offset == 0) quest_empty_bounds(kmin[d], kmax[d]);
          quest_fold_key(kmin[d], kmax[d], to_float(k_src[d]));
        }
      }
    }
  });
}

}  // namespace

void paged_cache_append(const PagedAppendParams& p) {
  if (p.n_tokens == 0 || p.heads_kv == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) { append_impl<decltype(tag)>(p); });
}

}  // namespace attnkit::cpu
