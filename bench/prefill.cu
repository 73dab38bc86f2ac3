// bench/prefill: torch-free microbenchmark of the CUDA prefill kernels
// (attnkit::cuda::attention_fwd / attention_bwd from csrc/cuda/kernels.h).
//
//   prefill [--dtype bf16|fp16] [--hdim D] [--heads H] [--kv-heads HKV] [--seqlen S[,S...]]
//           [--batch B] [--tokens T] [--causal 0|1|both] [--bwd] [--iters N] [--warmup N]
//           [--no-check] [--no-ceiling]
//
// Default sweep: bf16, head_dim 128, 16 heads, 16k tokens per batch (batch = tokens / seqlen)
// for seqlen 512, 1k, 2k, 4k, 8k, 16k, non-causal and causal, forward only (--bwd adds the
// backward of each case). Method (docs/benchmarking.md):
// - random inputs (normal, never zeros), filled on the device;
// - enough input sets, rotated call after call, to exceed 3x the L2 (at most 4);
// - warm-up calls, then a pair of CUDA events around every timed call; the median is the
//   result, min-max the spread;
// - FLOPs by the FlashAttention convention: forward 4 * b * h * sq * sk * d, halved for
//   causal when sq == sk; backward 2.5x forward;
// - the matmul ceiling is measured once in the same run: a cublasGemmEx of the same dtype,
//   8192^3, fp32 accumulation; "% ceil" = TFLOP/s over it;
// - each forward case is checked on 64 sampled rows against a naive fp32 kernel (out and
//   LSE), and the whole output is scanned for NaN / inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef ATTNKIT_BENCH_CUBLAS
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnkit/mask.h"
#include "attnkit/params.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"
#include "cuda/kernels.h"
#include "common.cuh"

namespace {

using attnkit::AttentionBwdParams;
using attnkit::AttentionParams;
using attnkit::DType;
using attnkit::Strides;
using attnkit::cuda::check;
using namespace attnkit::bench;

// ------------------------------------------------------------------------------------
// options

struct Options {
  DType dtype = DType::kBFloat16;
  int hdim = 128;
  int heads = 16;
  int kv_heads = 0;  // 0: = heads
  std::vector<int> seqlens{512, 1024, 2048, 4096, 8192, 16384};
  int batch = 0;  // 0: tokens / seqlen
  int64_t tokens = 16384;
  std::vector<bool> causal{false, true};
  bool bwd = false;
  int iters = 20;
  int warmup = 5;
  bool check_rows = true;
  bool ceiling = true;
};

[[noreturn]] void usage(const char* why, int code = 2) {
  std::fprintf(code ? stderr : stdout,
               "prefill: %s\n"
               "usage: prefill [--dtype bf16|fp16] [--hdim D] [--heads H] [--kv-heads HKV]\n"
               "               [--seqlen S[,S...]] [--batch B] [--tokens T] [--causal 0|1|both]\n"
               "               [--bwd] [--iters N] [--warmup N] [--no-check] [--no-ceiling]\n",
               why);
  std::exit(code);
}

int to_int(const char* s, const char* flag) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v <= 0 || v > (1L << 30)) usage((std::string("bad value for ") + flag).c_str());
  return int(v);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage((a + " needs a value").c_str());
      return argv[++i];
    };
    if (a == "--dtype") {
      const std::string v = value();
      if (v == "bf16" || v == "bfloat16") o.dtype = DType::kBFloat16;
      else if (v == "fp16" || v == "float16" || v == "half") o.dtype = DType::kFloat16;
      else usage("--dtype takes bf16 or fp16 (the CUDA kernels take no fp32)");
    } else if (a == "--hdim") {
      o.hdim = to_int(value(), "--hdim");
    } else if (a == "--heads") {
      o.heads = to_int(value(), "--heads");
    } else if (a == "--kv-heads") {
      o.kv_heads = to_int(value(), "--kv-heads");
    } else if (a == "--seqlen") {
      o.seqlens.clear();
      std::string list = value();
      for (size_t pos = 0; pos <= list.size();) {
        size_t comma = list.find(',', pos);
        if (comma == std::string::npos) comma = list.size();
        o.seqlens.push_back(to_int(list.substr(pos, comma - pos).c_str(), "--seqlen"));
        pos = comma + 1;
      }
    } else if (a == "--batch") {
      o.batch = to_int(value(), "--batch");
    } else if (a == "--tokens") {
      o.tokens = to_int(value(), "--tokens");
    } else if (a == "--causal") {
      // A bare --causal (last, or followed by another flag) means causal only.
      const std::string v = (i + 1 < argc && argv[i + 1][0] != '-') ? value() : "1";
      if (v == "1") o.causal = {true};
      else if (v == "0") o.causal = {false};
      else if (v == "both") o.causal = {false, true};
      else usage("--causal takes 0, 1 or both");
    } else if (a == "--bwd") {
      o.bwd = true;
    } else if (a == "--iters") {
      o.iters = to_int(value(), "--iters");
    } else if (a == "--warmup") {
      o.warmup = to_int(value(), "--warmup");
    } else if (a == "--no-check") {
      o.check_rows = false;
    } else if (a == "--no-ceiling") {
      o.ceiling = false;
    } else if (a == "-h" || a == "--help") {
      usage("torch-free microbenchmark of attnkit's CUDA prefill kernels", 0);
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  if (o.heads % o.kv_heads != 0) usage("--heads must be a multiple of --kv-heads");
  return o;
}

