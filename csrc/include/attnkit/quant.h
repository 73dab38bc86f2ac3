// Quantized KV formats (docs/quantization.md, byte for byte): int8 and int4 asymmetric with
// a float32 scale and zero per group of channels, fp8 e4m3 with a float32 scale per row.
// Encoding a group and decoding one byte or 16 loaded bytes are written once here, in
// integer and IEEE float code that gives the same bits on the host and the device (no
// cuda_fp8.h, no fast-math intrinsics, explicit fmaf), so the CPU kernels and their tests
// check exactly what the CUDA kernels compute.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include "attnkit/macros.h"

namespace attnkit {

enum class KVFormat : int { kInt8 = 0, kInt4 = 1, kFp8E4M3 = 2 };

// Channels stored per byte of data: two int4 codes (low nibble first), else one.
ATTNKIT_HD int channels_per_byte(KVFormat format) { return format == KVFormat::kInt4 ? 2 : 1; }

// Codes of the integer formats are 0..int_levels: value = code * scale + zero.
ATTNKIT_HD int int_levels(KVFormat format) { return format == KVFormat::kInt4 ? 15 : 255; }

ATTNKIT_HD uint32_t bits_of(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

ATTNKIT_HD float float_of(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

ATTNKIT_HD bool is_finite(float x) { return (bits_of(x) & 0x7f800000u) != 0x7f800000u; }

constexpr uint32_t kQuietNaN = 0x7fc00000u;

// ---- int8 / int4 ------------------------------------------------------------------------

struct IntScale {
  float scale;  // (max - min) / levels; 0 for a constant group, NaN for a non-finite one
  float zero;   // the group's min (+0 for -0)
};

// Scale and zero of a group from its min, max and whether all its elements are finite.
ATTNKIT_HD IntScale int_scale(float lo, float hi, bool finite, int levels) {
  if (!finite) return {float_of(kQuietNaN), float_of(kQuietNaN)};
  // -0 and +0 compare equal, so which one a min reduction returns depends on the order it
  // saw them: store +0 so every reduction order (CPU, CUDA's warp-parallel one) gives the
  // same bits.
  // The same for hi (a max reduction may return -0 or +0 too).
  return {((hi == 0.0f ? 0.0f : hi) - lo) / float(levels), lo == 0.0f ? 0.0f : lo};
}

// Nearest code, ties to even. x >= zero, so only the top needs a clamp (the rounded
// division may exceed levels by an ulp). Constant (scale 0) and non-finite
// (scale NaN) groups store code 0.
ATTNKIT_HD uint32_t int_code(float x, IntScale s, int levels) {
  if (!(s.scale > 0.0f)) return 0;
  return uint32_t(fminf(rintf((x - s.zero) / s.scale), float(levels)));
}

ATTNKIT_HD float int_value(uint32_t code, IntScale s) { return fmaf(float(code), s.scale, s.zero); }

// Byte i (0..3) of w as the float 2^23 + byte (bits 0x4B0000bb); subtracting 2^23 then
// gives the code exactly: one PRMT and one FADD per element on the GPU, no I2F.
ATTNKIT_HD float byte_as_float(uint32_t w, int i) {
#ifdef __CUDA_ARCH__
  const uint32_t magic = __byte_perm(w, 0x4B000000u, 0x7440u | uint32_t(i));
#else
  const uint32_t magic = 0x4B000000u | ((w >> (8 * i)) & 0xffu);
#endif
  return float_of(magic) - 8388608.0f;
}

// ---- fp8 e4m3 (OCP e4m3fn: bias 7, no infinities, S.1111.111 = NaN, max 448) -------------

constexpr float kFp8Max = 448.0f;

// Nearest e4m3 value, ties to even; |v| >= 448 (inf included) saturates to +-448, NaN stays NaN.
ATTNKIT_HD uint32_t float_to_e4m3(float v) {
  const uint32_t u = bits_of(v);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;
  if (a >= 0x43e00000u) return sign | 0x7eu;  // >= 448
  if (a >= 0x3c800000u) {  // >= 2^-6, a normal e4m3: keep 3 mantissa bits, round half to even
    const uint32_t rounded = a + 0x7ffffu + ((a >> 20) & 1u);
    return sign | ((rounded >> 20) - (120u << 3));  // rebias the exponent 127 -> 7
  }
  // Subnormal e4m3 (multiples of 2^-9): a * 512 is exact, rintf rounds half to even; 8
  // (rounded up to 2^-6) is the bit pattern of the smallest normal, as it should be.
  return sign | uint32_t(rintf(float_of(a) * 512.0f));
}

// The e4m3 value of code bits b (0..255) as a float, exactly.
ATTNKIT_HD float e4m3_to_float(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t exponent = (b >> 3) & 0xfu, mantissa = b & 7u;
  if (exponent == 15u && mantissa == 7u) return float_of(sign | kQuietNaN);
  if (exponent == 0u) return float_of(sign | bits_of(float(mantissa) * 0.001953125f));  // m * 2^-9
  return float_of(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Scale of a row: amax / 448, so the largest element maps to 448; NaN for a non-finite row.
// (An amax of -0, which a max reduction may return, is stored as +0.)
ATTNKIT_HD float fp8_scale(float amax, bool finite) {
  return finite ? (amax == 0.0f ? 0.0f : amax) / kFp8Max : float_of(kQuietNaN);
}

// Code of x in a row of scale s. A row of zeros (s == 0) keeps the sign of each zero; a
// non-finite row (s NaN) stores code 0.
ATTNKIT_HD uint32_t fp8_code(float x, float s) {
  if (s > 0.0f) return float_to_e4m3(x / s);
  return s == 0.0f ? float_to_e4m3(x) : 0u;
}

ATTNKIT_HD float fp8_value(uint32_t code, float s) { return e4m3_to_float(code) * s; }

// ---- rotated keys --------------------------------------------------------------------------
// A cache may store H k instead of k, H the orthonormal Hadamard matrix of size head_dim (a
// power of two): H is symmetric and H H = I, so (H q) . (H k) = q . k, and decode rotates
// its queries instead of un-rotating keys. The rotation spreads K's few outlier channels
// over all channels, so one int4 step per row fits every channel (docs/quantization.md).

ATTNKIT_HD constexpr bool is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

// One butterfly of the fast Walsh-Hadamard transform on the pair (x[c], x[c + h]): the lower
// element becomes x[c] + x[c + h], the upper x[c] - x[c + h]. `mine` is this element,
// `partner` the other: a thread holding either element computes its own result with the
// same float operation as the sequential loop, so every parallel split gives the same bits.
ATTNKIT_HD float hadamard_butterfly(float mine, float partner, bool upper) { return upper ? partner - mine : mine + partner; }

// 1 / sqrt(n) for n a power of two, as the same float on host and device: 2^-k, times the
// float nearest 1 / sqrt(2) for odd log2(n).
ATTNKIT_HD float hadamard_norm(int n) {
  int log2n = 0;
  while ((1 << log2n) < n) ++log2n;
  const float half_power = float_of(uint32_t(127 - log2n / 2) << 23);
  return log2n % 2 ? half_power * 0.70710678118654752f : half_power;
}

// x[0..n) <- H x in place (n a power of two): log2(n) butterfly stages (h = 1, 2, 4, ...),
// then one multiplication by hadamard_norm(n).
ATTNKIT_HD void hadamard_rotate(float* x, int n) {
  for (int h = 1; h < n; h <<= 1) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int c = i; c < i + h; ++c) {
        const float lower = x[c], upper = x[c + h];
        x[c] = hadamard_butterfly(lower, upper, false);
        x[c + h] = hadamard_butterfly(upper, lower, true);
      }
    }
  }
  const float norm = hadamard_norm(n);
  for (int c = 0; c < n; ++c) x[c] *= norm;
}

// ---- a group: quantize, and dequantize one byte or 16 loaded bytes ----------------------

// Quantizes the n channels x(0..n-1) of one group (n even for int4) into data (n /
// channels_per_byte bytes) and *scale, *zero (zero is not written for fp8: may be null). `x` is any callable
// returning element i as a float; the group is read twice (min / max, then codes).
template <typename Load>
ATTNKIT_HD void quantize_group(KVFormat format, const Load& x, int n, uint8_t* data, float* scale, float* zero) {
  bool finite = true;
  float lo = float_of(0x7f800000u), hi = -lo;
  for (int i = 0; i < n; ++i) {
    const float v = x(i);
    finite = finite && is_finite(v);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  if (format == KVFormat::kFp8E4M3) {
    const float s = fp8_scale(fmaxf(-lo, hi), finite);
    *scale = s;
    for (int i = 0; i < n; ++i) data[i] = uint8_t(fp8_code(x(i), s));
    return;
  }
  const int levels = int_levels(format);
  const IntScale s = int_scale(lo, hi, finite, levels);
  *scale = s.scale;
  *zero = s.zero;
  if (format == KVFormat::kInt8) {
    for (int i = 0; i < n; ++i) data[i] = uint8_t(int_code(x(i), s, levels));
  } else {
    for (int i = 0; i < n; i += 2)
      data[i / 2] = uint8_t(int_code(x(i), s, levels) | (int_code(x(i + 1), s, levels) << 4));
  }
}

// Values of the channels in byte b of a group: 1 (int8, fp8) or 2 (int4, low nibble first).
template <KVFormat F>
ATTNKIT_HD void dequantize_byte(uint32_t b, float scale, float zero, float* out) {
  if constexpr (F == KVFormat::kFp8E4M3) {
    out[0] = fp8_value(b, scale);
  } else if constexpr (F == KVFormat::kInt8) {
    out[0] = int_value(b, {scale, zero});
  } else {
    out[0] = int_value(b & 0xfu, {scale, zero});
    out[1] = int_value(b >> 4, {scale, zero});
  }
}

// Values of the channels of kWords little-endian words w[0..kWords-1] of one group (4 int8 /
// fp8 or 8 int4 channels per word), in channel order. Per word: int8: 4 PRMT + 4 FADD + 4
// FFMA; int4: 2 LOP3 + 1 SHF + 8 PRMT + 8 FADD + 8 FFMA (the nibble masks put channels
// 0,2,4,6 of a word in the bytes of `even`, 1,3,5,7 in `odd`).
template <KVFormat F, int kWords>
ATTNKIT_HD void dequantize_words(const uint32_t* w, float scale, float zero, float* out) {
  for (int k = 0; k < kWords; ++k) {
    if constexpr (F == KVFormat::kFp8E4M3) {
      for (int i = 0; i < 4; ++i) out[4 * k + i] = fp8_value((w[k] >> (8 * i)) & 0xffu, scale);
    } else if constexpr (F == KVFormat::kInt8) {
      for (int i = 0; i < 4; ++i) out[4 * k + i] = fmaf(byte_as_float(w[k], i), scale, zero);
    } else {
      const uint32_t even = w[k] & 0x0f0f0f0fu, odd = (w[k] >> 4) & 0x0f0f0f0fu;
      for (int i = 0; i < 4; ++i) {
        out[8 * k + 2 * i] = fmaf(byte_as_float(even, i), scale, zero);
        out[8 * k + 2 * i + 1] = fmaf(byte_as_float(odd, i), scale, zero);
      }
    }
  }
}

// Values of the 16 (int8, fp8) or 32 (int4) channels of 16 bytes of one group, loaded as
// four words. Groups are >= 32 channels and start on a multiple of 32, so 16 aligned bytes
// never straddle two groups.
template <KVFormat F>
ATTNKIT_HD void dequantize_16_bytes(const uint32_t w[4], float scale, float zero, float* out) {
  dequantize_words<F, 4>(w, scale, zero, out);
}

// ---- rows of a quantized KV cache ------------------------------------------------------

// Words holding 8 channels (a chunk of the decode kernels): 2 of int8 / fp8, 1 of int4.
template <KVFormat F>
constexpr int kWordsPer8Channels = F == KVFormat::kInt4 ? 1 : 2;

// The rows (one per token and kv head) of a quantized cache, each in the layout of
// docs/quantization.md: head_dim / channels_per_byte bytes of data and one float32 scale
// (and zero, int formats) per group of group_size channels, all three arrays contiguous and
// indexed by the same row number, so one row index (from the block table) addresses all
// three. `data == nullptr`: the cache is not quantized.
struct QuantizedRows {
  KVFormat format = KVFormat::kInt8;
  const uint8_t* data = nullptr;
  const float* scale = nullptr;
  const float* zero = nullptr;  // nullptr for fp8
  int head_dim = 0;
  int group_size = 0;  // channels per group (head_dim for one group per row)
  bool rotated = false;  // rows hold H x (keys only: readers rotate their queries)

  ATTNKIT_HD int row_bytes() const { return head_dim / channels_per_byte(format); }
  ATTNKIT_HD int groups() const { return head_dim / group_size; }
  // First byte of `channel` in row `row` (channel even for int4).
  ATTNKIT_HD const uint8_t* codes(int64_t row, int channel) const {
    return data + row * row_bytes() + channel / channels_per_byte(format);
  }
  ATTNKIT_HD int64_t group_of(int64_t row, int channel) const { return row * groups() + channel / group_size; }
  // The group of channel c within its row is c >> group_shift(), a shift for the kernels'
  // inner loops: groups of 32, 64 or 128 channels, or one per row (30: group 0 for every
  // channel of the row, also where the kernels pad head_dim; those columns are zero in q and
  // never stored from V).
  ATTNKIT_HD int group_shift() const {
    if (group_size == head_dim) return 30;
    int shift = 0;
    while ((1 << shift) < group_size) ++shift;
    return shift;
  }
  ATTNKIT_HD float scale_at(int64_t row, int channel) const { return scale[group_of(row, channel)]; }
  ATTNKIT_HD float zero_at(int64_t row, int channel) const {
    return zero == nullptr ? 0.0f : zero[group_of(row, channel)];
  }
};

}  // namespace attnkit
