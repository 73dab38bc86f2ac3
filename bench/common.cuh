// Pieces shared by the torch-free CUDA microbenchmarks (bench/*.cu): device buffers,
// random normal fills, non-finite scans, CUDA-event timing, and the device ceilings (a
// cuBLAS matmul for TFLOP/s, a device-to-device copy for GB/s). docs/benchmarking.md.
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
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnkit/dtype.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"

namespace attnkit::bench {

using attnkit::DType;
using attnkit::cuda::check;

inline const char* dtype_name(DType d) { return d == DType::kBFloat16 ? "bf16" : "fp16"; }
inline size_t elem_size(DType) { return 2; }


// Standard normal values from a counter hash (Box-Muller), rounded to the storage type.
__device__ __forceinline__ uint32_t hash32(uint64_t x) {
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
