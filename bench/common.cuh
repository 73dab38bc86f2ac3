// Pieces shared by the torch-free CUDA microbenchmarks (bench/*.cu): argument parsing, a host
// RNG, device buffers, random normal fills, non-finite scans, CUDA-event timing, the naive
// fp32 reference of sampled rows, and the device ceilings (a cuBLAS matmul for TFLOP/s, a
// device-to-device copy for GB/s). docs/benchmarking.md.
#pragma once

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
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnkit/dtype.h"
#include "attnkit/params.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"

namespace attnkit::bench {

using attnkit::DType;
using attnkit::cuda::check;

inline const char* dtype_name(DType d) { return d == DType::kBFloat16 ? "bf16" : "fp16"; }
inline size_t elem_size(DType) { return 2; }

// "a,b,c" -> {"a", "b", "c"}.
inline std::vector<std::string> split(const std::string& list) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos <= list.size();) {
    size_t comma = list.find(',', pos);
    if (comma == std::string::npos) comma = list.size();
    out.push_back(list.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

// The value of `flag`: a positive int of at most 2^20, else usage(why, 2), which must not
// return (the bench's usage printer).
inline int to_int(const std::string& s, const char* flag, void (*usage)(const char* why, int code)) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (end == s.c_str() || *end != '\0' || v <= 0 || v > (1L << 20)) {
    usage((std::string("bad value for ") + flag).c_str(), 2);
    std::abort();  // usage returned
  }
  return int(v);
}

// The value of --dtype: bf16 or fp16 (the CUDA kernels take no fp32), else usage(why, 2).
inline DType dtype_arg(const std::string& v, void (*usage)(const char* why, int code)) {
  if (v == "bf16" || v == "bfloat16") return DType::kBFloat16;
  if (v == "fp16" || v == "float16" || v == "half") return DType::kFloat16;
  usage("--dtype takes bf16 or fp16 (the CUDA kernels take no fp32)", 2);
  std::abort();  // usage returned
}

// Prints "attnkit bench/<bench> on <device> (...)" and "command: <argv>" (no newline after
// it); returns the device.
inline int print_device(const char* bench, int argc, char** argv) {
  int dev = 0, clock_khz = 0;
  cudaDeviceProp prop{};
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev);
  std::printf("attnkit bench/%s on %s (sm_%d%d, %d SMs, %.0f MHz, L2 %d MiB)\ncommand:", bench, prop.name, prop.major,
              prop.minor, prop.multiProcessorCount, clock_khz / 1e3, prop.l2CacheSize >> 20);
  for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
  return dev;
}

// After a case threw: prints "<name>  FAILED: <what>" (name padded to `width`), counts the
// failure, and says whether the device is still usable (a launch error leaves the context
// usable; a sticky device error does not).
inline bool case_failed(const char* name, int width, const std::exception& e, int& failures) {
  std::printf("%-*s  FAILED: %s\n", width, name, e.what());
  std::fflush(stdout);
  ++failures;
  return cudaDeviceSynchronize() == cudaSuccess;
}

// A small deterministic host RNG (64-bit LCG, the top 31 bits out).
struct Lcg {
  uint64_t state;
  explicit Lcg(uint64_t seed) : state(seed) {}
  int below(int mod) {  // uniform enough in [0, mod), mod > 0
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return int((state >> 33) % uint64_t(mod));
  }
};

// Input sets to rotate through so that together they exceed 3x the L2 (at most 4).
inline int input_sets(size_t set_bytes) {
  int l2 = 0, dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
  return int(std::min<size_t>(4, std::max<size_t>(1, (3 * size_t(l2) + set_bytes - 1) / set_bytes)));
}


// Standard normal values from a counter hash (Box-Muller), rounded to the storage type.
__host__ __device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return uint32_t(x);
}