// ------------------------------------------------------------------------------------
// device helpers

// The naive reference of one sampled (batch, head, query) row per block, fp32: scores over
// the row's visible keys (attnkit/mask.h, the rule the kernels share), max, sum, P @ V.
// Writes the row's output (head_dim floats) and LSE.
constexpr int kRefThreads = 128;
constexpr int kMaxHdim = 256;

template <typename T>
__global__ void __launch_bounds__(kRefThreads) reference_rows(const __grid_constant__ AttentionParams p,
                                                             const int* rows, float* ref_out, float* ref_lse) {
  using attnkit::cuda::to_float;
  __shared__ float qs[kMaxHdim];
  __shared__ float acc[kMaxHdim];
  __shared__ float red[kRefThreads];
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const int hk = h / (p.heads_q / p.heads_kv);
  const int d = p.head_dim;
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + i * p.q_strides.row + h * p.q_strides.head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    qs[c] = to_float(q[c]);
    acc[c] = 0.0f;
  }
  __syncthreads();
  const attnkit::KeyRange keys =
      attnkit::AttentionMask(p.seqlen_q, p.seqlen_k, p.causal, p.window_left, p.window_right).keys_of(i);
  auto score = [&](int j) {
    const T* kr = k + j * p.k_strides.row;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s += qs[c] * to_float(kr[c]);
    s *= p.scale;
    return p.softcap > 0.0f ? p.softcap * tanhf(s / p.softcap) : s;
  };
  float m = -INFINITY;
  for (int j = keys.begin + threadIdx.x; j < keys.end; j += blockDim.x) m = fmaxf(m, score(j));
  m = block_reduce(m, true, red);
  float sum = 0.0f;
  float part[kMaxHdim];  // this thread's share of P @ V (local memory; a reference, not a kernel)
  for (int c = 0; c < d; ++c) part[c] = 0.0f;
  for (int j = keys.begin + threadIdx.x; j < keys.end; j += blockDim.x) {
    const float e = __expf(score(j) - m);
    sum += e;
    const T* vr = v + j * p.v_strides.row;
    for (int c = 0; c < d; ++c) part[c] += e * to_float(vr[c]);
  }
  sum = block_reduce(sum, false, red);
  for (int c = 0; c < d; ++c) atomicAdd(&acc[(c + threadIdx.x) % d], part[(c + threadIdx.x) % d]);
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) ref_out[int64_t(blockIdx.x) * d + c] = sum > 0 ? acc[c] / sum : 0.0f;
  if (threadIdx.x == 0) ref_lse[blockIdx.x] = sum > 0 ? m + logf(sum) : -INFINITY;
}

template <typename T>
__global__ void gather_rows(const __grid_constant__ AttentionParams p, const int* rows, float* out, float* lse) {
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const T* o = static_cast<const T*>(p.out) + b * p.out_strides.batch + i * p.out_strides.row + h * p.out_strides.head;
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x)
    out[int64_t(blockIdx.x) * p.head_dim + c] = attnkit::cuda::to_float(o[c]);
  if (threadIdx.x == 0) lse[blockIdx.x] = p.lse[(int64_t(b) * p.heads_q + h) * p.seqlen_q + i];
}

// ------------------------------------------------------------------------------------
// one case

