// A row of head_dim = 32 * kPer channels held by one warp, lane l holding channels l + 32 j
// (j < kPer), so every load and store of the row is coalesced: its Hadamard rotation and
// its quantization, through the format code of attnkit/quant.h. Each result equals the
// sequential one of the CPU (hadamard_rotate, quantize_group) bit for bit: a butterfly is
// computed by one thread with the sequential loop's float operation, and min / max
// reductions give the same value in any order (int_scale / fp8_scale store +0 for -0).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "attnkit/quant.h"

namespace attnkit::cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

// x <- H x for a row of n = 32 * kPer channels (kPer a power of two): the butterflies of
// distance h < 32 pair lanes l and l ^ h, the longer ones pair a lane's own x[j] and
// x[j + h / 32]; stages in increasing h, as hadamard_rotate.
template <int kPer>
__device__ __forceinline__ void warp_hadamard(float (&x)[kPer], int lane) {
  static_assert(kPer > 0 && (kPer & (kPer - 1)) == 0, "the rotation needs a power-of-two head_dim");
#pragma unroll
  for (int h = 1; h < 32; h <<= 1) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) x[j] = hadamard_butterfly(x[j], __shfl_xor_sync(kFullWarp, x[j], h), lane & h);
  }
#pragma unroll
  for (int h = 1; h < kPer; h <<= 1) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (j & h) continue;
      const float lower = x[j], upper = x[j + h];
      x[j] = hadamard_butterfly(lower, upper, false);
      x[j + h] = hadamard_butterfly(upper, lower, true);
    }
  }
  const float norm = hadamard_norm(32 * kPer);
#pragma unroll
  for (int j = 0; j < kPer; ++j) x[j] *= norm;
}

// x[0..n) <- H x for a row in shared memory, by one warp (n a power of two): the butterflies
// of each stage split over the lanes, the stages in increasing distance as hadamard_rotate.
__device__ __forceinline__ void warp_hadamard_shared(float* x, int n, int lane) {
  for (int h = 1; h < n; h <<= 1) {
    for (int t = lane; t < n / 2; t += 32) {
      const int c = t / h * 2 * h + t % h;
      const float lower = x[c], upper = x[c + h];
      x[c] = hadamard_butterfly(lower, upper, false);
      x[c + h] = hadamard_butterfly(upper, lower, true);
    }
    __syncwarp();
  }
  const float norm = hadamard_norm(n);
  for (int c = lane; c < n; c += 32) x[c] *= norm;
  __syncwarp();
}

// Runs fn(row) for the rows [0, rows) of this warp: one warp per row, grid-stride.
template <typename Fn>
__device__ __forceinline__ void for_each_warp_row(int64_t rows, Fn&& fn) {
  for (int64_t r = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; r < rows;
       r += int64_t(gridDim.x) * blockDim.x / 32)
    fn(r);
}

// Quantizes the warp's row x as row `row` of a quantized tensor of head_dim = 32 * kPer
// channels (docs/quantization.md: `data` head_dim / channels_per_byte bytes per row, `scale`
// and `zero` one float per group of group_size channels; zero nullptr for fp8): the bits
// quantize_group writes for each group. group_size is head_dim or 32, 64, 128, so a group
// is whole 32-channel blocks j.
template <int kPer>
__device__ __forceinline__ void warp_quantize_row(KVFormat format, int group_size, const float (&x)[kPer], int lane,
                                                  int64_t row, uint8_t* data, float* scale, float* zero) {
  const int groups = 32 * kPer / group_size;
  data += row * (32 * kPer / channels_per_byte(format));
  scale += row * groups;
  if (zero != nullptr) zero += row * groups;
  // Min, max and finiteness of each 32-channel block over the warp, then of each group over
  // its blocks (predicated loops over compile-time indices keep everything in registers).
  float block_lo[kPer], block_hi[kPer];
  bool block_finite[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    block_lo[j] = block_hi[j] = x[j];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
      block_lo[j] = fminf(block_lo[j], __shfl_xor_sync(kFullWarp, block_lo[j], m));
      block_hi[j] = fmaxf(block_hi[j], __shfl_xor_sync(kFullWarp, block_hi[j], m));
    }
    block_finite[j] = __all_sync(kFullWarp, is_finite(x[j]));
  }
  const int blocks_per_group = group_size / 32;
  const int levels = int_levels(format);
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int g = j / blocks_per_group;
    float lo = float_of(0x7f800000u), hi = -lo;
    bool finite = true;