template <typename T>
__global__ void fill_normal(T* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u1 = (hash32(seed * 0x9e3779b97f4a7c15ULL + 2 * i) + 1.0f) * 2.3283064e-10f;  // (0, 1]
    const float u2 = hash32(seed * 0x9e3779b97f4a7c15ULL + 2 * i + 1) * 2.3283064e-10f;
    p[i] = attnkit::cuda::from_float<T>(sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

template <typename T>
__global__ void count_nonfinite(const T* p, int64_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    local += !isfinite(attnkit::cuda::to_float(p[i]));
  if (local) atomicAdd(count, local);
}

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { check(cudaMalloc(&ptr, std::max<size_t>(bytes, 16)), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void> T* as() const { return static_cast<T*>(ptr); }
};

// Owns the device buffers of a benchmark's rotated input sets.
struct DeviceArena {
  std::vector<std::unique_ptr<DeviceBuffer>> owned;
  void* alloc(size_t bytes) {
    owned.push_back(std::make_unique<DeviceBuffer>(bytes));
    return owned.back()->ptr;
  }
};

// Max (is_max) or sum of x over the block, through `red` (blockDim.x floats of shared
// memory, blockDim.x a power of two); every thread gets the result. For reference kernels.
__device__ inline float block_reduce(float x, bool is_max, float* red) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w)
      red[threadIdx.x] = is_max ? fmaxf(red[threadIdx.x], red[threadIdx.x + w]) : red[threadIdx.x] + red[threadIdx.x + w];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

// The sampled row of block blockIdx.x (rows: 3 ints (batch, q head, query) per block) of
// params p (AttentionParams or NeighborhoodParams): its q row and its kv head's k and v.
template <typename T>
struct SampledRow {
  int b, h, i;
  const T *q, *k, *v;
  template <typename P>
  __device__ SampledRow(const P& p, const int* rows)
      : b(rows[3 * blockIdx.x]), h(rows[3 * blockIdx.x + 1]), i(rows[3 * blockIdx.x + 2]) {
    const int hk = h / (p.heads_q / p.heads_kv);
    q = static_cast<const T*>(p.q) + b * p.q_strides.batch + i * p.q_strides.row + h * p.q_strides.head;
    k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
    v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  }
};

// The naive fp32 reference of one attention row, run by a whole block of kThreads threads (a
// power of two): q (head_dim contiguous values) against `count` keys, the n-th of them row
// key_of(n) of k / v (rows k_row / v_row elements apart). Writes out[0, d) and *lse; a row
// of no keys gives out 0 and lse -inf. softcap 0: off.
template <typename T, int kThreads, int kMaxHdim, typename KeyOf>
__device__ void reference_row(const T* q, const T* k, int64_t k_row, const T* v, int64_t v_row, int d, float scale,
                              float softcap, int64_t count, KeyOf key_of, float* out, float* lse) {
  using attnkit::cuda::to_float;
  __shared__ float qs[kMaxHdim], acc[kMaxHdim], red[kThreads];
  for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = to_float(q[c]), acc[c] = 0.0f;
  __syncthreads();
  const auto score = [&](int64_t j) {
    const T* kr = k + j * k_row;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s += qs[c] * to_float(kr[c]);
    s *= scale;
    return softcap > 0.0f ? softcap * tanhf(s / softcap) : s;
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
    for (int c = 0; c < d; ++c) part[c] += e * to_float(v[j * v_row + c]);
  }
  sum = block_reduce(sum, false, red);
  for (int c = 0; c < d; ++c) atomicAdd(&acc[(c + threadIdx.x) % d], part[(c + threadIdx.x) % d]);
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) out[c] = sum > 0 ? acc[c] / sum : 0.0f;
  if (threadIdx.x == 0) *lse = sum > 0 ? m + logf(sum) : -INFINITY;
}

// The kernel's output and LSE of sampled (batch, head, query) rows (rows: 3 ints per block)
// of a (batch, seqlen, heads, head_dim) output and a (batch, heads, seqlen) LSE, as fp32.
template <typename T>
__global__ void gather_rows(const __grid_constant__ AttentionParams p, const int* rows, float* out, float* lse) {
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const T* o = static_cast<const T*>(p.out) + b * p.out_strides.batch + i * p.out_strides.row + h * p.out_strides.head;
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x)
    out[int64_t(blockIdx.x) * p.head_dim + c] = attnkit::cuda::to_float(o[c]);
  if (threadIdx.x == 0) lse[blockIdx.x] = p.lse[(int64_t(b) * p.heads_q + h) * p.seqlen_q + i];
}

