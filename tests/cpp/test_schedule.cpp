// Unit tests of the lean (stream-K) decode schedule (attnkit/schedule.h): for many mixes of
// lengths (random, all zero, one long + many short, fewer tiles than workers, more workers
// than tiles), windows, query counts, tile sizes and worker counts, the plan must
//  - give every worker floor(total / W) or ceil(total / W) tiles, as one contiguous share;
//  - cover every tile holding a visible key of every (sequence, head group) exactly once,
//    and no other tile (checked against the mask rule written out key by key);
//  - give every partial item (one that is not its pair's whole) its own slot below the
//    length-independent bound min(P + W - 1, 2W - 2), only a worker's first and last items
//    being partial, and list each pair's slots in key order (PairPartials::slot(), what the
//    merge step reads);
//  - stay within lean_bounds() and merge to the unsplit softmax with softmax.h.
// Run by ctest; exits non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attnkit/schedule.h"
#include "attnkit/softmax.h"
#include "expect.h"

namespace {

int plans_checked = 0;

// Tiles of a sequence holding a key some query sees, from the rule of docs/semantics.md
// (query i of seqlen_q sees keys j <= d and, with a window, j >= d - window_left, where
// d = i + seqlen_k - seqlen_q), key by key.
std::vector<bool> visible_tiles(int seqlen_k, int seqlen_q, int window_left, int tile_keys) {
  std::vector<bool> tiles((std::max(seqlen_k, 0) + tile_keys - 1) / tile_keys, false);
  for (int j = 0; j < seqlen_k; ++j)
    for (int i = 0; i < seqlen_q; ++i) {
      const int d = i + seqlen_k - seqlen_q;
      if (j <= d && (window_left < 0 || j >= d - window_left)) tiles[j / tile_keys] = true;
    }
  return tiles;
}

// A value per (pair, key) to merge: logit and value of key j of pair p.
float logit_of(int p, int j) { return std::sin(0.37f * float(j) + float(p)) * 4.f; }
float value_of(int p, int j) { return std::cos(0.11f * float(j) - float(p)); }

void check_plan(const attnkit::LeanShape& shape, const std::vector<int32_t>& lens, int workers, const char* what) {
  ++plans_checked;
  const attnkit::LeanPlan plan = attnkit::make_lean_plan(shape, lens.data(), workers);
  const int P = shape.num_pairs(), T = shape.tile_keys;
  char tag[256];
  std::snprintf(tag, sizeof(tag), "%s: batch=%d groups=%d sq=%d wl=%d T=%d cap=%d W=%d", what, shape.batch,
                shape.head_groups, shape.seqlen_q, shape.window_left, T, shape.max_seqlen_k, workers);

  // Expected tiles per sequence (lengths clamped to the capacity, as untrusted input is).
  std::vector<std::vector<bool>> want(shape.batch);
  int64_t total = 0;
  for (int b = 0; b < shape.batch; ++b) {
    const int len = std::clamp(lens[b], 0, shape.max_seqlen_k);
    want[b] = visible_tiles(len, shape.seqlen_q, shape.window_left, T);
    const int n = int(std::count(want[b].begin(), want[b].end(), true));
    total += int64_t(n) * shape.head_groups;
    const attnkit::TileRange r = shape.tiles(lens[b]);
    EXPECT(r.size() == n, "%s: b=%d len=%d: %d tiles, want %d", tag, b, lens[b], r.size(), n);
    EXPECT(n <= shape.max_tiles_per_sequence(), "%s: b=%d: %d tiles > bound %d", tag, b, n,
           shape.max_tiles_per_sequence());
  }
  EXPECT(plan.total_tiles == total, "%s: total %lld want %lld", tag, (long long)plan.total_tiles, (long long)total);

  // Equal shares: floor or ceil of total / W, and worker_of() agrees with the shares.
  const int64_t lo = total / workers, hi = (total + workers - 1) / workers;
  const attnkit::LeanSplit split = attnkit::LeanSplit::make(total, workers);
  EXPECT(int(plan.worker_items.size()) == workers + 1, "%s", tag);
  for (int w = 0; w < workers; ++w) {
    int64_t tiles = 0;
    for (int i = plan.worker_items[w]; i < plan.worker_items[w + 1]; ++i) {
      const attnkit::LeanItem& it = plan.items[i];
      EXPECT(it.worker == w, "%s: item %d of worker %d says worker %d", tag, i, w, it.worker);
      EXPECT(it.tile_end > it.tile_begin, "%s: empty item", tag);
      tiles += it.tile_end - it.tile_begin;
    }
    EXPECT(tiles >= lo && tiles <= hi, "%s: worker %d has %lld tiles, want %lld..%lld", tag, w, (long long)tiles,
           (long long)lo, (long long)hi);
    EXPECT(tiles == split.share_end(w) - split.share_begin(w), "%s: worker %d share", tag, w);
    for (int64_t t = split.share_begin(w); t < split.share_end(w); ++t)
      EXPECT(split.worker_of(t) == w, "%s: worker_of(%lld) = %d, want %d", tag, (long long)t, split.worker_of(t), w);
  }

  // Coverage: every wanted tile of every pair once, nothing else; slots of partial items
  // distinct and bounded, and by the rule of LeanSlots.
  std::vector<std::vector<int>> covered(P);
  std::vector<std::vector<const attnkit::LeanItem*>> by_pair(P);
  std::vector<int> slot_used(plan.num_slots, 0);
  for (int b = 0; b < shape.batch; ++b)
    for (int g = 0; g < shape.head_groups; ++g) covered[b * shape.head_groups + g].assign(want[b].size(), 0);
  for (const attnkit::LeanItem& it : plan.items) {
    EXPECT(it.b >= 0 && it.b < shape.batch && it.group >= 0 && it.group < shape.head_groups, "%s: item pair", tag);
    const int p = it.pair(shape.head_groups);
    by_pair[p].push_back(&it);
    if (!it.whole()) {
      const int want_slot = P >= workers ? 2 * it.worker - 1 + (it.first ? 1 : 0) : p + it.worker;
      EXPECT(it.slot == want_slot && it.slot >= 0 && it.slot < plan.num_slots, "%s: slot %d (want %d, %d slots)", tag,
             it.slot, want_slot, plan.num_slots);
      if (it.slot >= 0 && it.slot < plan.num_slots) ++slot_used[it.slot];
    }
    for (int t = it.tile_begin; t < it.tile_end; ++t) {
      const bool in = t >= 0 && t < int(want[it.b].size());
      EXPECT(in && want[it.b][t], "%s: b=%d g=%d tile %d holds no visible key", tag, it.b, it.group, t);
      if (in) ++covered[p][t];
    }
  }
  for (int s = 0; s < plan.num_slots; ++s) EXPECT(slot_used[s] <= 1, "%s: slot %d used %d times", tag, s, slot_used[s]);
  // Only a worker's first and last items are partial; the ones between hold whole pairs.
  for (int w = 0; w < workers; ++w)
    for (int i = plan.worker_items[w] + 1; i + 1 < plan.worker_items[w + 1]; ++i)
      EXPECT(plan.items[i].whole(), "%s: worker %d: middle item %d is partial", tag, w, i);
  for (int p = 0; p < P; ++p)
    for (size_t t = 0; t < covered[p].size(); ++t)
      EXPECT(covered[p][t] == (want[p / shape.head_groups][t] ? 1 : 0), "%s: pair %d tile %zu covered %d times", tag,
             p, t, covered[p][t]);

  // Per pair: items in key order hold consecutive slots, first / last flags right, and
  // pairs[] names exactly those slots.
  const attnkit::LeanBounds bounds = attnkit::lean_bounds(shape, workers);
  EXPECT(int64_t(plan.items.size()) <= bounds.max_items, "%s: %zu items > bound", tag, plan.items.size());
  EXPECT(total <= bounds.max_total_tiles, "%s: total %lld > bound %lld", tag, (long long)total,
         (long long)bounds.max_total_tiles);
  EXPECT(hi <= bounds.max_worker_tiles, "%s: worker tiles bound", tag);
  const int want_slots = workers <= 1 || P == 0 ? 0 : std::min(P + workers - 1, 2 * workers - 2);
  EXPECT(plan.num_slots == bounds.num_slots && bounds.num_slots == want_slots, "%s: %d slots, want %d", tag,
         bounds.num_slots, want_slots);
  for (int p = 0; p < P; ++p) {
    std::vector<const attnkit::LeanItem*>& items = by_pair[p];
    std::sort(items.begin(), items.end(), [](auto a, auto b) { return a->tile_begin < b->tile_begin; });
    const attnkit::PairPartials pp = plan.pairs[p];
    EXPECT(pp.count == int(items.size()), "%s: pair %d count %d, items %zu", tag, p, pp.count, items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      EXPECT(items[i]->worker == pp.first_worker + int(i), "%s: pair %d item %zu worker %d, want %d", tag, p, i,
             items[i]->worker, pp.first_worker + int(i));
      if (items.size() > 1)
        EXPECT(items[i]->slot == pp.slot(int(i)), "%s: pair %d item %zu slot %d, want %d", tag, p, i, items[i]->slot,
               pp.slot(int(i)));
      EXPECT(items[i]->first == (i == 0) && items[i]->last == (i + 1 == items.size()), "%s: pair %d flags", tag, p);
      if (i > 0) EXPECT(items[i]->tile_begin == items[i - 1]->tile_end, "%s: pair %d gap", tag, p);
    }
  }

  // Merging the partials of each pair by LSE (softmax.h) in slot order equals the unsplit
  // softmax-weighted mean over the pair's visible keys.
  for (int p = 0; p < P && failures == 0; ++p) {
    const int b = p / shape.head_groups;
    const int len = std::clamp(lens[b], 0, shape.max_seqlen_k);
    const attnkit::AttentionMask mask(shape.seqlen_q, len, true, shape.window_left, -1);
    const attnkit::KeyRange keys = len > 0 ? mask.keys_of(shape.seqlen_q - 1) : attnkit::KeyRange{0, 0};
    double ref_sum = 0, ref_acc = 0, ref_max = -1e30;
    for (int j = keys.begin; j < keys.end; ++j) ref_max = std::max(ref_max, double(logit_of(p, j)));
    for (int j = keys.begin; j < keys.end; ++j) {
      const double e = std::exp(double(logit_of(p, j)) - ref_max);
      ref_sum += e, ref_acc += e * value_of(p, j);
    }
    float out = 0.f, lse = attnkit::kNegInf;
    for (const attnkit::LeanItem* it : by_pair[p]) {
      attnkit::RowSoftmax st;
      float acc = 0.f;
      for (int j = std::max(keys.begin, it->tile_begin * T); j < std::min(keys.end, it->tile_end * T); ++j) {
        acc *= st.rescale_to(std::max(st.max, logit_of(p, j)));
        const float e = std::exp(logit_of(p, j) - st.max);
        st.sum += e, acc += e * value_of(p, j);
      }
      const attnkit::MergeWeights mw = attnkit::merge_weights(lse, st.lse());
      out = mw.w_a * out + mw.w_b * acc * st.inv_sum();
      lse = mw.lse;
    }
    if (keys.empty()) {
      EXPECT(out == 0.f && lse == attnkit::kNegInf, "%s: pair %d sees nothing", tag, p);
    } else {
      const double want_out = ref_acc / ref_sum, want_lse = ref_max + std::log(ref_sum);
      EXPECT(std::fabs(out - want_out) < 1e-4 && std::fabs(lse - want_lse) < 1e-4 * std::max(1.0, std::fabs(want_lse)),
             "%s: pair %d merged (%g, %g), want (%g, %g)", tag, p, out, lse, want_out, want_lse);
    }
  }
}

attnkit::LeanShape make_shape(int batch, int groups, int seqlen_q, int window_left, int tile_keys, int cap) {
  return attnkit::LeanShape{batch, groups, seqlen_q, window_left, tile_keys, cap};
}

void test_fixed_mixes() {
  const int workers_list[] = {1, 2, 3, 7, 16, 132, 300};
  for (int W : workers_list) {
    // All zero.
    check_plan(make_shape(5, 2, 1, -1, 64, 1000), {0, 0, 0, 0, 0}, W, "all zero");
    // One long + many short (and some empty).
    std::vector<int32_t> mix(33, 3);
    mix[0] = 100000, mix[5] = 0, mix[32] = 0, mix[7] = 64, mix[8] = 65;
    check_plan(make_shape(33, 1, 1, -1, 64, 100000), mix, W, "one long + many short");
    check_plan(make_shape(33, 8, 4, -1, 128, 100000), mix, W, "one long + many short, 8 groups");
    // Fewer tiles than workers.
    check_plan(make_shape(3, 1, 1, -1, 64, 200), {1, 0, 130}, W, "few tiles");
    // Batch 1, long.
    check_plan(make_shape(1, 8, 1, -1, 128, 524288), {524288}, W, "batch 1 x 512k");
    check_plan(make_shape(1, 1, 16, 4095, 64, 524288), {524287}, W, "window 4095");
    // Lengths shorter than the number of queries (early queries see nothing).
    check_plan(make_shape(4, 2, 16, -1, 16, 64), {0, 2, 15, 17}, W, "shorter than queries");
    // Window 0: each query sees only its own key.
    check_plan(make_shape(4, 3, 5, 0, 4, 100), {1, 4, 5, 99}, W, "window 0");
    // Tile of one key.
    check_plan(make_shape(3, 2, 3, 2, 1, 50), {0, 7, 50}, W, "tile 1");
    // Untrusted lengths past the capacity or negative are clamped.
    check_plan(make_shape(3, 2, 1, -1, 16, 40), {-5, 41, 1 << 30}, W, "clamped");
  }
}

void test_random_mixes() {
  std::mt19937 rng(1234);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int tiles[] = {1, 16, 64, 128};
  for (int iter = 0; iter < 400; ++iter) {
    const int batch = pick(1, 24), groups = pick(1, 8), sq = pick(1, 16), T = tiles[pick(0, 3)];
    const int window = pick(0, 3) == 0 ? -1 : pick(0, 3) == 0 ? pick(0, 4) : pick(0, 3000);
    const int cap = pick(0, 3) == 0 ? pick(0, 50) : pick(1, 20000);
    std::vector<int32_t> lens(batch);
    const int kind = pick(0, 3);
    for (int b = 0; b < batch; ++b) {
      if (kind == 0) lens[b] = pick(0, cap);                               // uniform
      else if (kind == 1) lens[b] = pick(0, 2) == 0 ? 0 : pick(0, cap);    // many zeros
      else if (kind == 2) lens[b] = b == 0 ? cap : pick(0, std::min(cap, 40));  // one long + short
      else lens[b] = pick(0, 5) == 0 ? cap : pick(0, 3);                   // mostly tiny
    }
    const int W = pick(0, 2) == 0 ? pick(1, 4) : pick(1, 400);
    check_plan(make_shape(batch, groups, sq, window, T, cap), lens, W, "random");
  }
}

// The device's view: for_each_lean_item() for one worker at a time, with offsets computed
// from the lengths, gives the same items as the host plan (the plan is built from it, so
// check the pieces: lean_sequence_of against a linear scan).
void test_sequence_search() {
  const int64_t offsets[] = {0, 0, 5, 5, 5, 9, 20, 20};  // batch 7; sequences 0, 2, 3, 6 empty
  for (int64_t t = 0; t < 20; ++t) {
    int want = 0;
    while (!(offsets[want] <= t && t < offsets[want + 1])) ++want;
    EXPECT(attnkit::lean_sequence_of(offsets, 7, t) == want, "t=%lld: %d want %d", (long long)t,
           attnkit::lean_sequence_of(offsets, 7, t), want);
  }
}

}  // namespace

int main() {
  test_sequence_search();
  test_fixed_mixes();
  test_random_mixes();
  std::printf("schedule: %d plans checked, %d failures\n", plans_checked, failures);
  return failures == 0 ? 0 : 1;
}
