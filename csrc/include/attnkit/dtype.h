// Storage types and float conversions for fp16 / bf16 on the host, torch-free.
// CUDA code uses the CUDA types (__half, __nv_bfloat16) for the same bits.
#pragma once

#include <cstdint>
#include <cstring>

namespace attnkit {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu;
  uint32_t mantissa = x.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1fu) {  // inf / nan
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // zero
    u = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400u)) { mantissa <<= 1; --exponent; }
    u = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> T from_float(float f);

template <> inline float from_float<float>(float f) { return f; }

// Round to nearest even, NaN kept quiet.
template <> inline BFloat16 from_float<BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}

// Round to nearest even, with subnormals, overflow to inf, NaN kept.
template <> inline Half from_float<Half>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};
  if (u >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (u < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (u < 0x33000000u) return {sign};  // below half of the smallest subnormal
    const uint32_t exponent = u >> 23;
    const uint32_t mantissa = (u & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 + 23 - 10 + 1 - ... aligns to 2^-24 units
    const uint32_t kept = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t half_way = 1u << (shift - 1u);
    uint32_t rounded = kept + ((rest > half_way || (rest == half_way && (kept & 1u))) ? 1u : 0u);
    return {uint16_t(sign | rounded)};
  }
  u += 0x0fffu + ((u >> 13) & 1u);  // round mantissa to 10 bits
  return {uint16_t(sign | (((u >> 23) - 112u) << 10) | ((u >> 13) & 0x3ffu))};
}

}  // namespace attnkit
