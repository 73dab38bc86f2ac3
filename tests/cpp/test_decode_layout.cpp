// Unit tests of the CUDA decode's index math (attnkit/decode_layout.h), on the host:
//  - decode_kv_offset: key j of a paged cache (page sizes 1..256, shuffled block table)
//    lands on the element a contiguous cache with the same contents has, key by key;
//  - decode_row: the rows of a pair cover each (query, q head of the kv head) once, and
//    decode_out_offset / decode_lse_index give each (sequence, row) its own place;
//  - DecodeWorkspace: parts 16-byte aligned and disjoint, every (slot, row) of the lean
//    bound inside its part, size independent of the lengths; the slots the schedule hands
//    out for any lengths stay within it; dense and sparse; at most 2 slots per worker, so
//    the size does not grow with the batch; capacities up to kDecodeMaxKeys stay in int32;
//  - the sparse work axis: decode_key_position lists exactly the tokens a brute-force walk of
//    random page / token selections (-1, past-the-end, unsorted entries) names, in order,
//    and decode_pair_keys ends the axis right after the last valid entry.
// Run by ctest; exits non-zero on failure.
#include <algorithm>
#include <climits>
#include <numeric>
#include <random>
#include <vector>

#include "attnkit/decode_layout.h"
#include "expect.h"

namespace {

using attnkit::DecodeParams;

void check_paged_offsets(int page_size, std::mt19937& rng) {
  const int batch = 3, heads_kv = 2, head_dim = 8, max_pages = (300 + page_size - 1) / page_size;
  const int num_pages = batch * max_pages + 2;
  std::vector<int32_t> table(size_t(batch) * max_pages);
  std::vector<int32_t> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::copy(perm.begin(), perm.begin() + table.size(), table.begin());

  DecodeParams p{};
  p.batch = batch;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.block_table = table.data();
  p.block_table_stride = max_pages;
  p.page_size = page_size;
  const attnkit::Strides paged{int64_t(page_size) * heads_kv * head_dim, int64_t(heads_kv) * head_dim, head_dim};
  // Logical key j of sequence b must be row j % page_size of physical page table[b][j / page_size].
  std::vector<bool> seen(size_t(num_pages) * page_size * heads_kv, false);
  for (int b = 0; b < batch; ++b)
    for (int j = 0; j < max_pages * page_size; ++j)
      for (int h = 0; h < heads_kv; ++h) {
        const int64_t off = attnkit::decode_kv_offset(p, paged, b, j, h);
        const int64_t want = (int64_t(table[b * max_pages + j / page_size]) * page_size + j % page_size) *
                                 heads_kv * head_dim + h * head_dim;
        EXPECT(off == want, "page_size=%d b=%d key=%d head=%d: offset %lld, want %lld", page_size, b, j, h,
               (long long)off, (long long)want);
        EXPECT(off % head_dim == 0, "page_size=%d: offset not on a row", page_size);
        const int64_t row = off / head_dim;
        EXPECT(!seen[row], "page_size=%d b=%d key=%d head=%d: row used twice", page_size, b, j, h);
        seen[row] = true;
      }
}

void check_contiguous_offsets() {
  DecodeParams p{};
  p.batch = 2;
  const attnkit::Strides s{1000 * 4 * 64 + 64, 4 * 64 + 8, 64};  // padded strides
  for (int b = 0; b < 2; ++b)
    for (int j = 0; j < 1000; j += 37)
      for (int h = 0; h < 4; ++h)
        EXPECT(attnkit::decode_kv_offset(p, s, b, j, h) == b * s.batch + j * s.row + h * s.head,
               "contiguous b=%d key=%d head=%d", b, j, h);
}

void check_rows() {
  for (int group : {1, 2, 4, 8, 32})
    for (int seqlen_q : {1, 3, 16})
      for (int kv_head : {0, 3}) {
        std::vector<int> hits(size_t(seqlen_q) * group, 0);
        for (int r = 0; r < group * seqlen_q; ++r) {
          const attnkit::DecodeRow row = attnkit::decode_row(r, group, kv_head);
          EXPECT(row.query >= 0 && row.query < seqlen_q, "group=%d r=%d: query %d", group, r, row.query);
          EXPECT(row.head_q / group == kv_head, "group=%d r=%d: q head %d is not of kv head %d", group, r,
                 row.head_q, kv_head);
          ++hits[row.query * group + row.head_q - kv_head * group];
        }
        EXPECT(std::all_of(hits.begin(), hits.end(), [](int n) { return n == 1; }),
               "group=%d seqlen_q=%d: rows do not cover each (query, head) once", group, seqlen_q);
      }
  // out (contiguous, like q) and lse (batch, heads_q, seqlen_q): every (b, row of every kv
  // head) has its own place.
  DecodeParams p{};
  p.batch = 3;
  p.seqlen_q = 5;
  p.heads_kv = 2;
  p.heads_q = 8;
  p.head_dim = 16;
  p.out_strides = {int64_t(p.seqlen_q) * p.heads_q * p.head_dim, int64_t(p.heads_q) * p.head_dim, p.head_dim};
  const int n = p.batch * p.heads_q * p.seqlen_q, group = p.heads_q / p.heads_kv;
  std::vector<int> lse_hits(n, 0), out_hits(n, 0);
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads_kv; ++h)
      for (int r = 0; r < group * p.seqlen_q; ++r) {
        const attnkit::DecodeRow row = attnkit::decode_row(r, group, h);
        const int64_t li = attnkit::decode_lse_index(p, b, row), oo = attnkit::decode_out_offset(p, b, row);
        EXPECT(li >= 0 && li < n && oo % p.head_dim == 0 && oo / p.head_dim < n, "b=%d h=%d r=%d out of range", b, h,
               r);
        if (li >= 0 && li < n) ++lse_hits[li];
        if (oo >= 0 && oo / p.head_dim < n) ++out_hits[oo / p.head_dim];
        EXPECT(oo == ((int64_t(b) * p.seqlen_q + row.query) * p.heads_q + row.head_q) * p.head_dim, "out offset");
      }
  EXPECT(std::all_of(lse_hits.begin(), lse_hits.end(), [](int k) { return k == 1; }), "lse places not unique");
  EXPECT(std::all_of(out_hits.begin(), out_hits.end(), [](int k) { return k == 1; }), "out places not unique");
}

