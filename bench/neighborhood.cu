// bench/neighborhood: torch-free microbenchmark of the CUDA neighborhood attention kernels
// (attnkit::cuda::neighborhood_fwd / neighborhood_bwd from csrc/cuda/kernels.h).
//
//   neighborhood [--dtype bf16|fp16] [--hdim D[,D]] [--case NAME[,NAME...]] [--bwd]
//                [--iters N] [--warmup N] [--no-check]
//
// Cases (issue 7's shapes; hidden size 2048, so 16 heads at head_dim 128 and 32 at 64):
//   1d          B4  32768       kernel 2049
//   2d          B4  128x128     kernel 13
//   2d_dilated  B16 64x64       kernel 13, dilation 2
//   3d          B1  16x32x32    kernel 7x7x7
//   3d_strided  B1  16x32x32    kernel 7x7x7, stride 2x2x2
// Method (docs/benchmarking.md): random inputs filled on the device, input sets rotated to
// exceed 3x the L2, warm-up, CUDA events around each call, median and min-max.
// - FLOPs: 4 * b * h * d * (query, key) pairs that attend, counted exactly on the host
//   (the backward: 2.5x);
// - speed of light (issue 7): the dense prefill of the same tokens (attention_fwd /
//   attention_bwd, timed in the same run) times the fraction of 64x64 (query tile, key tile)
//   pairs holding any neighbour; "% SOL" = SOL time / our time;
// - each forward case checks 64 sampled query rows against a naive fp32 kernel over the
//   query's window (out and LSE), and scans the output for NaN / inf.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "attnkit/neighborhood.h"
#include "attnkit/params.h"
#include "common.cuh"
#include "cuda/kernels.h"
#include "cuda/neighborhood/launch.h"

