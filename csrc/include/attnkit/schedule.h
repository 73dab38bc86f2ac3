// Lean (stream-K) schedule of decode: every worker (a CUDA SM / CTA, a CPU thread) gets an
// equal share of the KV tiles of all (sequence, kv head group) pairs, and the partial
// results of a pair that is split between workers are merged by log-sum-exp
// (merge_weights() in attnkit/softmax.h). Torch-free; the device-side parts are ATTNKIT_HD.
// docs/decode.md explains the design; tests/cpp/test_schedule.cpp checks it.
//
// Work. A pair is (sequence b, kv head group g), pair index p = b * head_groups + g; a
// group is a run of kv heads that one item processes together (CPU: all kv heads, so
// reads are contiguous; CUDA: typically one kv head per group). Tile t of a sequence holds
// keys [t * tile_keys, (t + 1) * tile_keys); tiles are aligned to absolute key positions
// (so a tile never straddles a page boundary when tile_keys divides or is divided by the
// page size). A sequence's tiles are those holding a key visible to one of its queries:
// [tiles.begin, tiles.end) from the causal + window_left mask of mask.h; an empty sequence
// has none. All pairs of a sequence have the same tiles. Laid end to end in pair order,
// the tiles of all pairs form one global axis of `total` tiles:
//   pair p = (b, g) starts at  seq_offset[b] + g * n_b,  where n_b = tiles of sequence b
//   and seq_offset[b] = head_groups * (n_0 + ... + n_{b-1})  (seq_offset[batch] = total).
//
// Split. Worker w of W owns global tiles [floor(w * total / W), floor((w + 1) * total / W)):
// floor(total / W) or ceil(total / W) tiles each, contiguous, so a share may cover several
// pairs and split a pair anywhere. The worker holding global tile t is
// floor(((t + 1) * W - 1) / total). A worker's share cut at pair boundaries gives its items.
// With fewer tiles than workers, W = total (one tile each, the other workers idle), so no
// worker with an empty share sits between two workers of one pair.
//
// Partial slots. Only a worker's first and last items can be partial: an item in the
// middle of a share starts and ends at pair boundaries, so it holds its whole pair and
// writes the final output (no slot). A partial item that does not hold its pair's first
// tile continued a pair from an earlier worker, so it is its worker's first item; one that
// holds the pair's first tile but not its last runs past its worker's share, so it is its
// worker's last item. Hence at most one of each kind per worker, and LeanSlots (below)
// numbers them:
//   - by worker (num_pairs >= W): item (w, pair-first f) -> slot 2w - 1 + f, in [0, 2W - 2);
//   - by pair (num_pairs < W, e.g. batch 1): item (w, pair p) -> slot p + w, in
//     [0, P + W - 1); distinct because the workers of a pair are consecutive and shares are
//     monotone (p + w = p' + w' with w < w' would need p' < p although w' starts at or
//     after w's last pair).
// Either way there are min(P + W - 1, 2W - 2) slots whatever the lengths: independent of
// the batch once it has more pairs than workers, and never more than the by-pair rule
// alone needs. Pair p's partials are the items of workers w_first(p) .. w_last(p) in key
// order; PairPartials::slot(k) names the k-th.
//
// Two ways to use it:
//  - exact plan (host): make_lean_plan() reads cache_seqlens on the host and lists every
//    item and every pair's slots (the CPU decode; a CUDA launch that knows the lengths).
//  - upper-bound plan (device, CUDA-graph capturable): lean_bounds() sizes the workspace
//    from batch, max_seqlen_k and W only; each worker then computes seq_offset from
//    a snapshot of cache_seqlens (lean_seq_offsets(), an O(batch) prefix sum), and walks
//    its share with for_each_lean_item(); a merge step calls pair_partials(). Both modes
//    use the same functions below, so the host tests check what the device runs.
#pragma once

#include <cstdint>
#include <vector>

#include "attnkit/macros.h"
#include "attnkit/mask.h"