void check_workspace(std::mt19937& rng) {
  for (int batch : {1, 3, 17})
    for (int heads_kv : {1, 8})
      for (int group : {1, 4})
        for (int seqlen_q : {1, 5, 16})
          for (int head_dim : {64, 128, 256})
            for (int workers : {1, 7, 264}) {
              DecodeParams p{};
              p.batch = batch;
              p.heads_kv = heads_kv;
              p.heads_q = heads_kv * group;
              p.seqlen_q = seqlen_q;
              p.head_dim = head_dim;
              p.window_left = (batch % 2) ? -1 : 100;
              const int cap = 5000, tile = head_dim <= 128 ? 64 : 32;
              const bool sparse = seqlen_q == 5;  // selections of 40 pages of 16 tokens
              const std::vector<int32_t> selection(size_t(batch) * heads_kv * 40, 0);
              if (sparse) {
                p.selection = selection.data();
                p.selection_len = 40;
                p.selection_unit = 16;
              }
              const attnkit::LeanShape shape = attnkit::decode_lean_shape(p, tile, cap);
              EXPECT(shape.num_pairs() == batch * heads_kv, "pairs %d", shape.num_pairs());
              const attnkit::LeanBounds bounds = attnkit::lean_bounds(shape, workers);
              const auto ws = attnkit::DecodeWorkspace::make(p, shape, bounds.num_slots);
              EXPECT(ws.seq_len_bytes % 16 == 0 && ws.seq_len_bytes >= int64_t(shape.batch + 1) * 8,
                     "seq_offset does not fit");
              EXPECT(ws.pair_keys_bytes % 16 == 0 && ws.pair_keys_bytes >= ws.seq_len_bytes + int64_t(batch) * 4,
                     "seq_len does not fit");
              EXPECT(ws.lean_lengths_bytes() == (sparse ? ws.pair_keys_bytes : ws.seq_len_bytes),
                     "schedule lengths: the snapshot when dense, pair_keys when sparse");
              EXPECT(ws.lse_bytes >= ws.pair_keys_bytes + (sparse ? int64_t(shape.batch) * 4 : 0),
                     "pair_keys does not fit");
              const int rows = group * seqlen_q;
              EXPECT(ws.rows == rows, "rows %d, want %d", ws.rows, rows);
              EXPECT(ws.lse_bytes % 16 == 0 && ws.out_bytes % 16 == 0, "parts not 16-byte aligned");
              EXPECT(bounds.num_slots <= 2 * workers, "%d slots for %d workers", bounds.num_slots, workers);
              EXPECT(ws.total_bytes - ws.out_bytes == int64_t(bounds.num_slots) * rows * head_dim * 4, "out size");
              if (bounds.num_slots > 0) {
                EXPECT(ws.lse_bytes + ws.lse_index(bounds.num_slots - 1, rows - 1) * 4 + 4 <= ws.out_bytes,
                       "lse part overlaps out");
                EXPECT(ws.out_bytes + (ws.out_index(bounds.num_slots - 1, rows - 1) + head_dim) * 4 == ws.total_bytes,
                       "out part does not end the workspace");
              }
              // Any lengths: the items' slots are inside the bound.
              std::vector<int32_t> lens(shape.batch);
              for (int trial = 0; trial < 3; ++trial) {
                const int most = std::min(shape.max_seqlen_k, trial == 2 ? 40 : cap);
                for (auto& n : lens) n = std::uniform_int_distribution<int>(0, most)(rng);
                const attnkit::LeanPlan plan = attnkit::make_lean_plan(shape, lens.data(), workers);
                for (const attnkit::LeanItem& item : plan.items)
                  EXPECT(item.whole() || (item.slot >= 0 && item.slot < bounds.num_slots), "slot %d outside [0, %d)",
                         item.slot, bounds.num_slots);
              }
            }
}