struct Case {
  int batch, seqlen, heads, kv_heads, hdim;
  bool causal;
};

struct Sets : DeviceArena {
  // Per rotated input set: q, k, v, out, lse (+ backward: dout, dq, dk, dv, dq_accum, delta).
  std::vector<AttentionParams> fwd;
  std::vector<AttentionBwdParams> bwd;
};

Strides dense_strides(int seqlen, int heads, int hdim) {
  return Strides{int64_t(seqlen) * heads * hdim, int64_t(heads) * hdim, hdim};
}

double fwd_flops(const Case& c) {
  return 4.0 * c.batch * c.heads * double(c.seqlen) * c.seqlen * c.hdim * (c.causal ? 0.5 : 1.0);
}

// Checks 64 sampled rows of set 0's forward output and LSE against reference_rows, and
// scans the whole output for non-finite values. Returns a short verdict.
std::string check_forward(const AttentionParams& p) {
  const int nrows = 64;
  std::vector<int> rows(3 * nrows);
  uint64_t state = 12345;
  auto next = [&](int mod) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return int((state >> 33) % uint64_t(mod));
  };
  for (int r = 0; r < nrows; ++r) {
    rows[3 * r] = next(p.batch);
    rows[3 * r + 1] = next(p.heads_q);
    rows[3 * r + 2] = r < 4 ? (r < 2 ? r : p.seqlen_q - 1 - (r - 2)) : next(p.seqlen_q);  // first and last rows too
  }
  const int64_t n_out = int64_t(p.batch) * p.seqlen_q * p.heads_q * p.head_dim;
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

