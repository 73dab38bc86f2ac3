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

std::vector<std::string> split(const std::string& list) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos <= list.size();) {
    size_t comma = list.find(',', pos);
    if (comma == std::string::npos) comma = list.size();
    out.push_back(list.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

int to_int(const std::string& s, const char* flag) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (end == s.c_str() || *end != '\0' || v <= 0 || v > (1L << 20)) usage((std::string("bad value for ") + flag).c_str());
  return int(v);
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
      const std::string v = value();
      if (v == "bf16") o.dtype = DType::kBFloat16;
      else if (v == "fp16") o.dtype = DType::kFloat16;
      else usage("--dtype takes bf16 or fp16");
    } else if (a == "--hdim") {
      o.hdims.clear();
      for (const auto& s : split(value())) o.hdims.push_back(to_int(s, "--hdim"));
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
      o.iters = to_int(value(), "--iters");
    } else if (a == "--warmup") {
      o.warmup = to_int(value(), "--warmup");
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
  using attnkit::cuda::to_float;
  __shared__ float qs[kMaxHdim], acc[kMaxHdim], red[kRefThreads];
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const int hk = h / (p.heads_q / p.heads_kv), d = p.head_dim;
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + i * p.q_strides.row + h * p.q_strides.head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = to_float(q[c]), acc[c] = 0.0f;
  __syncthreads();
  const attnkit::GridBox box = p.nbhd.keys_of(i);
  const int64_t count = attnkit::box_size(box);
  const auto key_of = [&](int64_t n) {  // the n-th key of the box, row-major
    int c[attnkit::kMaxSpatialRank];
    for (int a = attnkit::kMaxSpatialRank - 1; a >= 0; --a) {
      const attnkit::AxisRange& r = box.axis[a];
      c[a] = r.first + int(n % r.count) * r.step;
      n /= r.count;
    }
    return p.nbhd.token_of(c);
  };
  const auto score = [&](int64_t j) {
    const T* kr = k + j * p.k_strides.row;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s += qs[c] * to_float(kr[c]);
    return s * p.scale;
  };
  float m = -INFINITY;
  for (int64_t n = threadIdx.x; n < count; n += blockDim.x) m = fmaxf(m, score(key_of(n)));
  m = block_reduce(m, true, red);
  float sum = 0.0f, part[kMaxHdim];  // this thread's share of P @ V (local memory: a reference)
  for (int c = 0; c < d; ++c) part[c] = 0.0f;
  for (int64_t n = threadIdx.x; n < count; n += blockDim.x) {
    const int64_t j = key_of(n);
    const float e = __expf(score(j) - m);
    sum += e;
    for (int c = 0; c < d; ++c) part[c] += e * to_float(v[j * p.v_strides.row + c]);
  }
  sum = block_reduce(sum, false, red);
  for (int c = 0; c < d; ++c) atomicAdd(&acc[(c + threadIdx.x) % d], part[(c + threadIdx.x) % d]);
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) ref_out[int64_t(blockIdx.x) * d + c] = acc[c] / sum;
  if (threadIdx.x == 0) ref_lse[blockIdx.x] = m + logf(sum);
}

template <typename T>
__global__ void gather_rows(const __grid_constant__ NeighborhoodParams p, const int* rows, float* out, float* lse) {
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const T* o = static_cast<const T*>(p.out) + b * p.out_strides.batch + i * p.out_strides.row + h * p.out_strides.head;
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x)
    out[int64_t(blockIdx.x) * p.head_dim + c] = attnkit::cuda::to_float(o[c]);
  if (threadIdx.x == 0) lse[blockIdx.x] = p.lse[(int64_t(b) * p.heads_q + h) * p.nbhd.tokens() + i];
}

std::string check_forward(const NeighborhoodParams& p) {
  const int nrows = 64;
  const int tokens = int(p.nbhd.tokens());
  std::vector<int> rows(3 * nrows);
  uint64_t state = 12345;
  auto next = [&](int mod) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return int((state >> 33) % uint64_t(mod));
  };
  for (int r = 0; r < nrows; ++r) {
    rows[3 * r] = next(p.batch);
    rows[3 * r + 1] = next(p.heads_q);
    rows[3 * r + 2] = r == 0 ? 0 : r == 1 ? tokens - 1 : next(tokens);  // both borders too
  }
  const int64_t n_out = int64_t(p.batch) * tokens * p.heads_q * p.head_dim;
  SampledRows sample(rows, nrows, p.head_dim);
  for_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    reference_rows<T><<<nrows, kRefThreads>>>(p, sample.rows.as<int>(), sample.ref_out.as<float>(),
                                              sample.ref_lse.as<float>());
    gather_rows<T><<<nrows, 128>>>(p, sample.rows.as<int>(), sample.got_out.as<float>(),
                                   sample.got_lse.as<float>());
    count_nonfinite<T><<<1024, 256>>>(static_cast<const T*>(p.out), n_out,
                                      sample.nonfinite.as<unsigned long long>());
  });
  return sample.verdict();
}

// Device buffers of the rotated input sets.
struct Sets : DeviceArena {
  std::vector<NeighborhoodParams> fwd;
  std::vector<NeighborhoodBwdParams> bwd;
};

// The same tokens as a dense non-causal prefill: the speed-of-light baseline.
using attnkit::cuda::neighborhood::as_prefill;

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
  int l2 = 0, dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
  const int nsets = int(std::min<size_t>(4, std::max<size_t>(1, (3 * size_t(l2) + set_bytes - 1) / set_bytes)));
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
    std::printf("%-34s  FAILED: %s\n", name, e.what());
    ++failures;
    if (cudaDeviceSynchronize() != cudaSuccess) return false;  // a sticky device error
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    int dev = 0;
    cudaDeviceProp prop{};
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    std::printf("attnkit bench/neighborhood on %s (sm_%d%d, %d SMs, L2 %d MiB)\ncommand:", prop.name, prop.major,
                prop.minor, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
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