// The workspace of the partial results does not grow with the batch once there are more
// pairs than workers (2 slots per worker at most), and is never larger than the P + W - 1
// slots of the earlier rule; issue 16's example: batch 256, 8 kv heads, 128 rows, head_dim
// 128, 264 workers: 526 slots (34.5 MB) instead of 2311 (151 MB).
void check_workspace_vs_batch() {
  for (int workers : {1, 2, 7, 264})
    for (int batch : {1, 3, 40, 256, 5000}) {
      DecodeParams p{};
      p.batch = batch;
      p.heads_kv = 8;
      p.heads_q = 64;
      p.seqlen_q = 16;
      p.head_dim = 128;
      p.window_left = -1;
      const attnkit::LeanShape shape = attnkit::decode_lean_shape(p, 64, 1 << 20);
      const int slots = attnkit::lean_bounds(shape, workers).num_slots;
      const int pairs = batch * 8;
      EXPECT(slots <= 2 * workers && slots <= pairs + workers - 1, "batch %d W %d: %d slots", batch, workers, slots);
      if (pairs >= workers) EXPECT(slots == 2 * workers - 2, "batch %d W %d: %d slots", batch, workers, slots);
      const auto ws = attnkit::DecodeWorkspace::make(p, shape, slots);
      EXPECT(ws.total_bytes - ws.lse_bytes == attnkit::DecodeWorkspace::align16(int64_t(slots) * 128 * 4) +
                                                   int64_t(slots) * 128 * 128 * 4,
             "batch %d W %d: partial bytes", batch, workers);
      if (batch == 256 && workers == 264)
        EXPECT(slots == 526 && ws.total_bytes < 35'000'000, "issue example: %d slots, %lld bytes", slots,
               (long long)ws.total_bytes);
    }
}

