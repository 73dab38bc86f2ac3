// bench/block_sparse: torch-free microbenchmark of the CUDA block-sparse attention kernels
// (attnkit::cuda::block_sparse_fwd / block_sparse_bwd from csrc/cuda/kernels.h), against the
// dense causal prefill (attention_fwd / attention_bwd) on the same tensors in the same run.
//
//   block_sparse [--dtype bf16|fp16] [--hdim D[,D]] [--seqlen S[,S...]] [--pattern NAME[,NAME...]]
//                [--density N[,N...]] [--batch B] [--heads H] [--kv-heads HKV] [--bwd]
//                [--iters N] [--warmup N] [--no-check]
//
// Cases: causal self-attention, bf16, head_dim 128, batch 1, 32 q heads / 8 kv heads, block
// size 64 (query and key blocks: one kernel tile each), seqlen 8k and 32k (--seqlen 131072 for
// 128k), at 1/4, 1/16 and 1/64 of the causal (query, key) pairs (--density 4,16,64: the aim;
// the exact kept fraction is counted and reported). Patterns, per (sequence, q head, query
// block m), lists built on the host with a deterministic RNG where the Python block_sparse
// family (python/attnkit/bench/families.py) scores the data; the sizes follow its formulas
// (QB = query blocks; s2 and streaming give its very lists):
//   topk       block 0 (sink), block m (diagonal) and round(QB / 2N) - 2 random blocks of [1, m)
//   s2         S2-Attention's strided shards: blocks n <= m with (n + h + 1) % N == 0, plus m
//   streaming  block 0 (sink) and the max(1, round(QB / 2N) - 1) blocks ending at m
//   vslash     MInference's vertical-slash: slash lines as block diagonals (offset 0 and
//              round(QB / 4N) - 1 random offsets per head: blocks m - o), vertical lines as
//              exact columns (round(S / 2N) random keys per head; block m's column list: those
//              at or before its last key, outside its listed blocks)
// Method (docs/benchmarking.md): random inputs filled on the device, input sets rotated to
// exceed 3x the L2, warm-up, CUDA events around each call, median and min-max.
// - kept: the fraction of the causal (query, key) pairs the lists keep, counted exactly on
//   the host; FLOPs 4 * d * (kept pairs) over batch and heads (the backward: 2.5x);
// - speed of light: the dense causal time x kept; "% SOL" = SOL time / our time;
// - tiles: the 64 x 64 (query tile, key tile) pairs computed over the causal ones: the forward
//   visits its listed key tiles and gathers its columns 64 to a tile; the backward visits
//   the key tiles holding a kept pair (listed blocks and tiles holding a column);
// - each forward case checks 64 sampled query rows against a naive fp32 kernel over exactly
//   the keys the host lists give (out and LSE), and scans the output for NaN / inf; with
//   --bwd dq, dk and dv are scanned too.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iterator>

#include "attnkit/block_sparse.h"
#include "attnkit/params.h"
#include "common.cuh"
#include "cuda/kernels.h"