#pragma unroll
    for (int b = 0; b < kPer; ++b) {
      if (b / blocks_per_group != g) continue;
      lo = fminf(lo, block_lo[b]);
      hi = fmaxf(hi, block_hi[b]);
      finite = finite && block_finite[b];
    }
    const bool writes_scale = lane == 0 && j % blocks_per_group == 0;
    const int channel = lane + 32 * j;
    if (format == KVFormat::kFp8E4M3) {
      const float s = fp8_scale(fmaxf(-lo, hi), finite);
      if (writes_scale) scale[g] = s;
      data[channel] = uint8_t(fp8_code(x[j], s));
      continue;
    }
    const IntScale s = int_scale(lo, hi, finite, levels);
    if (writes_scale) {
      scale[g] = s.scale;
      zero[g] = s.zero;
    }
    const uint32_t code = int_code(x[j], s, levels);
    if (format == KVFormat::kInt8) {
      data[channel] = uint8_t(code);
    } else {  // int4: the even lane packs its code (low nibble) with its odd neighbour's
      const uint32_t next = __shfl_down_sync(kFullWarp, code, 1);
      if (lane % 2 == 0) data[channel / 2] = uint8_t(code | (next << 4));
    }
  }
}

// The values of row `row` of a quantized tensor (layout as warp_quantize_row), in the
// warp's layout: the values dequantize_kv gives.
template <int kPer>
__device__ __forceinline__ void warp_dequantize_row(KVFormat format, int group_size, int64_t row,
                                                    const uint8_t* data, const float* scale, const float* zero,
                                                    int lane, float (&x)[kPer]) {
  const int groups = 32 * kPer / group_size;
  data += row * (32 * kPer / channels_per_byte(format));
  scale += row * groups;
  if (zero != nullptr) zero += row * groups;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int channel = lane + 32 * j, g = channel / group_size;
    float values[2];
    const float z = zero == nullptr ? 0.f : zero[g];
    if (format == KVFormat::kInt4) {
      dequantize_byte<KVFormat::kInt4>(data[channel / 2], scale[g], z, values);
      x[j] = values[channel % 2];
    } else if (format == KVFormat::kInt8) {
      dequantize_byte<KVFormat::kInt8>(data[channel], scale[g], z, values);
      x[j] = values[0];
    } else {
      dequantize_byte<KVFormat::kFp8E4M3>(data[channel], scale[g], z, values);
      x[j] = values[0];
    }
  }
}

// Runs fn(std::integral_constant<int, head_dim / 32>) for head_dim 32 .. 256, a multiple
// of 32 (the bindings check it; a power of two where the row is rotated, so fn instantiates
// warp_hadamard under `if constexpr (is_power_of_two(per()))`).
template <typename Fn>
void dispatch_channels_per_lane(int head_dim, Fn&& fn) {
  if (head_dim % 32 != 0) throw std::invalid_argument("warp rows need head_dim a multiple of 32 up to 256");
  switch (head_dim / 32) {
    case 1: fn(std::integral_constant<int, 1>{}); return;
    case 2: fn(std::integral_constant<int, 2>{}); return;
    case 3: fn(std::integral_constant<int, 3>{}); return;
    case 4: fn(std::integral_constant<int, 4>{}); return;
    case 5: fn(std::integral_constant<int, 5>{}); return;
    case 6: fn(std::integral_constant<int, 6>{}); return;
    case 7: fn(std::integral_constant<int, 7>{}); return;
    case 8: fn(std::integral_constant<int, 8>{}); return;
  }
  throw std::invalid_argument("warp rows need head_dim a multiple of 32 up to 256");
}

}  // namespace attnkit::cuda