namespace {

using attnkit::AttentionBwdParams;
using attnkit::AttentionParams;
using attnkit::AxisWindow;
using attnkit::Neighborhood;
using attnkit::NeighborhoodBwdParams;
using attnkit::NeighborhoodParams;
using attnkit::Strides;
using namespace attnkit::bench;
// The same tokens as a dense non-causal prefill: the speed-of-light baseline (and the
// layout gather_rows reads).
using attnkit::cuda::neighborhood::as_prefill;

struct Case {
  const char* name;
  int batch;
  int rank;
  int lengths[3];
  int kernel, dilation, stride;
};

const Case kCases[] = {
    {"1d", 4, 1, {32768, 1, 1}, 2049, 1, 1},     {"2d", 4, 2, {128, 128, 1}, 13, 1, 1},
    {"2d_dilated", 16, 2, {64, 64, 1}, 13, 2, 1}, {"3d", 1, 3, {16, 32, 32}, 7, 1, 1},
    {"3d_strided", 1, 3, {16, 32, 32}, 7, 1, 2},
};

struct Options {
  DType dtype = DType::kBFloat16;
  std::vector<int> hdims{128, 64};
  std::vector<std::string> cases;  // empty: all
  bool bwd = false;
  int iters = 20, warmup = 5;
  bool check_rows = true;
};

[[noreturn]] void usage(const char* why, int code = 2) {
  std::fprintf(code ? stderr : stdout,
               "neighborhood: %s\n"
               "usage: neighborhood [--dtype bf16|fp16] [--hdim D[,D]] [--case NAME[,NAME...]] [--bwd]\n"
               "                    [--iters N] [--warmup N] [--no-check]\n"
               "cases: 1d 2d 2d_dilated 3d 3d_strided\n",
               why);
  std::exit(code);
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
      o.hdims.clear();
      for (const auto& s : split(value())) o.hdims.push_back(to_int(s, "--hdim", usage));
    } else if (a == "--case") {
      o.cases = split(value());
      for (const auto& c : o.cases) {
        bool known = false;
        for (const Case& k : kCases) known = known || c == k.name;
        if (!known) usage(("unknown case " + c).c_str());
      }
    } else if (a == "--bwd") {
      o.bwd = true;
    } else if (a == "--iters") {
      o.iters = to_int(value(), "--iters", usage);
    } else if (a == "--warmup") {
      o.warmup = to_int(value(), "--warmup", usage);
    } else if (a == "--no-check") {
      o.check_rows = false;
    } else if (a == "-h" || a == "--help") {
      usage("torch-free microbenchmark of attnkit's CUDA neighborhood attention", 0);
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  return o;
}

Neighborhood neighborhood_of(const Case& c) {
  Neighborhood nb;
  nb.rank = c.rank;
  for (int a = 0; a < c.rank; ++a) nb.axis[a] = AxisWindow{c.lengths[a], c.kernel, c.dilation, c.stride, false};
  return nb;
}

// (query, key) pairs that attend, summed over the queries of one (batch, head).
double attending_pairs(const Neighborhood& nb) {
  double pairs = 0;
  for (int64_t q = 0; q < nb.tokens(); ++q) pairs += double(attnkit::box_size(nb.keys_of(q)));
  return pairs;
}

// Fraction of (query tile, key tile) pairs of `block` consecutive tokens that hold any
// neighbour: the walk proposes the candidate key tiles, a scan of the pairs confirms them.
double tile_fraction(const Neighborhood& nb, int block) {
  const int64_t tokens = nb.tokens(), tiles = (tokens + block - 1) / block;
  int64_t hits = 0;
  for (int64_t qt = 0; qt < tiles; ++qt) {
    const int64_t q0 = qt * block, q1 = std::min(tokens, q0 + block);
    attnkit::TileWalk walk(nb, q0, q1, block, attnkit::TileSide::kKeys);
    for (int64_t kt = walk.next(); kt >= 0; kt = walk.next()) {
      bool any = false;
      for (int64_t q = q0; q < q1 && !any; ++q)
        for (int64_t k = kt * block; k < std::min(tokens, (kt + 1) * block) && !any; ++k) any = nb.sees(q, k);
      hits += any;
    }
  }
  return double(hits) / (double(tiles) * tiles);
}

// The naive reference of one sampled (batch, head, query) row per block, fp32, over the
// keys of the query's window (attnkit/neighborhood.h, the rule the kernels share).
constexpr int kRefThreads = 128;
constexpr int kMaxHdim = 128;

template <typename T>
__global__ void __launch_bounds__(kRefThreads)
    reference_rows(const __grid_constant__ NeighborhoodParams p, const int* rows, float* ref_out, float* ref_lse) {
  const SampledRow<T> r(p, rows);
  const attnkit::GridBox box = p.nbhd.keys_of(r.i);
  const auto key_of = [&](int64_t n) {  // the n-th key of the box, row-major
    int c[attnkit::kMaxSpatialRank];
    for (int a = attnkit::kMaxSpatialRank - 1; a >= 0; --a) {
      const attnkit::AxisRange& r = box.axis[a];
      c[a] = r.first + int(n % r.count) * r.step;
      n /= r.count;
    }
    return int64_t(p.nbhd.token_of(c));
  };
  reference_row<T, kRefThreads, kMaxHdim>(r.q, r.k, p.k_strides.row, r.v, p.v_strides.row, p.head_dim, p.scale,
                                          0.0f, attnkit::box_size(box), key_of,
                                          ref_out + int64_t(blockIdx.x) * p.head_dim, ref_lse + blockIdx.x);
}

std::string check_forward(const NeighborhoodParams& p) {
  const int nrows = 64;
  const int tokens = int(p.nbhd.tokens());
  std::vector<int> rows(3 * nrows);
  Lcg rng(12345);
  for (int r = 0; r < nrows; ++r) {
    rows[3 * r] = rng.below(p.batch);
    rows[3 * r + 1] = rng.below(p.heads_q);
    rows[3 * r + 2] = r == 0 ? 0 : r == 1 ? tokens - 1 : rng.below(tokens);  // both borders too
  }
  SampledRows sample(rows, nrows, p.head_dim);
  return sample.check_rows(as_prefill(p), [&](auto t) {
    reference_rows<decltype(t)><<<nrows, kRefThreads>>>(p, sample.rows.as<int>(), sample.ref_out.as<float>(),
                                                        sample.ref_lse.as<float>());
  });
}

// Device buffers of the rotated input sets.
struct Sets : DeviceArena {
  std::vector<NeighborhoodParams> fwd;
  std::vector<NeighborhoodBwdParams> bwd;
};

bool run_case(const Options& o, const Case& c, int hdim, int& failures) {
  const int heads = 2048 / hdim;
  const Neighborhood nb = neighborhood_of(c);
  const int64_t tokens = nb.tokens();
  char name[96];
  std::snprintf(name, sizeof name, "%s %s B%d H%d D%d", c.name, dtype_name(o.dtype), c.batch, heads, hdim);
  if (!attnkit::cuda::neighborhood_supports(o.dtype, hdim)) {
    std::printf("%-34s  skipped: neighborhood_supports(%s, %d) is false\n", name, dtype_name(o.dtype), hdim);
    return true;
  }
  const int64_t n = int64_t(c.batch) * tokens * heads * hdim, n_lse = int64_t(c.batch) * heads * tokens;
  const size_t es = elem_size(o.dtype), set_bytes = 4 * n * es;
  const int nsets = input_sets(set_bytes);
  const Strides strides{tokens * heads * hdim, int64_t(heads) * hdim, hdim};

  Sets sets;
  try {
    for (int s = 0; s < nsets; ++s) {
      NeighborhoodParams p{};
      p.dtype = o.dtype;
      p.q = sets.alloc(n * es), p.k = sets.alloc(n * es), p.v = sets.alloc(n * es), p.out = sets.alloc(n * es);
      p.lse = static_cast<float*>(sets.alloc(n_lse * 4));
      p.q_strides = p.k_strides = p.v_strides = p.out_strides = strides;
      p.batch = c.batch, p.heads_q = p.heads_kv = heads, p.head_dim = hdim;
      p.nbhd = nb;
      p.scale = 1.0f / std::sqrt(float(hdim));
      for (int t = 0; t < 3; ++t) fill(o.dtype, const_cast<void*>(t == 0 ? p.q : t == 1 ? p.k : p.v), n, 3 * s + t + 1);
      sets.fwd.push_back(p);
      if (o.bwd) {
        NeighborhoodBwdParams bp{};
        bp.fwd = p;
        bp.dout = sets.alloc(n * es), bp.dq = sets.alloc(n * es), bp.dk = sets.alloc(n * es), bp.dv = sets.alloc(n * es);
        bp.dout_strides = bp.dq_strides = bp.dk_strides = bp.dv_strides = strides;
        bp.dq_accum = static_cast<float*>(sets.alloc(n * 4));
        bp.dq_accum_strides = strides;
        bp.delta = static_cast<float*>(sets.alloc(n_lse * 4));
        fill(o.dtype, const_cast<void*>(bp.dout), n, 1000 + s);
        sets.bwd.push_back(bp);
      }
    }
  } catch (const std::exception& e) {
    cudaGetLastError();  // clear a failed allocation
    std::printf("%-34s  skipped: %s\n", name, e.what());
    return true;
  }

  const double fraction = tile_fraction(nb, 64);
  const double flops = 4.0 * c.batch * heads * hdim * attending_pairs(nb);
  auto report = [&](const char* dir, const Stat& s, const Stat& dense, double f, const std::string& notes) {
    const double sol = dense.median * fraction;
    std::printf("%-34s %-4s %9.3f  %8.3f-%-8.3f %8.1f  %9.3f %9.3f %6.1f%%  %s\n", name, dir, s.median, s.lo, s.hi,
                f / (s.median * 1e-3) / 1e12, dense.median, sol, 100.0 * sol / s.median, notes.c_str());
    std::fflush(stdout);
  };
  try {
    using attnkit::cuda::attention_bwd;
    using attnkit::cuda::attention_fwd;
    using attnkit::cuda::neighborhood_bwd;
    using attnkit::cuda::neighborhood_fwd;
    const Stat dense = time_calls([&](int i) { attention_fwd(as_prefill(sets.fwd[i % nsets]), nullptr); }, o.warmup,
                                  o.iters);
    const Stat fwd = time_calls([&](int i) { neighborhood_fwd(sets.fwd[i % nsets], nullptr); }, o.warmup, o.iters);
    char notes[96];
    std::snprintf(notes, sizeof notes, "tiles %.4f; %d input set(s)", fraction, nsets);
    std::string verdict = notes;
    if (o.check_rows) {
      const std::string v = check_forward(sets.fwd[0]);
      if (v.rfind("ok", 0) != 0) ++failures;
      verdict = "check " + v + "; " + verdict;
    }
    report("fwd", fwd, dense, flops, verdict);
    if (o.bwd) {
      const Stat dense_bwd = time_calls([&](int i) { attention_bwd(as_prefill(sets.bwd[i % nsets]), nullptr); },
                                        o.warmup, o.iters);
      for (const auto& p : sets.fwd) neighborhood_fwd(p, nullptr);  // out, lse for the backward
      const Stat bwd = time_calls([&](int i) { neighborhood_bwd(sets.bwd[i % nsets], nullptr); }, o.warmup, o.iters);
      report("bwd", bwd, dense_bwd, 2.5 * flops, notes);
    }
  } catch (const std::exception& e) {
    if (!case_failed(name, 34, e, failures)) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    print_device("neighborhood", argc, argv);
    std::printf("\nFLOPs: 4*b*h*d*(attending pairs), bwd 2.5x; SOL = dense prefill ms x fraction of 64x64 tile pairs "
                "holding a neighbour; %d warm-up + %d timed calls, CUDA events\n\n",
                o.warmup, o.iters);
    std::printf("%-34s %-4s %9s  %-17s %8s  %9s %9s %7s  %s\n", "case", "dir", "ms(med)", "min-max ms", "TFLOP/s",
                "dense ms", "SOL ms", "% SOL", "notes");
    int failures = 0;
    for (const int hdim : o.hdims)
      for (const Case& c : kCases) {
        bool wanted = o.cases.empty();
        for (const auto& name : o.cases) wanted = wanted || name == c.name;
        if (wanted && !run_case(o, c, hdim, failures)) {
          std::printf("device error: stopping\n");
          return 1;
        }
      }
    if (failures) std::printf("\n%d case(s) FAILED\n", failures);
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "neighborhood: %s\n", e.what());
    return 1;
  }
}
