// Page selection for sparse decode on CUDA: Quest page scores (the bound of attnkit/quest.h)
// and the top-k choice of pages per (sequence, kv head) (the order and row layout of
// attnkit/page_order.h), both shared with the CPU kernels. Lengths and page ids are read on
// the device only and nothing is allocated, so both launches can be captured in a CUDA graph.
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <stdexcept>

#include "attnkit/page_order.h"
#include "attnkit/quest.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"
#include "cuda/kernels.h"

namespace attnkit::cuda {
namespace {

// ---- page_scores: a warp per (sequence, kv head, page), lanes over the channels, so the
// warp reads the page's key_min / key_max rows as 128-byte coalesced lines; the group's q
// rows are the same for every page of a block and stay in L1.
constexpr int kScoreWarps = 8;
constexpr int kPagesPerWarp = 4;
constexpr int kPagesPerBlock = kScoreWarps * kPagesPerWarp;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kScoreWarps * 32) page_scores_kernel(const __grid_constant__ PageScoresParams p) {
  const int chunks = (p.max_pages + kPagesPerBlock - 1) / kPagesPerBlock;
  const int64_t row = blockIdx.x / chunks;  // b * heads_kv + g
  const int chunk = int(blockIdx.x % chunks);
  const int g = int(row % p.heads_kv), b = int(row / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = p.heads_q / p.heads_kv;
  // Lengths are not checked on the device: clamped to the block table, as decode does.
  const int64_t pages_used = (int64_t(p.cache_seqlens[b]) + p.page_size - 1) / p.page_size;
  const int valid = int(pages_used < 0 ? 0 : pages_used < p.max_pages ? pages_used : p.max_pages);
  for (int k = 0; k < kPagesPerWarp; ++k) {
    const int page = chunk * kPagesPerBlock + k * kScoreWarps + warp;
    if (page >= p.max_pages) break;
    float best = -std::numeric_limits<float>::infinity();
    if (page < valid) {
      const int phys = p.block_table[int64_t(b) * p.max_pages + page];
      if (phys < 0 || phys >= p.num_pages) {
        best = std::numeric_limits<float>::quiet_NaN();  // a bad page id: ranks last, never read
      } else {
        const int64_t meta = (int64_t(phys) * p.heads_kv + g) * p.head_dim;
        const float* kmin = p.key_min + meta;
        const float* kmax = p.key_max + meta;
        for (int s = 0; s < p.seqlen_q; ++s)
          for (int h = g * group; h < (g + 1) * group; ++h) {
            const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + s * p.q_strides.row +
                         h * p.q_strides.head;
            float acc = 0.f;
            for (int d = lane; d < p.head_dim; d += 32)
              acc += quest_channel_bound(p.scale * to_float(q[d]), kmin[d], kmax[d]);
            acc = warp_sum(acc);
            best = best < acc ? acc : best;  // as std::max on the CPU
          }
      }
    }
    if (lane == 0) p.scores[row * p.max_pages + page] = best;
  }
}

template <typename T>
void launch_page_scores(const PageScoresParams& p, cudaStream_t stream) {
  const int64_t chunks = (p.max_pages + kPagesPerBlock - 1) / kPagesPerBlock;
  const int64_t blocks = int64_t(p.batch) * p.heads_kv * chunks;
  if (blocks == 0) return;
  if (blocks > std::numeric_limits<int>::max())
    throw std::invalid_argument("attnkit: page_scores: batch x kv_heads x max_pages / 32 must be < 2^31");
  page_scores_kernel<T><<<int(blocks), kScoreWarps * 32, 0, stream>>>(p);
  check(cudaGetLastError(), "page_scores launch");
}

// ---- select_pages: a block per (sequence, kv head) row. The top candidates are the ones
// whose score key (page_score_key) is above the top-th highest key, plus the lowest-indexed
// ones equal to it (page_rank's tie rule); that key is found by a radix select, 8 bits a
// pass from the top, each pass a shared-memory histogram of the candidates still matching
// the key's upper bits. A block scan over the candidates in page order then writes the
// chosen ones ascending. Rows of any length; the scores are re-read per pass (from L2).
constexpr int kSelectThreads = 512;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
static_assert(kSelectThreads < (1 << 16), "tile counts are packed in 16 bits");

// The top-th highest candidate key, and how many candidates with exactly that key are chosen.
struct Threshold {
  uint32_t key;
  uint32_t ties;
};

// Warp 0: the digit (from the top) that holds the `need`-th highest candidate of the
// histogram, and how many candidates have a higher digit -> found[0], found[1].
__device__ void find_digit(const uint32_t* hist, uint32_t need, uint32_t* found) {
  constexpr int kPerLane = kBins / 32;
  const int lane = threadIdx.x;
  uint32_t counts[kPerLane], sum = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum += counts[i] = hist[kBins - 1 - (lane * kPerLane + i)];
  uint32_t above = sum;  // inclusive scan over the lanes, then exclusive
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, above, o);
    if (lane >= o) above += y;
  }
  above -= sum;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (above < need && need <= above + counts[i]) {  // true for exactly one (lane, i)
      found[0] = kBins - 1 - (lane * kPerLane + i);
      found[1] = above;
    }
    above += counts[i];
  }
}