template <typename F>
inline void for_dtype(DType dt, F&& f) {
  if (dt == DType::kBFloat16) f(__nv_bfloat16{});
  else f(__half{});
}

inline void fill(DType dt, void* p, int64_t n, uint64_t seed) {
  for_dtype(dt, [&](auto t) {
    using T = decltype(t);
    fill_normal<T><<<1024, 256>>>(static_cast<T*>(p), n, seed);
  });
  check(cudaGetLastError(), "fill_normal");
}

// A dense prefill: q, out (batch, seqlen, heads, hdim), k, v (batch, seqlen, kv_heads, hdim),
// contiguous; lse (batch, heads, seqlen).
struct PrefillShape {
  int batch, seqlen, heads, kv_heads, hdim;
  bool causal;
};

inline Strides dense_strides(int seqlen, int heads, int hdim) {
  return Strides{int64_t(seqlen) * heads * hdim, int64_t(heads) * hdim, hdim};
}

// The rotated input sets of a dense prefill, filled as the bindings fill the params: per set
// q, k, v (random normal), out and lse and, with bwd, dout (random normal), dq, dk, dv and the
// fp32 scratch dq_accum and delta; as many sets as input_sets gives for q, k, v read and out
// written. make() throws when they do not fit (cudaMalloc).
struct PrefillSets : DeviceArena {
  std::vector<AttentionParams> fwd;
  std::vector<AttentionBwdParams> bwd;

  void make(DType dtype, const PrefillShape& c, bool with_bwd) {
    const int64_t n_q = int64_t(c.batch) * c.seqlen * c.heads * c.hdim;
    const int64_t n_kv = int64_t(c.batch) * c.seqlen * c.kv_heads * c.hdim;
    const int64_t n_lse = int64_t(c.batch) * c.heads * c.seqlen;
    const size_t es = elem_size(dtype);
    const int nsets = input_sets((2 * n_q + 2 * n_kv) * es);
    for (int s = 0; s < nsets; ++s) {
      AttentionParams p{};
      p.dtype = dtype;
      p.q = alloc(n_q * es);
      p.k = alloc(n_kv * es);
      p.v = alloc(n_kv * es);
      p.out = alloc(n_q * es);
      p.lse = static_cast<float*>(alloc(n_lse * 4));
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
      fill(dtype, const_cast<void*>(p.q), n_q, 3 * s + 1);
      fill(dtype, const_cast<void*>(p.k), n_kv, 3 * s + 2);
      fill(dtype, const_cast<void*>(p.v), n_kv, 3 * s + 3);
      fwd.push_back(p);
      if (!with_bwd) continue;
      AttentionBwdParams bp{};
      bp.fwd = p;
      bp.dout = alloc(n_q * es);
      bp.dq = alloc(n_q * es);
      bp.dk = alloc(n_kv * es);
      bp.dv = alloc(n_kv * es);
      bp.dout_strides = bp.dq_strides = p.q_strides;
      bp.dk_strides = bp.dv_strides = p.k_strides;
      bp.dq_accum = static_cast<float*>(alloc(n_q * 4));
      bp.dq_accum_strides = p.q_strides;
      bp.delta = static_cast<float*>(alloc(n_lse * 4));
      fill(dtype, const_cast<void*>(bp.dout), n_q, 1000 + s);
      bwd.push_back(bp);
    }
  }
};