// Capacities up to kDecodeMaxKeys (the binding's bound): tile counts and the last tile's
// keys stay in int32 for every tile size the kernels use.
void check_capacity_bound() {
  for (int tile : {1, 32, 64, 256}) {
    for (int cap : {int(attnkit::kDecodeMaxKeys), int(attnkit::kDecodeMaxKeys) - 1, INT32_MAX}) {
      const attnkit::LeanShape shape{1, 1, 16, -1, tile, cap};
      const attnkit::TileRange r = shape.tiles(cap);
      const int64_t want_end = (int64_t(cap) + tile - 1) / tile;
      EXPECT(r.end == want_end && r.size() == shape.max_tiles_per_sequence(), "tile %d cap %d: end %d want %lld", tile,
             cap, r.end, (long long)want_end);
      if (cap <= attnkit::kDecodeMaxKeys)
        EXPECT(int64_t(r.end) * tile + tile - 1 <= INT32_MAX, "tile %d cap %d: last key past INT32_MAX", tile, cap);
    }
    const attnkit::LeanShape windowed{1, 1, 16, INT32_MAX - 20, tile, int(attnkit::kDecodeMaxKeys)};
    EXPECT(windowed.max_tiles_per_sequence() == windowed.tiles(int(attnkit::kDecodeMaxKeys)).size(),
           "tile %d: window near INT32_MAX", tile);
  }
}

// Random selections of `unit`-token entries against the brute-force walk of the reference
// (python/attnkit/reference.py selected_tokens).
void check_sparse_axis(int unit, std::mt19937& rng) {
  const int batch = 4, heads_kv = 3, len_max = 200, n = 12;
  std::vector<int32_t> selection(size_t(batch) * heads_kv * n);
  std::vector<int32_t> lens = {0, 1, unit * 3, 157};
  DecodeParams p{};
  p.batch = batch;
  p.heads_kv = heads_kv;
  p.selection = selection.data();
  p.selection_len = n;
  p.selection_unit = unit;
  for (int trial = 0; trial < 20; ++trial) {
    for (auto& e : selection) e = std::uniform_int_distribution<int>(-3, len_max / unit + 2)(rng);
    if (trial % 4 == 0) std::fill(selection.begin() + n, selection.begin() + 2 * n, -1);  // an empty row
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads_kv; ++h) {
        const int32_t* row = selection.data() + (size_t(b) * heads_kv + h) * n;
        std::vector<int> want;  // tokens in selection order
        int last_valid = -1;
        for (int e = 0; e < n; ++e) {
          if (row[e] < 0) continue;
          for (int t = row[e] * unit; t < (row[e] + 1) * unit; ++t)
            if (t < lens[b]) want.push_back(t), last_valid = e;
        }
        const int keys = attnkit::decode_pair_keys(p, b, h, lens[b]);
        EXPECT(keys == (last_valid + 1) * unit, "pair keys %d, want %d (unit %d)", keys, (last_valid + 1) * unit,
               unit);
        std::vector<int> got;
        for (int j = 0; j < keys + 2 * unit; ++j) {
          const int pos = attnkit::decode_key_position(p, b, h, j, lens[b]);
          EXPECT(pos == -1 || j < keys, "work key %d past the axis end %d names token %d", j, keys, pos);
          if (pos >= 0) got.push_back(pos);
        }
        EXPECT(got == want, "selected tokens differ (unit %d, b %d, h %d): %zu vs %zu", unit, b, h, got.size(),
               want.size());
      }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (int page_size : {1, 2, 3, 16, 64, 100, 256}) check_paged_offsets(page_size, rng);
  check_contiguous_offsets();
  check_rows();
  check_workspace(rng);
  check_workspace_vs_batch();
  check_capacity_bound();
  for (int unit : {1, 3, 16}) check_sparse_axis(unit, rng);
  if (failures == 0) std::printf("decode_layout: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