bool run_case(const Options& o, const Case& c, double ceiling, int& failures) {
  char name[128];
  std::snprintf(name, sizeof name, "%s B%d S%d Hq%d Hkv%d D%d%s", dtype_name(o.dtype), c.batch, c.seqlen, c.heads,
                c.kv_heads, c.hdim, c.causal ? " causal" : "");
  if (!attnkit::cuda::attention_supports(o.dtype, c.hdim)) {
    std::printf("%-40s  skipped: attention_supports(%s, %d) is false\n", name, dtype_name(o.dtype), c.hdim);
    return true;
  }
  const int64_t n_q = int64_t(c.batch) * c.seqlen * c.heads * c.hdim;
  const int64_t n_kv = int64_t(c.batch) * c.seqlen * c.kv_heads * c.hdim;
  const int64_t n_lse = int64_t(c.batch) * c.heads * c.seqlen;
  const size_t es = elem_size(o.dtype);
  const size_t in_bytes = (2 * n_q + 2 * n_kv) * es;  // q, k, v read, out written
  int l2 = 0, dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
  const int nsets = int(std::min<size_t>(4, std::max<size_t>(1, (3 * size_t(l2) + in_bytes - 1) / in_bytes)));

  Sets sets;
  try {
    for (int s = 0; s < nsets; ++s) {
      AttentionParams p{};
      p.dtype = o.dtype;
      p.q = sets.alloc(n_q * es);
      p.k = sets.alloc(n_kv * es);
      p.v = sets.alloc(n_kv * es);
      p.out = sets.alloc(n_q * es);
      p.lse = static_cast<float*>(sets.alloc(n_lse * 4));
      p.q_strides = p.out_strides = dense_strides(c.seqlen, c.heads, c.hdim);
      p.k_strides = p.v_strides = dense_strides(c.seqlen, c.kv_heads, c.hdim);
      p.batch = c.batch;
      p.heads_q = c.heads;
      p.heads_kv = c.kv_heads;
      p.head_dim = c.hdim;
      p.seqlen_q = p.seqlen_k = c.seqlen;
      p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
      p.scale = 1.0f / std::sqrt(float(c.hdim));
      p.softcap = 0.0f;
      p.causal = c.causal;
      p.window_left = -1;
      p.window_right = -1;  // as the binding passes it: causal is its own flag
      fill(o.dtype, const_cast<void*>(p.q), n_q, 3 * s + 1);
      fill(o.dtype, const_cast<void*>(p.k), n_kv, 3 * s + 2);
      fill(o.dtype, const_cast<void*>(p.v), n_kv, 3 * s + 3);
      sets.fwd.push_back(p);
      if (o.bwd) {
        AttentionBwdParams bp{};
        bp.fwd = p;
        bp.dout = sets.alloc(n_q * es);
        bp.dq = sets.alloc(n_q * es);
        bp.dk = sets.alloc(n_kv * es);
        bp.dv = sets.alloc(n_kv * es);
        bp.dout_strides = bp.dq_strides = p.q_strides;
        bp.dk_strides = bp.dv_strides = p.k_strides;
        bp.dq_accum = static_cast<float*>(sets.alloc(n_q * 4));
        bp.dq_accum_strides = p.q_strides;
        bp.delta = static_cast<float*>(sets.alloc(n_lse * 4));
        fill(o.dtype, const_cast<void*>(bp.dout), n_q, 1000 + s);
        sets.bwd.push_back(bp);
      }
    }
  } catch (const std::exception& e) {
    cudaGetLastError();  // clear a failed allocation
    std::printf("%-40s  skipped: %s\n", name, e.what());
    return true;
  }

  auto report = [&](const char* dir, const Stat& s, double flops, const std::string& extra) {
    const double tflops = flops / (s.median * 1e-3) / 1e12;
    char pct[16] = "n/a";
    if (ceiling > 0) std::snprintf(pct, sizeof pct, "%.1f%%", 100.0 * tflops / ceiling);
    std::printf("%-40s %-4s %9.3f  %9.3f-%-9.3f %8.1f  %7s  %s\n", name, dir, s.median, s.lo, s.hi, tflops, pct,
                extra.c_str());
    std::fflush(stdout);
  };
  try {
    const Stat f = time_calls([&](int i) { attnkit::cuda::attention_fwd(sets.fwd[i % nsets], nullptr); }, o.warmup,
                              o.iters);
    std::string verdict = nsets > 1 ? std::to_string(nsets) + " input sets" : "";
    if (o.check_rows) {
      const std::string v = check_forward(sets.fwd[0]);
      if (v.rfind("ok", 0) != 0) ++failures;
      verdict = "check " + v + (verdict.empty() ? "" : "; " + verdict);
    }
    report("fwd", f, fwd_flops(c), verdict);
    if (o.bwd) {
      for (int s = 0; s < nsets; ++s) attnkit::cuda::attention_fwd(sets.fwd[s], nullptr);  // out, lse for the bwd
      const Stat b = time_calls([&](int i) { attnkit::cuda::attention_bwd(sets.bwd[i % nsets], nullptr); },
                                o.warmup, o.iters);
      report("bwd", b, 2.5 * fwd_flops(c), "");
    }
  } catch (const std::exception& e) {
    std::printf("%-40s  FAILED: %s\n", name, e.what());
    ++failures;
    // A launch error leaves the context usable; a sticky device error does not.
    if (cudaDeviceSynchronize() != cudaSuccess) return false;
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
    int clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev);
    std::printf("attnkit bench/prefill on %s (sm_%d%d, %d SMs, %.0f MHz, L2 %d MiB)\n", prop.name, prop.major,
                prop.minor, prop.multiProcessorCount, clock_khz / 1e3, prop.l2CacheSize >> 20);
    std::printf("command:");
    for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
    std::printf("\n");
    double ceiling = 0;
    std::string desc = "skipped (--no-ceiling)";
    if (o.ceiling) ceiling = measure_matmul_tflops(o.dtype, desc);
    std::printf("matmul ceiling: %.1f TFLOP/s (%s)\n", ceiling, desc.c_str());
    std::printf("FLOPs: fwd 4*b*h*sq*sk*d (halved for causal), bwd 2.5x fwd; %d warm-up + %d timed calls, CUDA events\n\n",
                o.warmup, o.iters);
    std::printf("%-40s %-4s %9s  %-19s %8s  %7s  %s\n", "case", "dir", "ms(med)", "min-max ms", "TFLOP/s", "% ceil",
                "notes");
    int failures = 0;
    for (const bool causal : o.causal) {
      for (const int s : o.seqlens) {
        const int b = o.batch > 0 ? o.batch : int(std::max<int64_t>(1, o.tokens / s));
        if (!run_case(o, Case{b, s, o.heads, o.kv_heads, o.hdim, causal}, ceiling, failures)) {
          std::printf("device error: stopping\n");
          return 1;
        }
      }
    }
    if (failures) std::printf("\n%d case(s) FAILED\n", failures);
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "prefill: %s\n", e.what());
    return 1;
  }
}