namespace attnkit {

// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1 (no overflow near INT32_MAX).
ATTNKIT_HD int ceil_div_nonneg(int a, int b) { return a / b + (a % b != 0 ? 1 : 0); }

// Tiles [begin, end) of one sequence's KV axis; empty when end <= begin.
struct TileRange {
  int begin = 0;
  int end = 0;
  ATTNKIT_HD int size() const { return end > begin ? end - begin : 0; }
};

// The problem: what the schedule needs, none of it read from device memory.
struct LeanShape {
  int batch;          // sequences
  int head_groups;    // kv head groups per sequence (pairs = batch * head_groups)
  int seqlen_q;       // queries per sequence: the last seqlen_q positions, causal
  int window_left;    // -1 = unbounded
  int tile_keys;      // keys per tile (> 0)
  int max_seqlen_k;   // cache capacity: lengths are clamped to [0, max_seqlen_k]

  ATTNKIT_HD int num_pairs() const { return batch * head_groups; }

  // Tiles holding a key visible to some query of a sequence with seqlen_k cached keys
  // (clamped, so an untrusted length on the device never reads past the cache).
  ATTNKIT_HD TileRange tiles(int seqlen_k) const {
    if (seqlen_k > max_seqlen_k) seqlen_k = max_seqlen_k;
    if (seqlen_k <= 0 || seqlen_q <= 0) return {};
    const AttentionMask mask(seqlen_q, seqlen_k, /*causal=*/true, window_left, -1);
    const KeyRange keys = mask.keys_of_rows(0, seqlen_q);
    if (keys.empty()) return {};
    return {keys.begin / tile_keys, ceil_div_nonneg(keys.end, tile_keys)};
  }

  // Most tiles one sequence can have: its visible keys span at most
  // min(max_seqlen_k, window_left + seqlen_q) keys, plus one tile for misalignment.
  ATTNKIT_HD int max_tiles_per_sequence() const {
    if (max_seqlen_k <= 0) return 0;
    int span = max_seqlen_k;
    if (window_left >= 0 && int64_t(window_left) + seqlen_q < span) span = window_left + seqlen_q;
    const int tiles = ceil_div_nonneg(span, tile_keys) + (span < max_seqlen_k ? 1 : 0);
    const int all = ceil_div_nonneg(max_seqlen_k, tile_keys);
    return tiles < all ? tiles : all;
  }
};

// The equal split of `total` tiles over the workers. With fewer tiles than workers only the
// first `total` workers get a tile (one each) and the others none, so that every worker
// between the first and the last of a pair holds a piece of it (the slot rule needs that).
struct LeanSplit {
  int64_t total;
  int workers;  // active workers: min(workers given, total)

  ATTNKIT_HD static LeanSplit make(int64_t total, int workers) {
    return {total, total < workers ? int(total) : workers};
  }
  ATTNKIT_HD int64_t share_begin(int w) const { return w >= workers ? total : total * w / workers; }
  ATTNKIT_HD int64_t share_end(int w) const { return w + 1 >= workers ? total : total * (w + 1) / workers; }
  // The worker whose share holds global tile t (0 <= t < total).
  ATTNKIT_HD int worker_of(int64_t t) const { return int(((t + 1) * workers - 1) / total); }
};

// The slots of partial results (see the top comment): one rule per (shape, W), chosen on
// the host from the shapes only, so the workspace size never depends on the lengths.
struct LeanSlots {
  int pairs;
  int workers;  // as given (active workers <= this)

