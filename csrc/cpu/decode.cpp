// CPU decode: a few queries per sequence against a long contiguous or paged KV cache.
// The KV axis of every (sequence, kv head) is split into chunks so that all threads have
// work even at batch 1; each chunk yields a partial (out, lse) for the q heads of its kv
// group and all queries (packed as rows), and the partials are combined with
// merge_weights() from attnkit/softmax.h, the rule the CUDA split-KV kernels use.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attnkit/mask.h"
#include "attnkit/softmax.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/tile_math.h"

namespace attnkit::cpu {
namespace {

constexpr int kBlockK = 64;      // keys per online-softmax step
constexpr int kMinChunk = 256;   // smallest KV chunk worth a partial result

// One unit of work: keys [key_begin, key_end) of kv head `head` of sequence `b`.
struct Chunk {
  int b, head, key_begin, key_end;
};

// Equal-size chunks, sized so that there are several per thread in total.
std::vector<Chunk> plan_chunks(const DecodeParams& p) {
  int64_t total_keys = 0;
  for (int b = 0; b < p.batch; ++b) total_keys += std::max(p.cache_seqlens[b], 0);
  const int64_t wanted = 8 * int64_t(at::get_num_threads());
  const int64_t per_chunk = (total_keys * p.heads_kv + wanted - 1) / wanted;
  const int chunk = std::max<int64_t>(kMinChunk, (per_chunk + kBlockK - 1) / kBlockK * kBlockK);
  std::vector<Chunk> chunks;
  for (int b = 0; b < p.batch; ++b) {
    const int len = std::max(p.cache_seqlens[b], 0);
    for (int h = 0; h < p.heads_kv; ++h) {
      int k0 = 0;
      do {  // an empty sequence still gets one (empty) chunk so its output is written
        chunks.push_back({b, h, k0, std::min(len, k0 + chunk)});
        k0 += chunk;
      } while (k0 < len);
    }
  }
  return chunks;
}

template <typename T>
const T* cache_row(const DecodeParams& p, const void* cache, const Strides& s, int b, int j, int h) {
  int64_t offset;
  if (p.is_paged()) {
    const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
    offset = page * s.batch + int64_t(j % p.page_size) * s.row;
  } else {
    offset = b * s.batch + int64_t(j) * s.row;
  }
  return static_cast<const T*>(cache) + offset + int64_t(h) * s.head;
}

// Rows of one kv head are heads_kv * head_dim elements apart (often 4 KB or more), a stride
// the hardware prefetchers do not follow across pages: fetch a few rows ahead by hand.
constexpr int kPrefetchRows = 16;

template <typename T>
void prefetch_row(const T* row, int D) {
  for (int64_t byte = 0; byte < int64_t(D) * int64_t(sizeof(T)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
}

template <typename T>
void decode_impl(const DecodeParams& p) {
  const int D = p.head_dim, Dp = round_up(D, kVec), group = p.heads_q / p.heads_kv;
  const int rows = group * p.seqlen_q;  // row r = query (r / group) of q head (r % group)
  const std::vector<Chunk> chunks = plan_chunks(p);
  // Partial results, normalised: out (rows x D) and lse (rows) per chunk.
  std::vector<float> part_out(chunks.size() * rows * D), part_lse(chunks.size() * rows);

  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(rows * Dp), acc(rows * Dp), s_tile(rows * kBlockK), kv_row(Dp, 0.f);
    std::vector<RowSoftmax> state(rows);
    std::vector<KeyRange> visible(rows);
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& ch = chunks[ci];
      const int len = std::max(p.cache_seqlens[ch.b], 0);
      const AttentionMask mask(p.seqlen_q, len, /*causal=*/true, p.window_left, -1);
      for (int r = 0; r < rows; ++r) {
        const int s = r / group, h = ch.head * group + r % group;
        const T* q = static_cast<const T*>(p.q) + ch.b * p.q_strides.batch + s * p.q_strides.row +
                     h * p.q_strides.head;
        load_row(q, D, q_tile.data() + r * Dp, p.scale);
        std::fill(q_tile.begin() + r * Dp + D, q_tile.begin() + (r + 1) * Dp, 0.f);
        state[r] = RowSoftmax{};
        const KeyRange keys = mask.keys_of(s);
        visible[r] = {std::max(keys.begin, ch.key_begin), std::min(keys.end, ch.key_end)};
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const KeyRange span = mask.keys_of_rows(0, p.seqlen_q);
      const int first = std::max(span.begin, ch.key_begin), last = std::min(span.end, ch.key_end);

      for (int k0 = first; k0 < last; k0 += kBlockK) {
        const int n = std::min(kBlockK, last - k0), n_pad = round_up(n, kVec);
        // Scores: one key row at a time against every packed query row.
        for (int c = 0; c < n; ++c) {
          if (k0 + c + kPrefetchRows < last)
            prefetch_row(cache_row<T>(p, p.k_cache, p.k_strides, ch.b, k0 + c + kPrefetchRows, ch.head), D);
          load_row(cache_row<T>(p, p.k_cache, p.k_strides, ch.b, k0 + c, ch.head), D, kv_row.data(), 1.f);
          for (int r = 0; r < rows; ++r) {
            const float* q = q_tile.data() + r * Dp;
            vec8 dot{};
            for (int d = 0; d < Dp; d += kVec) dot += load8(q + d) * load8(kv_row.data() + d);
            s_tile[r * kBlockK + c] = hsum8(dot);
          }
        }
        for (int r = 0; r < rows; ++r) {
          float* s = s_tile.data() + r * kBlockK;
          transform_and_mask_row(s, n_pad, n, k0, visible[r], p.softcap);
          const float factor = softmax_update_row(s, n_pad, state[r]);
          if (factor != 1.f) scale_row(acc.data() + r * Dp, Dp, factor);
        }
        for (int c = 0; c < n; ++c) {
          if (k0 + c + kPrefetchRows < last)
            prefetch_row(cache_row<T>(p, p.v_cache, p.v_strides, ch.b, k0 + c + kPrefetchRows, ch.head), D);
          load_row(cache_row<T>(p, p.v_cache, p.v_strides, ch.b, k0 + c, ch.head), D, kv_row.data(), 1.f);
          for (int r = 0; r < rows; ++r) {
            const float prob = s_tile[r * kBlockK + c];
            float* o = acc.data() + r * Dp;
            for (int d = 0; d < Dp; d += kVec) store8(o + d, load8(o + d) + prob * load8(kv_row.data() + d));
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        const float inv = state[r].inv_sum();
        float* out = part_out.data() + (ci * rows + r) * D;
        for (int d = 0; d < D; ++d) out[d] = acc[r * Dp + d] * inv;
        part_lse[ci * rows + r] = state[r].lse();
      }
    }
  });

  // Merge the chunks of each (sequence, kv head): they are consecutive in `chunks`.
  std::vector<int64_t> first_chunk;
  for (int64_t ci = 0; ci < int64_t(chunks.size()); ++ci)
    if (ci == 0 || chunks[ci].b != chunks[ci - 1].b || chunks[ci].head != chunks[ci - 1].head)
      first_chunk.push_back(ci);
  first_chunk.push_back(int64_t(chunks.size()));

  at::parallel_for(0, int64_t(first_chunk.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(D);
    for (int64_t g = begin; g < end; ++g) {
      const int b = chunks[first_chunk[g]].b, head = chunks[first_chunk[g]].head;
      for (int r = 0; r < rows; ++r) {
        float lse = kNegInf;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t ci = first_chunk[g]; ci < first_chunk[g + 1]; ++ci) {
          const MergeWeights w = merge_weights(lse, part_lse[ci * rows + r]);
          const float* part = part_out.data() + (ci * rows + r) * D;
          for (int d = 0; d < D; ++d) merged[d] = w.w_a * merged[d] + w.w_b * part[d];
          lse = w.lse;
        }
        const int s = r / group, h = head * group + r % group;
        T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + s * p.out_strides.row +
                 h * p.out_strides.head;
        store_row(merged.data(), D, 1.f, out);
        p.lse[(int64_t(b) * p.heads_q + h) * p.seqlen_q + s] = lse;
      }
    }
  });
}

}  // namespace

void decode(const DecodeParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) { decode_impl<decltype(tag)>(params); });
}

}  // namespace attnkit::cpu