__device__ Threshold top_threshold(const float* scores, const PageSelection& sel, uint32_t* hist,
                                   uint32_t* found) {
  uint32_t prefix = 0, mask = 0;
  uint32_t need = sel.top;  // >= 1, and <= the candidates matching prefix on mask
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kBins; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    // Every thread runs the same number of iterations (the bounds are block-uniform), so the
    // full warp reaches each __match_any_sync; lanes past the end carry bin kBins (none).
    for (int base = sel.sink_end; base < sel.recent_begin; base += kSelectThreads) {
      const int j = base + int(threadIdx.x);
      uint32_t bin = kBins;
      if (j < sel.recent_begin) {
        const uint32_t key = page_score_key(scores[j]);
        if ((key & mask) == prefix) bin = (key >> shift) & (kBins - 1);
      }
      // Scores often share their top bits: one atomic per distinct bin of a warp, not per lane.
      const uint32_t peers = __match_any_sync(0xffffffffu, bin);
      if (bin < kBins && int(threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < 32) find_digit(hist, need, found);
    __syncthreads();
    prefix |= found[0] << shift;
    mask |= uint32_t(kBins - 1) << shift;
    need -= found[1];
  }
  return {prefix, need};
}

__global__ void __launch_bounds__(kSelectThreads) select_pages_kernel(const __grid_constant__ SelectPagesParams p) {
  using BlockScan = cub::BlockScan<uint32_t, kSelectThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint32_t hist[kBins];
  __shared__ uint32_t found[2];
  __shared__ int first_end;

  const int width = p.top_k + p.sink_pages + p.recent_pages;
  const float* scores = p.scores + int64_t(blockIdx.x) * p.max_pages;
  int32_t* out = p.pages + int64_t(blockIdx.x) * width;

  if (threadIdx.x == 0) first_end = p.max_pages;
  __syncthreads();
  for (int j = threadIdx.x; j < p.max_pages; j += kSelectThreads)
    if (is_past_end(scores[j])) {
      atomicMin(&first_end, j);
      break;
    }
  __syncthreads();
  const PageSelection sel = page_selection(first_end, p.top_k, p.sink_pages, p.recent_pages);
  for (int w = threadIdx.x; w < width; w += kSelectThreads)
    if (!sel.is_top_slot(w)) out[w] = sel.fixed_page(w);
  if (sel.top == 0) return;

  const Threshold t = top_threshold(scores, sel, hist, found);
  // Tiles of candidates in page order; a chosen page's slot counts the chosen ones before it.
  uint32_t greater_before = 0, ties_before = 0;
  for (int base = sel.sink_end; base < sel.recent_begin; base += kSelectThreads) {
    const int j = base + threadIdx.x;
    uint32_t greater = 0, tie = 0;
    if (j < sel.recent_begin) {
      const uint32_t key = page_score_key(scores[j]);
      greater = key > t.key;
      tie = key == t.key;
    }
    uint32_t before, tile;
    BlockScan(scan_storage).ExclusiveSum(greater | tie << 16, before, tile);
    const uint32_t g = greater_before + (before & 0xffffu), e = ties_before + (before >> 16);
    if (greater || (tie && e < t.ties)) out[sel.sink_end + g + (e < t.ties ? e : t.ties)] = j;
    greater_before += tile & 0xffffu;
    ties_before += tile >> 16;
    if (greater_before + (ties_before < t.ties ? ties_before : t.ties) == uint32_t(sel.top)) break;
    __syncthreads();  // scan_storage is reused by the next tile
  }
}

}  // namespace

void page_scores(const PageScoresParams& params, cudaStream_t stream) {
  dispatch_dtype(params.q_dtype, [&](auto tag) { launch_page_scores<decltype(tag)>(params, stream); });
}

void select_pages(const SelectPagesParams& params, cudaStream_t stream) {
  if (params.rows == 0) return;
  select_pages_kernel<<<int(params.rows), kSelectThreads, 0, stream>>>(params);
  check(cudaGetLastError(), "select_pages launch");
}

}  // namespace attnkit::cuda