  ATTNKIT_HD static LeanSlots make(const LeanShape& shape, int workers) { return {shape.num_pairs(), workers}; }
  ATTNKIT_HD bool by_worker() const { return pairs >= workers; }
  // Slots needed: min(pairs + workers - 1, 2 * workers - 2) (0 with one worker: no pair is split).
  ATTNKIT_HD int count() const {
    if (pairs <= 0 || workers <= 1) return 0;
    return by_worker() ? 2 * workers - 2 : pairs + workers - 1;
  }
  // Slot of the partial item of `pair` in worker w; pair_first: the item holds the pair's
  // first tile. Only for items that are not whole.
  ATTNKIT_HD int slot(int pair, int worker, bool pair_first) const {
    return by_worker() ? 2 * worker - 1 + (pair_first ? 1 : 0) : pair + worker;
  }
};

// One unit of work: tiles [tile_begin, tile_end) of kv head group `group` of sequence b.
struct LeanItem {
  int b;
  int group;
  int tile_begin;  // absolute tile indices in the sequence (keys tile_begin * tile_keys ...)
  int tile_end;
  int worker;
  int slot;    // LeanSlots::slot(): where a partial item (not whole()) writes; unused when whole()
  bool first;  // holds the pair's first tile
  bool last;   // holds the pair's last tile; first && last: the whole pair, no merge needed
  ATTNKIT_HD int pair(int head_groups) const { return b * head_groups + group; }
  ATTNKIT_HD bool whole() const { return first && last; }
};

// Where the partial results of one pair are: the items of workers first_worker ..
// first_worker + count - 1, in key order, at slot(0), slot(1), ... count 0: the pair has no
// visible key (its output is 0, lse -inf); count 1: one item did it all (and wrote the
// output directly: no slot).
struct PairPartials {
  LeanSlots slots;
  int pair;
  int first_worker;
  int count;
  ATTNKIT_HD int slot(int k) const { return slots.slot(pair, first_worker + k, k == 0); }
};

// seq_offset[b] (see the top comment) for b in [0, batch]: seq_offset[0] = 0 and
// seq_offset[b + 1] = seq_offset[b] + head_groups * tiles(cache_seqlens[b]).size().
ATTNKIT_HD void lean_seq_offsets(const LeanShape& shape, const int32_t* cache_seqlens, int64_t* seq_offset) {
  seq_offset[0] = 0;
  for (int b = 0; b < shape.batch; ++b)
    seq_offset[b + 1] = seq_offset[b] + int64_t(shape.head_groups) * shape.tiles(cache_seqlens[b]).size();
}

// The sequence whose tiles hold global tile t (0 <= t < seq_offset[batch]): the b with
// seq_offset[b] <= t < seq_offset[b + 1] (empty sequences are skipped). Binary search.
ATTNKIT_HD int lean_sequence_of(const int64_t* seq_offset, int batch, int64_t t) {
  int lo = 0, hi = batch;  // invariant: seq_offset[lo] <= t < seq_offset[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (seq_offset[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// Calls fn(const LeanItem&) for each item of worker w, in key order. seq_offset from
// lean_seq_offsets() with the same cache_seqlens. O(log batch + items). fn may be host-only
// when called from the host (make_lean_plan), hence the check suppression for nvcc.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Fn>
ATTNKIT_HD void for_each_lean_item(const LeanShape& shape, const int32_t* cache_seqlens, const int64_t* seq_offset,
                                   int workers, int w, Fn&& fn) {
  const LeanSplit split = LeanSplit::make(seq_offset[shape.batch], workers);
  if (split.total == 0) return;
  const LeanSlots slots = LeanSlots::make(shape, workers);
  int64_t t = split.share_begin(w);
  const int64_t end = split.share_end(w);
  if (t >= end) return;
  int b = lean_sequence_of(seq_offset, shape.batch, t);
  while (t < end) {
    while (seq_offset[b + 1] <= t) ++b;  // skip finished and empty sequences
    const TileRange tiles = shape.tiles(cache_seqlens[b]);
    const int n = tiles.size();
    const int64_t local = t - seq_offset[b];  // tile within the sequence's pairs
    const int group = int(local / n), i0 = int(local % n);
    const int64_t pair_end = seq_offset[b] + int64_t(group + 1) * n;
    const int i1 = int((end < pair_end ? end : pair_end) - (seq_offset[b] + int64_t(group) * n));
    LeanItem item;
    item.b = b;
    item.group = group;
    item.tile_begin = tiles.begin + i0;
    item.tile_end = tiles.begin + i1;
    item.worker = w;
    item.slot = slots.slot(b * shape.head_groups + group, w, i0 == 0);
    item.first = i0 == 0;
    item.last = i1 == n;
    fn(item);
    t += i1 - i0;
  }
}

// The partial results of pair (b, group).
ATTNKIT_HD PairPartials pair_partials(const LeanShape& shape, const int32_t* cache_seqlens, const int64_t* seq_offset,
                                      int workers, int b, int group) {
  const int n = shape.tiles(cache_seqlens[b]).size();
  const int pair = b * shape.head_groups + group;
  const LeanSlots slots = LeanSlots::make(shape, workers);
  if (n == 0) return {slots, pair, 0, 0};
  const LeanSplit split = LeanSplit::make(seq_offset[shape.batch], workers);
  const int64_t first = seq_offset[b] + int64_t(group) * n;
  const int w_first = split.worker_of(first), w_last = split.worker_of(first + n - 1);
  return {slots, pair, w_first, w_last - w_first + 1};
}

// Sizes that hold for every cache_seqlens in [0, max_seqlen_k]: allocate once, capture in
// a CUDA graph, replay with any lengths.
struct LeanBounds {
  int64_t max_total_tiles;   // tiles of all pairs
  int num_slots;             // partial slots: LeanSlots::count(), min(P + W - 1, 2W - 2)
  int64_t max_items;         // items of all workers: num_pairs + workers - 1
  int64_t max_worker_tiles;  // tiles of one worker's share
};

ATTNKIT_HD LeanBounds lean_bounds(const LeanShape& shape, int workers) {
  LeanBounds bounds;
  bounds.max_total_tiles = int64_t(shape.num_pairs()) * shape.max_tiles_per_sequence();
  bounds.num_slots = LeanSlots::make(shape, workers).count();
  bounds.max_items = int64_t(shape.num_pairs()) + workers - 1;  // each worker boundary cuts at most one pair
  bounds.max_worker_tiles = (bounds.max_total_tiles + workers - 1) / workers;
  return bounds;
}

// ---- exact plan, on the host --------------------------------------------------------

struct LeanPlan {
  LeanShape shape;
  int workers = 0;
  int64_t total_tiles = 0;
  int num_slots = 0;                  // lean_bounds().num_slots: slots of partial items (LeanSlots)
  std::vector<int64_t> seq_offset;    // batch + 1 entries
  std::vector<LeanItem> items;        // worker by worker, each in key order
  std::vector<int> worker_items;      // workers + 1: worker w's items are [worker_items[w], worker_items[w + 1])
  std::vector<PairPartials> pairs;    // num_pairs, indexed by b * head_groups + group
};

// cache_seqlens: host memory, batch entries.
inline LeanPlan make_lean_plan(const LeanShape& shape, const int32_t* cache_seqlens, int workers) {
  LeanPlan plan;
  plan.shape = shape;
  plan.workers = workers;
  plan.num_slots = lean_bounds(shape, workers).num_slots;
  plan.seq_offset.resize(size_t(shape.batch) + 1);
  lean_seq_offsets(shape, cache_seqlens, plan.seq_offset.data());
  plan.total_tiles = plan.seq_offset.back();
  plan.worker_items.reserve(size_t(workers) + 1);
  for (int w = 0; w < workers; ++w) {
    plan.worker_items.push_back(int(plan.items.size()));
    for_each_lean_item(shape, cache_seqlens, plan.seq_offset.data(), workers, w,
                       [&](const LeanItem& item) { plan.items.push_back(item); });
  }
  plan.worker_items.push_back(int(plan.items.size()));
  plan.pairs.reserve(size_t(shape.num_pairs()));
  for (int b = 0; b < shape.batch; ++b)
    for (int g = 0; g < shape.head_groups; ++g)
      plan.pairs.push_back(pair_partials(shape, cache_seqlens, plan.seq_offset.data(), workers, b, g));
  return plan;
}

}  // namespace attnkit
