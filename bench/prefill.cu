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
      o.dtype = dtype_arg(value(), usage);
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
  const SampledRow<T> r(p, rows);
  const attnkit::KeyRange keys =
      attnkit::AttentionMask(p.seqlen_q, p.seqlen_k, p.causal, p.window_left, p.window_right).keys_of(r.i);
  reference_row<T, kRefThreads, kMaxHdim>(r.q, r.k, p.k_strides.row, r.v, p.v_strides.row, p.head_dim, p.scale,
                                          p.softcap, int64_t(keys.end) - keys.begin,
                                          [&](int64_t n) { return keys.begin + n; },
                                          ref_out + int64_t(blockIdx.x) * p.head_dim, ref_lse + blockIdx.x);
}

// ------------------------------------------------------------------------------------
// one case

using Case = PrefillShape;

double fwd_flops(const Case& c) {
  return 4.0 * c.batch * c.heads * double(c.seqlen) * c.seqlen * c.hdim * (c.causal ? 0.5 : 1.0);
}

// Checks 64 sampled rows of set 0's forward output and LSE against reference_rows, and
// scans the whole output for non-finite values. Returns a short verdict.
std::string check_forward(const AttentionParams& p) {
  const int nrows = 64;
  std::vector<int> rows(3 * nrows);
  Lcg rng(12345);
  for (int r = 0; r < nrows; ++r) {
    rows[3 * r] = rng.below(p.batch);
    rows[3 * r + 1] = rng.below(p.heads_q);
    // the first and last rows too
    rows[3 * r + 2] = r < 4 ? (r < 2 ? r : p.seqlen_q - 1 - (r - 2)) : rng.below(p.seqlen_q);
  }
  SampledRows sample(rows, nrows, p.head_dim);
  return sample.check_rows(p, [&](auto t) {
    reference_rows<decltype(t)><<<nrows, kRefThreads>>>(p, sample.rows.as<int>(), sample.ref_out.as<float>(),
                                                        sample.ref_lse.as<float>());
  });
}

bool run_case(const Options& o, const Case& c, double ceiling, int& failures) {
  char name[128];
  std::snprintf(name, sizeof name, "%s B%d S%d Hq%d Hkv%d D%d%s", dtype_name(o.dtype), c.batch, c.seqlen, c.heads,
                c.kv_heads, c.hdim, c.causal ? " causal" : "");
  if (!attnkit::cuda::attention_supports(o.dtype, c.hdim)) {
    std::printf("%-40s  skipped: attention_supports(%s, %d) is false\n", name, dtype_name(o.dtype), c.hdim);
    return true;
  }
  PrefillSets sets;
  try {
    sets.make(o.dtype, c, o.bwd);
  } catch (const std::exception& e) {
    cudaGetLastError();  // clear a failed allocation
    std::printf("%-40s  skipped: %s\n", name, e.what());
    return true;
  }
  const int nsets = int(sets.fwd.size());

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
    if (!case_failed(name, 40, e, failures)) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    print_device("prefill", argc, argv);
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