// Timing

struct Stat {
  double median = 0, lo = 0, hi = 0;
};

// Times fn(i) (i = the call's index, for rotating input sets): warm-up calls, then a pair
// of CUDA events around each of `iters` calls.
template <typename F>
Stat time_calls(F&& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn(i);
  check(cudaDeviceSynchronize(), "warm-up");
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto& e : ev) check(cudaEventCreate(&e), "cudaEventCreate");
  for (int i = 0; i < iters; ++i) {
    check(cudaEventRecord(ev[2 * i]), "cudaEventRecord");
    fn(i);
    check(cudaEventRecord(ev[2 * i + 1]), "cudaEventRecord");
  }
  check(cudaDeviceSynchronize(), "timed calls");
  std::vector<double> ms(iters);
  for (int i = 0; i < iters; ++i) {
    float t = 0;
    check(cudaEventElapsedTime(&t, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    ms[i] = t;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  Stat s;
  s.lo = ms.front();
  s.hi = ms.back();
  s.median = iters % 2 ? ms[iters / 2] : 0.5 * (ms[iters / 2 - 1] + ms[iters / 2]);
  return s;
}

// The matmul ceiling: TFLOP/s of an n^3 cublasGemmEx in the benchmark's dtype, fp32
// accumulation, random inputs. 0 when built without cuBLAS.
inline double measure_matmul_tflops(DType dt, std::string& desc) {
#ifdef ATTNKIT_BENCH_CUBLAS
  const int n = 8192;
  DeviceBuffer a(size_t(n) * n * 2), b(size_t(n) * n * 2), c(size_t(n) * n * 2);
  fill(dt, a.ptr, int64_t(n) * n, 101);
  fill(dt, b.ptr, int64_t(n) * n, 102);
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
  const cudaDataType_t t = dt == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.0f, beta = 0.0f;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  auto gemm = [&](int) {
    const cublasStatus_t s = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.ptr, t, n, b.ptr, t,
                                          n, &beta, c.ptr, t, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) status = s;
  };
  const Stat s = time_calls(gemm, 3, 10);
  cublasDestroy(handle);
  if (status != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasGemmEx failed: status " + std::to_string(int(status)));
  char buf[160];
  std::snprintf(buf, sizeof buf, "cublasGemmEx %s %d^3, fp32 accumulation, median %.3f ms of 10", dtype_name(dt), n,
                s.median);
  desc = buf;
  return 2.0 * n * double(n) * n / (s.median * 1e-3) / 1e12;
#else
  (void)dt;
  desc = "not measured (built without cuBLAS)";
  return 0.0;
#endif
}

// The verdict of a sampled-rows check: nrows x head_dim outputs and nrows LSEs of the kernel
// (got_*) against a reference kernel (ref_*), all fp32 device buffers, plus a device count of
// non-finite output elements. "ok (...)" or "FAILED (...)"; bf16 output rounding alone gives
// ~3e-3, the Python tests' budget is 2e-2.
inline std::string rows_verdict(const DeviceBuffer& ref_out, const DeviceBuffer& got_out, const DeviceBuffer& ref_lse,
                                const DeviceBuffer& got_lse, const DeviceBuffer& nonfinite_count, int nrows,
                                int head_dim) {
  std::vector<float> ro(size_t(nrows) * head_dim), go(ro.size()), rl(nrows), gl(nrows);
  unsigned long long nonfinite = 0;
  check(cudaMemcpy(ro.data(), ref_out.ptr, ro.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaMemcpy(go.data(), got_out.ptr, go.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaMemcpy(rl.data(), ref_lse.ptr, nrows * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaMemcpy(gl.data(), got_lse.ptr, nrows * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaMemcpy(&nonfinite, nonfinite_count.ptr, sizeof nonfinite, cudaMemcpyDeviceToHost), "cudaMemcpy");
  double num = 0, den = 0, lse_err = 0;
  for (size_t i = 0; i < ro.size(); ++i) {
    num += double(go[i] - ro[i]) * (go[i] - ro[i]);
    den += double(ro[i]) * ro[i];
  }
  for (int r = 0; r < nrows; ++r)
    lse_err = std::max(lse_err, std::isinf(rl[r]) ? (gl[r] == rl[r] ? 0.0 : INFINITY) : std::fabs(double(gl[r]) - rl[r]));
  const double rel = std::sqrt(num / std::max(den, 1e-300));
  const bool ok = nonfinite == 0 && rel < 2e-2 && lse_err < 1e-2;
  char text[160];
  std::snprintf(text, sizeof text, "%s (%d rows: out rel err %.1e, lse abs err %.1e; %llu non-finite)",
                ok ? "ok" : "FAILED", nrows, rel, lse_err, nonfinite);
  return text;
}

// The device side of a sampled-rows check: the rows (ints, uploaded), fp32 buffers for the
// reference's and the kernel's nrows x head_dim outputs and LSEs, and a non-finite counter.
// Launch the reference / gather / count kernels on them, then verdict().
struct SampledRows {
  int nrows, head_dim;
  DeviceBuffer rows, ref_out, got_out, ref_lse, got_lse, nonfinite;
  SampledRows(const std::vector<int>& host_rows, int nrows_, int head_dim_)
      : nrows(nrows_), head_dim(head_dim_), rows(host_rows.size() * sizeof(int)),
        ref_out(size_t(nrows_) * head_dim_ * 4), got_out(size_t(nrows_) * head_dim_ * 4), ref_lse(nrows_ * 4),
        got_lse(nrows_ * 4), nonfinite(sizeof(unsigned long long)) {
    check(cudaMemcpy(rows.ptr, host_rows.data(), host_rows.size() * sizeof(int), cudaMemcpyHostToDevice), "cudaMemcpy");
    check(cudaMemset(nonfinite.ptr, 0, sizeof(unsigned long long)), "cudaMemset");
  }
  std::string verdict() const {
    check(cudaGetLastError(), "check kernels");
    return rows_verdict(ref_out, got_out, ref_lse, got_lse, nonfinite, nrows, head_dim);
  }
  // For a dense (batch, seqlen, heads, head_dim) output p.out and lse p.lse: launches
  // launch_reference(T{}) (the bench's reference kernel into ref_out / ref_lse), gathers the
  // kernel's rows (gather_rows), scans the whole output, then verdict().
  template <typename LaunchReference>
  std::string check_rows(const AttentionParams& p, LaunchReference&& launch_reference) {
    const int64_t n_out = int64_t(p.batch) * p.seqlen_q * p.heads_q * p.head_dim;
    for_dtype(p.dtype, [&](auto t) {
      using T = decltype(t);
      launch_reference(t);
      gather_rows<T><<<nrows, 128>>>(p, rows.as<int>(), got_out.as<float>(), got_lse.as<float>());
      count_nonfinite<T><<<1024, 256>>>(static_cast<const T*>(p.out), n_out, nonfinite.as<unsigned long long>());
    });
    return verdict();
  }
};

// The copy ceiling: GB/s (bytes read + bytes written) of a large device-to-device copy.
inline double measure_copy_gbps(std::string& desc) {
  const size_t bytes = size_t(1) << 30;
  DeviceBuffer a(bytes), b(bytes);
  check(cudaMemset(a.ptr, 1, bytes), "cudaMemset");
  const Stat s = time_calls([&](int) { check(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice), "copy"); },
                            3, 10);
  char text[160];
  std::snprintf(text, sizeof text, "cudaMemcpy device-to-device of 1 GiB, median %.3f ms of 10", s.median);
  desc = text;
  return 2.0 * double(bytes) / (s.median * 1e-3) / 1e9;
}

}  // namespace attnkit::bench