namespace {

using attnkit::AttentionBwdParams;
using attnkit::AttentionParams;
using attnkit::BlockLists;
using attnkit::BlockSparseLayout;
using namespace attnkit::bench;

constexpr int kBlock = attnkit::kBlockSparseTile;  // block size of the lists (query and key): one kernel tile
const char* const kPatterns[] = {"topk", "s2", "streaming", "vslash"};

struct Options {
  DType dtype = DType::kBFloat16;
  std::vector<int> hdims{128};
  std::vector<int> seqlens{8192, 32768};
  std::vector<std::string> patterns{std::begin(kPatterns), std::end(kPatterns)};
  std::vector<int> densities{4, 16, 64};  // N: the lists aim at 1/N of the causal pairs
  int batch = 1, heads = 32, kv_heads = 8;
  bool bwd = false;
  int iters = 20, warmup = 5;
  bool check_rows = true;
};

[[noreturn]] void usage(const char* why, int code = 2) {
  std::fprintf(code ? stderr : stdout,
               "block_sparse: %s\n"
               "usage: block_sparse [--dtype bf16|fp16] [--hdim D[,D]] [--seqlen S[,S...]]\n"
               "                    [--pattern NAME[,NAME...]] [--density N[,N...]] [--batch B]\n"
               "                    [--heads H] [--kv-heads HKV] [--bwd] [--iters N] [--warmup N] [--no-check]\n"
               "patterns: topk s2 streaming vslash; density N (or 1/N): aim at 1/N of the causal pairs\n",
               why);
  std::exit(code);
}

std::vector<int> int_list(const std::string& list, const char* flag, bool fractions = false) {
  std::vector<int> out;
  for (std::string s : split(list)) {
    if (fractions && s.rfind("1/", 0) == 0) s = s.substr(2);
    out.push_back(to_int(s, flag, usage));
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage((a + " needs a value").c_str());
      return argv[++i];
    };
    if (a == "--dtype") {
      o.dtype = dtype_arg(value(), usage);
    } else if (a == "--hdim") {
      o.hdims = int_list(value(), "--hdim");
    } else if (a == "--seqlen") {
      o.seqlens = int_list(value(), "--seqlen");
    } else if (a == "--pattern") {
      o.patterns = split(value());
      for (const auto& p : o.patterns)
        if (std::find(std::begin(kPatterns), std::end(kPatterns), p) == std::end(kPatterns))
          usage(("unknown pattern " + p).c_str());
    } else if (a == "--density") {
      o.densities = int_list(value(), "--density", true);
    } else if (a == "--batch") {
      o.batch = to_int(value(), "--batch", usage);
    } else if (a == "--heads") {
      o.heads = to_int(value(), "--heads", usage);
    } else if (a == "--kv-heads") {
      o.kv_heads = to_int(value(), "--kv-heads", usage);
    } else if (a == "--bwd") {
      o.bwd = true;
    } else if (a == "--iters") {
      o.iters = to_int(value(), "--iters", usage);
    } else if (a == "--warmup") {
      o.warmup = to_int(value(), "--warmup", usage);
    } else if (a == "--no-check") {
      o.check_rows = false;
    } else if (a == "-h" || a == "--help") {
      usage("torch-free microbenchmark of attnkit's CUDA block-sparse attention", 0);
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  if (o.heads % o.kv_heads != 0) usage("--heads must be a multiple of --kv-heads");
  if (o.heads > 65535 || o.batch > 65535) usage("the CUDA kernels take at most 65535 sequences and heads");
  return o;
}

// ------------------------------------------------------------------------------------
// lists on the host

// Lists in attnkit::BlockLists' layout: indices (batch, heads, rows, len), -1 padded, and
// counts (batch, heads, rows); entries index [0, cols).
struct HostLists {
  int heads = 0, rows = 0, cols = 0, len = 0;
  std::vector<int32_t> indices, counts;

  HostLists() = default;
  HostLists(int batch, int heads_, int rows_, int cols_, int len_)
      : heads(heads_), rows(rows_), cols(cols_), len(std::max(len_, 1)),
        indices(size_t(batch) * heads_ * rows_ * size_t(std::max(len_, 1)), -1),
        counts(size_t(batch) * heads_ * rows_, 0) {}

  int64_t row_of(int b, int h, int r) const { return (int64_t(b) * heads + h) * rows + r; }
  int32_t* entries(int64_t row) { return indices.data() + row * len; }
  const int32_t* entries(int64_t row) const { return indices.data() + row * len; }

  BlockLists view(const int32_t* idx, const int32_t* cnt) const {
    BlockLists l;
    l.indices = idx, l.counts = cnt;
    l.heads = heads, l.row_blocks = rows, l.col_blocks = cols, l.list_len = len;
    return l;
  }
  BlockLists host_view() const { return view(indices.data(), counts.data()); }
  BlockLists upload(DeviceArena& arena) const {
    void* idx = arena.alloc(indices.size() * 4);
    void* cnt = arena.alloc(counts.size() * 4);
    check(cudaMemcpy(idx, indices.data(), indices.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy lists");
    check(cudaMemcpy(cnt, counts.data(), counts.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy counts");
    return view(static_cast<const int32_t*>(idx), static_cast<const int32_t*>(cnt));
  }
};

// The canonical form (attnkit::canonical_row: ascending, distinct, in [0, cols)) of `raw`
// as row `row`.
void store_canonical(HostLists& lists, int64_t row, const std::vector<int32_t>& raw, std::vector<uint32_t>& bitmap) {
  if (int64_t(raw.size()) > lists.len) throw std::logic_error("a list longer than its list_len");
  bitmap.resize(attnkit::bitmap_words(lists.cols));
  lists.counts[row] =
      attnkit::canonical_row(raw.data(), int(raw.size()), lists.len, lists.cols, bitmap.data(), lists.entries(row));
}

// Appends k distinct values of [lo, hi) drawn at random (Floyd's algorithm), or all of them
// when there are no more than k.
void sample_distinct(Lcg& rng, int lo, int hi, int k, std::vector<int32_t>& out) {
  const int n = hi - lo;
  if (n <= 0 || k <= 0) return;
  if (k >= n) {
    for (int v = lo; v < hi; ++v) out.push_back(v);
    return;
  }
  std::vector<uint8_t> taken(n, 0);
  for (int j = n - k; j < n; ++j) {
    const int t = rng.below(j + 1);
    const int pick = taken[t] ? j : t;
    taken[pick] = 1;
    out.push_back(lo + pick);
  }
}

// One pattern's lists: key blocks per query block and, for vslash, key columns per query
// block (canonical, none in a listed block).
struct Pattern {
  HostLists blocks, columns;
  bool has_columns = false;
};

Pattern make_pattern(const std::string& name, int inv, int batch, int heads, int seqlen) {
  const int qb = (seqlen + kBlock - 1) / kBlock;
  Pattern pt;
  std::vector<int32_t> raw;
  std::vector<uint32_t> bitmap;
  const auto blocks_of_rows = [&](int len, auto&& row_fn) {
    pt.blocks = HostLists(batch, heads, qb, qb, len);
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h)
        for (int m = 0; m < qb; ++m) {
          raw.clear();
          row_fn(b, h, m);
          store_canonical(pt.blocks, pt.blocks.row_of(b, h, m), raw, bitmap);
        }
  };
  if (name == "topk") {
    const int top_k = std::max(0, int(std::lround(qb / (2.0 * inv))) - 2);
    blocks_of_rows(top_k + 2, [&](int b, int h, int m) {
      Lcg rng(hash32(0x70b0000000ULL + uint64_t(pt.blocks.row_of(b, h, m))));
      raw.push_back(0);
      raw.push_back(m);
      sample_distinct(rng, 1, m, top_k, raw);
    });
  } else if (name == "s2") {
    const int stride = inv;
    blocks_of_rows((qb + stride - 1) / stride + 1, [&](int, int h, int m) {
      for (int n = 0; n <= m; ++n)
        if ((n + h + 1) % stride == 0) raw.push_back(n);
      raw.push_back(m);
    });
  } else if (name == "streaming") {
    const int local = std::max(1, int(std::lround(qb / (2.0 * inv))) - 1);
    blocks_of_rows(local + 1, [&](int, int, int m) {
      raw.push_back(0);
      for (int n = std::max(0, m - local + 1); n <= m; ++n) raw.push_back(n);
    });
  } else if (name == "vslash") {
    // Half the kept pairs from each kind of line: a block diagonal keeps ~S * 64 pairs, a
    // column ~S / 2.
    const int slash = std::max(1, int(std::lround(qb / (4.0 * inv))));
    const int vertical = std::min(seqlen, std::max(1, int(std::lround(seqlen / (2.0 * inv)))));
    std::vector<std::vector<int32_t>> offsets(size_t(batch) * heads), keys(offsets.size());
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h) {
        Lcg rng(hash32(0x5a5a000000ULL + uint64_t(b) * heads + h));
        auto& o = offsets[size_t(b) * heads + h];
        o.push_back(0);
        sample_distinct(rng, 1, qb, slash - 1, o);
        auto& k = keys[size_t(b) * heads + h];
        sample_distinct(rng, 0, seqlen, vertical, k);
        std::sort(k.begin(), k.end());
      }
    blocks_of_rows(slash, [&](int b, int h, int m) {
      for (const int o : offsets[size_t(b) * heads + h])
        if (o <= m) raw.push_back(m - o);
    });
    pt.has_columns = true;
    pt.columns = HostLists(batch, heads, qb, seqlen, vertical);
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h)
        for (int m = 0; m < qb; ++m) {
          const int64_t row = pt.blocks.row_of(b, h, m);
          const int last = std::min(seqlen, (m + 1) * kBlock) - 1;
          int32_t* out = pt.columns.entries(row);
          int n = 0;
          for (const int32_t key : keys[size_t(b) * heads + h]) {  // ascending and distinct: canonical
            if (key > last) break;
            if (!attnkit::list_contains(pt.blocks.entries(row), pt.blocks.counts[row], key / kBlock)) out[n++] = key;
          }
          pt.columns.counts[row] = n;
        }
  } else {
    throw std::invalid_argument("unknown pattern " + name);
  }
  return pt;
}

// The transposed lists (attnkit::transpose_row): per column c of `in`, its rows holding c.
HostLists transpose(const HostLists& in, int batch) {
  HostLists out(batch, in.heads, in.cols, in.rows, in.rows);
  const BlockLists view = in.host_view();
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < in.heads; ++h)
      for (int c = 0; c < in.cols; ++c) {
        const int64_t row = out.row_of(b, h, c);
        out.counts[row] = attnkit::transpose_row(view, b, h, c, out.entries(row));
      }
  return out;
}

// Per query block the key tiles holding one of its columns (canonical), as the binding
// builds them before transposing them into q_column_tiles.
HostLists column_tiles(const HostLists& columns, int batch) {
  const int tiles = (columns.cols + kBlock - 1) / kBlock;
  HostLists out(batch, columns.heads, columns.rows, tiles, std::min(columns.len, tiles));
  for (int64_t row = 0; row < int64_t(out.counts.size()); ++row) {
    const int32_t* keys = columns.entries(row);
    int32_t* t = out.entries(row);
    int n = 0;
    for (int i = 0; i < columns.counts[row]; ++i)  // keys ascending: so are their tiles
      if (n == 0 || t[n - 1] != keys[i] / kBlock) t[n++] = keys[i] / kBlock;
    out.counts[row] = n;
  }
  return out;
}

// Pairs of rows [r0, r1) and keys [k0, k1) that the causal rule keeps (key <= row).
int64_t causal_pairs(int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
  int64_t pairs = 0;
  const int64_t a = std::max(r0, k0), e = std::min(r1, k1 - 1);  // rows that see part of the keys
  if (a < e) pairs += (e - a) * (a + e + 1 - 2 * k0) / 2;          // row r sees r + 1 - k0 of them
  const int64_t f = std::max(r0, k1 - 1);                          // rows that see all of them
  if (f < r1) pairs += (r1 - f) * (k1 - k0);
  return pairs;
}

// What the lists keep and what the kernels compute, summed over sequences and heads.
struct Work {
  int64_t pairs = 0, causal = 0;             // kept and all causal (query, key) pairs
  int64_t fwd_tiles = 0, bwd_tiles = 0, causal_tiles = 0;  // 64 x 64 tile pairs
  double kept() const { return double(pairs) / double(causal); }
};

Work count_work(const Pattern& pt, int batch, int heads, int seqlen) {
  const int qb = pt.blocks.rows;
  Work w;
  w.causal = int64_t(batch) * heads * (int64_t(seqlen) * (seqlen + 1) / 2);
  w.causal_tiles = int64_t(batch) * heads * (int64_t(qb) * (qb + 1) / 2);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int m = 0; m < qb; ++m) {
        const int64_t row = pt.blocks.row_of(b, h, m);
        const int64_t r0 = int64_t(m) * kBlock, r1 = std::min<int64_t>(seqlen, r0 + kBlock);
        const int32_t* blocks = pt.blocks.entries(row);
        for (int i = 0; i < pt.blocks.counts[row]; ++i) {
          const int n = blocks[i];
          if (n > m) continue;  // above the diagonal: the causal walk skips it
          w.pairs += causal_pairs(r0, r1, int64_t(n) * kBlock, std::min<int64_t>(seqlen, (int64_t(n) + 1) * kBlock));
          ++w.fwd_tiles, ++w.bwd_tiles;
        }
        if (!pt.has_columns) continue;
        const int32_t* keys = pt.columns.entries(row);
        const int count = pt.columns.counts[row];
        int last_tile = -1;
        for (int i = 0; i < count; ++i) {
          w.pairs += std::max<int64_t>(0, r1 - std::max<int64_t>(r0, keys[i]));
          if (keys[i] / kBlock != last_tile) ++w.bwd_tiles, last_tile = keys[i] / kBlock;
        }
        w.fwd_tiles += (count + kBlock - 1) / kBlock;  // gathered 64 to a tile (all lie before r1)
      }
  return w;
}

// The keys query row i of (b, h) sees: its block's listed keys and columns at or before i.
void keys_of_row(const Pattern& pt, int seqlen, int b, int h, int i, std::vector<int32_t>& out) {
  const int64_t row = pt.blocks.row_of(b, h, i / kBlock);
  const int32_t* blocks = pt.blocks.entries(row);
  for (int e = 0; e < pt.blocks.counts[row]; ++e)
    for (int key = blocks[e] * kBlock; key < std::min(seqlen, (blocks[e] + 1) * kBlock) && key <= i; ++key)
      out.push_back(key);
  if (!pt.has_columns) return;
  const int32_t* keys = pt.columns.entries(row);
  for (int e = 0; e < pt.columns.counts[row]; ++e)
    if (keys[e] <= i) out.push_back(keys[e]);
}

// ------------------------------------------------------------------------------------
// the check

constexpr int kRefThreads = 128;
constexpr int kMaxHdim = 128;

// The naive reference of one sampled (batch, head, query) row per block, fp32, over the keys
// keys[offsets[r], offsets[r + 1]) the host listed for it.
template <typename T>
__global__ void __launch_bounds__(kRefThreads)
    reference_rows(const __grid_constant__ AttentionParams p, const int* rows, const int64_t* offsets,
                   const int32_t* keys, float* ref_out, float* ref_lse) {
  const SampledRow<T> r(p, rows);
  const int32_t* row_keys = keys + offsets[blockIdx.x];
  reference_row<T, kRefThreads, kMaxHdim>(r.q, r.k, p.k_strides.row, r.v, p.v_strides.row, p.head_dim, p.scale, 0.0f,
                                          offsets[blockIdx.x + 1] - offsets[blockIdx.x],
                                          [&](int64_t n) { return int64_t(row_keys[n]); },
                                          ref_out + int64_t(blockIdx.x) * p.head_dim, ref_lse + blockIdx.x);
}

// 64 sampled rows of set 0's output and LSE (the first and last rows and block borders
// among them) against reference_rows, and a scan of the whole output for NaN / inf.
std::string check_forward(const AttentionParams& p, const Pattern& pt) {
  const int nrows = 64, qb = pt.blocks.rows;
  std::vector<int> rows(3 * nrows);
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> keys;
  Lcg rng(12345);
  for (int r = 0; r < nrows; ++r) {
    const int b = rng.below(p.batch), h = rng.below(p.heads_q);
    const int border = std::min(p.seqlen_q - 1, rng.below(qb) * kBlock + (r % 2 ? kBlock - 1 : 0));
    const int i = r == 0 ? 0 : r == 1 ? p.seqlen_q - 1 : r < 8 ? border : rng.below(p.seqlen_q);
    rows[3 * r] = b, rows[3 * r + 1] = h, rows[3 * r + 2] = i;
    keys_of_row(pt, p.seqlen_k, b, h, i, keys);
    offsets.push_back(int64_t(keys.size()));
  }
  DeviceBuffer d_offsets(offsets.size() * sizeof(int64_t)), d_keys(keys.size() * sizeof(int32_t));
  check(cudaMemcpy(d_offsets.ptr, offsets.data(), offsets.size() * sizeof(int64_t), cudaMemcpyHostToDevice),
        "cudaMemcpy");
  if (!keys.empty())
    check(cudaMemcpy(d_keys.ptr, keys.data(), keys.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
  SampledRows sample(rows, nrows, p.head_dim);
  return sample.check_rows(p, [&](auto t) {
    reference_rows<decltype(t)><<<nrows, kRefThreads>>>(p, sample.rows.as<int>(), d_offsets.as<int64_t>(),
                                                        d_keys.as<int32_t>(), sample.ref_out.as<float>(),
                                                        sample.ref_lse.as<float>());
  });
}

// Non-finite values in set 0's dq, dk and dv.
unsigned long long nonfinite_grads(const AttentionBwdParams& bp, int64_t n_q, int64_t n_kv) {
  DeviceBuffer count(sizeof(unsigned long long));
  check(cudaMemset(count.ptr, 0, sizeof(unsigned long long)), "cudaMemset");
  for_dtype(bp.fwd.dtype, [&](auto t) {
    using T = decltype(t);
    auto* c = count.as<unsigned long long>();
    count_nonfinite<T><<<1024, 256>>>(static_cast<const T*>(bp.dq), n_q, c);
    count_nonfinite<T><<<1024, 256>>>(static_cast<const T*>(bp.dk), n_kv, c);
    count_nonfinite<T><<<1024, 256>>>(static_cast<const T*>(bp.dv), n_kv, c);
  });
  check(cudaGetLastError(), "count_nonfinite");
  unsigned long long n = 0;
  check(cudaMemcpy(&n, count.ptr, sizeof n, cudaMemcpyDeviceToHost), "cudaMemcpy");
  return n;
}

// ------------------------------------------------------------------------------------
// one shape: the dense peer once, then every pattern and density

void print_row(const char* name, const char* dir, const Stat& s, double flops, double sol_ms, double kept,
               double tiles, const std::string& notes) {
  std::printf("%-44s %-4s %9.3f  %8.3f-%-8.3f %8.1f  %9.3f %6.1f%%  %6.4f %6.4f  %s\n", name, dir, s.median, s.lo,
              s.hi, flops / (s.median * 1e-3) / 1e12, sol_ms, 100.0 * sol_ms / s.median, kept, tiles, notes.c_str());
  std::fflush(stdout);
}

bool run_shape(const Options& o, int hdim, int seqlen, int& failures) {
  const int B = o.batch, H = o.heads, Hkv = o.kv_heads;
  char shape[96];
  std::snprintf(shape, sizeof shape, "%s S%d Hq%d Hkv%d D%d", dtype_name(o.dtype), seqlen, H, Hkv, hdim);
  if (!attnkit::cuda::block_sparse_supports(o.dtype, hdim) || !attnkit::cuda::attention_supports(o.dtype, hdim)) {
    std::printf("%-44s  skipped: block_sparse_supports / attention_supports(%s, %d) is false\n", shape,
                dtype_name(o.dtype), hdim);
    return true;
  }
  const int64_t n_q = int64_t(B) * seqlen * H * hdim, n_kv = int64_t(B) * seqlen * Hkv * hdim;
  PrefillSets sets;
  try {
    sets.make(o.dtype, PrefillShape{B, seqlen, H, Hkv, hdim, true}, o.bwd);
  } catch (const std::exception& e) {
    cudaGetLastError();  // clear a failed allocation
    std::printf("%-44s  skipped: %s\n", shape, e.what());
    return true;
  }
  const int nsets = int(sets.fwd.size());
  using attnkit::cuda::attention_bwd;
  using attnkit::cuda::attention_fwd;
  using attnkit::cuda::block_sparse_bwd;
  using attnkit::cuda::block_sparse_fwd;
  const double causal_flops = 4.0 * hdim * double(B) * H * (double(seqlen) * (seqlen + 1) / 2);

  // The dense causal peer (its out and lse feed its own backward).
  Stat dense{}, dense_bwd{};
  char name[128];
  std::snprintf(name, sizeof name, "dense %s", shape);
  try {
    dense = time_calls([&](int i) { attention_fwd(sets.fwd[i % nsets], nullptr); }, o.warmup, o.iters);
    const std::string notes = std::to_string(nsets) + " input set(s)";
    print_row(name, "fwd", dense, causal_flops, dense.median, 1.0, 1.0, notes);
    if (o.bwd) {
      for (const auto& p : sets.fwd) attention_fwd(p, nullptr);
      dense_bwd = time_calls([&](int i) { attention_bwd(sets.bwd[i % nsets], nullptr); }, o.warmup, o.iters);
      print_row(name, "bwd", dense_bwd, 2.5 * causal_flops, dense_bwd.median, 1.0, 1.0, notes);
    }
  } catch (const std::exception& e) {
    return case_failed(name, 44, e, failures);  // no peer: on to the next shape, unless the device is lost
  }

  for (const std::string& pattern : o.patterns)
    for (const int inv : o.densities) {
      std::snprintf(name, sizeof name, "%s 1/%d %s", pattern.c_str(), inv, shape);
      Pattern pt;
      Work w;
      DeviceArena lists;
      BlockSparseLayout layout;
      layout.block_size_q = layout.block_size_k = kBlock;
      try {
        pt = make_pattern(pattern, inv, B, H, seqlen);
        w = count_work(pt, B, H, seqlen);
        layout.kv_blocks = pt.blocks.upload(lists);
        if (pt.has_columns) layout.columns = pt.columns.upload(lists);
        if (o.bwd) {
          layout.q_blocks = transpose(pt.blocks, B).upload(lists);
          if (pt.has_columns) layout.q_column_tiles = transpose(column_tiles(pt.columns, B), B).upload(lists);
        }
      } catch (const std::exception& e) {
        cudaGetLastError();  // clear a failed allocation
        std::printf("%-44s  skipped: lists: %s\n", name, e.what());
        continue;
      }
      const double flops = 4.0 * hdim * double(w.pairs), kept = w.kept();
      std::string lens = "list_len " + std::to_string(pt.blocks.len);
      if (pt.has_columns) lens += " + " + std::to_string(pt.columns.len) + " columns";
      try {
        const Stat fwd = time_calls([&](int i) { block_sparse_fwd(sets.fwd[i % nsets], layout, nullptr); },
                                    o.warmup, o.iters);
        std::string notes = lens;
        if (o.check_rows) {
          const std::string v = check_forward(sets.fwd[0], pt);
          if (v.rfind("ok", 0) != 0) ++failures;
          notes = "check " + v + "; " + notes;
        }
        print_row(name, "fwd", fwd, flops, dense.median * kept, kept, double(w.fwd_tiles) / double(w.causal_tiles),
                  notes);
        if (o.bwd) {
          for (const auto& p : sets.fwd) block_sparse_fwd(p, layout, nullptr);  // out, lse for the backward
          const Stat bwd = time_calls([&](int i) { block_sparse_bwd(sets.bwd[i % nsets], layout, nullptr); },
                                      o.warmup, o.iters);
          const unsigned long long bad = nonfinite_grads(sets.bwd[0], n_q, n_kv);
          if (bad) ++failures;
          const std::string verdict = bad ? "FAILED (" + std::to_string(bad) + " non-finite in dq, dk, dv)"
                                          : std::string("dq, dk, dv finite");
          print_row(name, "bwd", bwd, 2.5 * flops, dense_bwd.median * kept, kept,
                    double(w.bwd_tiles) / double(w.causal_tiles), verdict + "; " + lens);
        }
      } catch (const std::exception& e) {
        if (!case_failed(name, 44, e, failures)) return false;
      }
    }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    print_device("block_sparse", argc, argv);
    std::printf("\ncausal, batch %d, block size %d; kept = fraction of the causal (query, key) pairs kept; FLOPs: "
                "4*d*(kept pairs), bwd 2.5x; SOL = dense causal ms x kept; tiles = 64x64 tile pairs computed / "
                "causal ones; %d warm-up + %d timed calls, CUDA events\n\n",
                o.batch, kBlock, o.warmup, o.iters);
    std::printf("%-44s %-4s %9s  %-17s %8s  %9s %7s  %6s %6s  %s\n", "case", "dir", "ms(med)", "min-max ms",
                "TFLOP/s", "SOL ms", "% SOL", "kept", "tiles", "notes");
    int failures = 0;
    for (const int hdim : o.hdims)
      for (const int seqlen : o.seqlens)
        if (!run_shape(o, hdim, seqlen, failures)) {
          std::printf("device error: stopping\n");
          return 1;
        }
    if (failures) std::printf("\n%d case(s) FAILED\n", failures);
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "block_sparse: %s\n", e.what());
    return 1;
  }
}
