// Unit tests of the quantized KV formats in attnkit/quant.h, the code both the CPU and the
// CUDA kernels run: the e4m3 decoding of all 256 bytes against a formula written from the
// OCP definition, e4m3 encoding against a brute-force nearest search, the int8 / int4
// round-trip bound and edge values, the 16-byte decoding against the byte-wise one, and the
// Hadamard rotation of rotated keys (and the orders the CUDA kernels split it in).
// Run by ctest; exits non-zero on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "attnkit/quant.h"
#include "expect.h"

namespace {

using attnkit::KVFormat;

// OCP e4m3fn: S.EEEE.MMM, bias 7, subnormals m/8 * 2^-6, S.1111.111 = NaN, no infinities.
double e4m3_formula(int b) {
  const int sign = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return sign ? -mag : mag;
}

bool same_bits(float a, float b) { return attnkit::bits_of(a) == attnkit::bits_of(b); }

void test_fp8_decode_all_bytes() {
  for (int b = 0; b < 256; ++b) {
    const double want = e4m3_formula(b);
    const float got = attnkit::e4m3_to_float(uint32_t(b));
    if (std::isnan(want)) {
      EXPECT(std::isnan(got), "byte 0x%02x: got %g, want NaN", b, got);
    } else {
      EXPECT(double(got) == want && std::signbit(got) == std::signbit(want), "byte 0x%02x: got %g, want %g", b, got,
             want);
      // Every value decodes and re-encodes to its own byte (-0 included).
      EXPECT(attnkit::float_to_e4m3(got) == uint32_t(b), "byte 0x%02x re-encodes to 0x%02x", b,
             attnkit::float_to_e4m3(got));
    }
  }
}

// The byte nearest to v among the finite e4m3 values, ties to the even code, |v| >= 448
// saturating to +-448.
uint32_t e4m3_nearest(float v) {
  const uint32_t sign = std::signbit(v) ? 0x80u : 0u;
  const double a = std::fabs(double(v));
  if (a >= 448.0) return sign | 0x7eu;
  uint32_t best = 0;
  double best_err = INFINITY;
  for (uint32_t b = 0; b < 0x7f; ++b) {
    const double err = std::fabs(e4m3_formula(int(b)) - a);
    if (err < best_err || (err == best_err && (b & 1u) == 0)) {
      best = b;
      best_err = err;
    }
  }
  return sign | best;
}

void test_fp8_encode() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exponent(-14.0f, 9.5f);
  for (int i = 0; i < 200000; ++i) {
    const float v = (rng() & 1 ? -1.0f : 1.0f) * std::exp2(exponent(rng));
    EXPECT(attnkit::float_to_e4m3(v) == e4m3_nearest(v), "v = %.9g: got 0x%02x, want 0x%02x", v,
           attnkit::float_to_e4m3(v), e4m3_nearest(v));
  }
  // Half-way points between neighbours go to the even code; just off them, to the nearer.
  for (uint32_t b = 0; b < 0x7e; ++b) {
    const float lo = attnkit::e4m3_to_float(b), hi = attnkit::e4m3_to_float(b + 1);
    const float mid = 0.5f * (lo + hi);
    EXPECT(attnkit::float_to_e4m3(mid) == ((b & 1u) ? b + 1 : b), "midpoint after 0x%02x -> 0x%02x", b,
           attnkit::float_to_e4m3(mid));
    EXPECT(attnkit::float_to_e4m3(std::nextafter(mid, 0.0f)) == b, "below midpoint after 0x%02x", b);
    EXPECT(attnkit::float_to_e4m3(std::nextafter(mid, 1e9f)) == b + 1, "above midpoint after 0x%02x", b);
    EXPECT(attnkit::float_to_e4m3(-mid) == (0x80u | attnkit::float_to_e4m3(mid)), "sign of -midpoint 0x%02x", b);
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {448.0f, 449.0f, 464.0f, 479.0f, 480.0f, 1e30f, inf})
    EXPECT(attnkit::float_to_e4m3(v) == 0x7eu && attnkit::float_to_e4m3(-v) == 0xfeu, "saturation of %g", v);
  EXPECT((attnkit::float_to_e4m3(std::nanf("")) & 0x7fu) == 0x7fu, "NaN encodes to NaN");
  EXPECT(attnkit::float_to_e4m3(0.0f) == 0x00u && attnkit::float_to_e4m3(-0.0f) == 0x80u, "signed zeros");
  EXPECT(attnkit::float_to_e4m3(1e-45f) == 0x00u, "fp32 subnormal rounds to 0");
}

struct Quantized {
  std::vector<uint8_t> data;
  float scale = 0, zero = 0;
};

Quantized quantize(KVFormat format, const std::vector<float>& x) {
  Quantized q;
  q.data.resize(x.size() / attnkit::channels_per_byte(format));
  attnkit::quantize_group(format, [&](int i) { return x[i]; }, int(x.size()), q.data.data(), &q.scale, &q.zero);
  return q;
}

std::vector<float> dequantize_bytes(KVFormat format, const Quantized& q) {
  std::vector<float> out(q.data.size() * attnkit::channels_per_byte(format));
  const int per = attnkit::channels_per_byte(format);
  for (size_t j = 0; j < q.data.size(); ++j) {
    if (format == KVFormat::kInt8) attnkit::dequantize_byte<KVFormat::kInt8>(q.data[j], q.scale, q.zero, &out[j]);
    if (format == KVFormat::kInt4) attnkit::dequantize_byte<KVFormat::kInt4>(q.data[j], q.scale, q.zero, &out[2 * j]);
    if (format == KVFormat::kFp8E4M3)
      attnkit::dequantize_byte<KVFormat::kFp8E4M3>(q.data[j], q.scale, q.zero, &out[j * per]);
  }
  return out;
}

std::vector<float> dequantize_wide(KVFormat format, const Quantized& q) {
  std::vector<float> out(q.data.size() * attnkit::channels_per_byte(format));
  for (size_t j = 0; j < q.data.size(); j += 16) {
    uint32_t w[4];
    std::memcpy(w, &q.data[j], 16);
    float* o = &out[j * attnkit::channels_per_byte(format)];
    if (format == KVFormat::kInt8) attnkit::dequantize_16_bytes<KVFormat::kInt8>(w, q.scale, q.zero, o);
    if (format == KVFormat::kInt4) attnkit::dequantize_16_bytes<KVFormat::kInt4>(w, q.scale, q.zero, o);
    if (format == KVFormat::kFp8E4M3) attnkit::dequantize_16_bytes<KVFormat::kFp8E4M3>(w, q.scale, q.zero, o);
  }
  return out;
}

void test_int_round_trip() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (KVFormat format : {KVFormat::kInt8, KVFormat::kInt4}) {
    const int levels = attnkit::int_levels(format);
    for (int n : {32, 64, 128, 96}) {
      for (int trial = 0; trial < 200; ++trial) {
        const float spread = std::exp2(float(trial % 40) - 20.0f), offset = (trial % 3) * 100.0f * spread;
        std::vector<float> x(n);
        for (float& v : x) v = offset + spread * normal(rng);
        const Quantized q = quantize(format, x);
        float lo = x[0], hi = x[0];
        for (float v : x) lo = std::fmin(lo, v), hi = std::fmax(hi, v);
        EXPECT(q.zero == lo && q.scale == (hi - lo) / float(levels), "scale / zero of a group");
        const std::vector<float> values = dequantize_bytes(format, q);
        for (int i = 0; i < n; ++i) {
          // Half a step, plus float32 rounding in (x - zero) / scale and in the fma.
          const float bound = 0.5f * q.scale * (1.0f + 1e-4f) + std::fabs(x[i]) * 1.2e-7f;
          EXPECT(std::fabs(x[i] - values[i]) <= bound, "n %d channel %d: |%g - %g| > %g", n, i, x[i], values[i],
                 bound);
        }
        EXPECT(values == dequantize_wide(format, q) || n % 32 != 0, "16-byte and byte-wise decoding differ");
      }
    }
  }
}

void test_edge_values() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (KVFormat format : {KVFormat::kInt8, KVFormat::kInt4, KVFormat::kFp8E4M3}) {
    const bool fp8 = format == KVFormat::kFp8E4M3;
    // Constant rows are exact (scale 0, codes 0 for int); so are rows of +-0.
    for (float c : {0.0f, 3.5f, -1e-30f, 65504.0f}) {
      const std::vector<float> x(32, c);
      const Quantized q = quantize(format, x);
      const std::vector<float> v = dequantize_bytes(format, q);
      if (!fp8) EXPECT(q.scale == 0.0f && v[5] == c, "constant %g: scale %g value %g", c, q.scale, v[5]);
      if (fp8) EXPECT(std::fabs(v[5] - c) <= std::fabs(c) * 2.4e-7f, "fp8 constant %g: value %g", c, v[5]);
    }
    std::vector<float> zeros(32, 0.0f);
    zeros[3] = -0.0f;
    const Quantized qz = quantize(format, zeros);
    const std::vector<float> vz = dequantize_bytes(format, qz);
    if (fp8) EXPECT(std::signbit(vz[3]) && !std::signbit(vz[4]), "fp8 keeps the sign of zeros");
    if (!fp8) EXPECT(!std::signbit(qz.zero), "int zero is +0 for a min of -0");
    // The extreme values of a group are exact for int (codes 0 and levels); the max is
    // exact for fp8 (it maps to 448).
    std::vector<float> x(64);
    for (int i = 0; i < 64; ++i) x[i] = float(i) * 0.37f - 7.0f;
    const std::vector<float> v = dequantize_bytes(format, quantize(format, x));
    EXPECT(std::fabs(v[63] - x[63]) <= 4e-6f * std::fabs(x[63]), "max: %g vs %g", v[63], x[63]);
    if (!fp8) EXPECT(v[0] == x[0], "min exact: %g vs %g", v[0], x[0]);
    // A NaN or +-inf poisons its group: scale NaN, codes 0, values NaN.
    for (float bad : {nan, inf, -inf}) {
      std::vector<float> y(32, 1.0f);
      y[7] = bad;
      const Quantized q = quantize(format, y);
      const std::vector<float> vy = dequantize_bytes(format, q);
      bool all_nan = std::isnan(q.scale), zero_codes = true;
      for (float f : vy) all_nan = all_nan && std::isnan(f);
      for (uint8_t b : q.data) zero_codes = zero_codes && b == 0;
      EXPECT(all_nan && zero_codes, "format %d, group with %g: not all NaN / codes 0", int(format), bad);
    }
  }
}

void test_wide_matches_bytes() {
  std::mt19937 rng(3);
  for (KVFormat format : {KVFormat::kInt8, KVFormat::kInt4, KVFormat::kFp8E4M3}) {
    for (int trial = 0; trial < 100; ++trial) {
      Quantized q;
      q.data.resize(64);
      for (uint8_t& b : q.data) b = uint8_t(rng());
      q.scale = std::ldexp(float(rng() % 1000 + 1), -int(rng() % 40));
      q.zero = format == KVFormat::kFp8E4M3 ? 0.0f : float(int(rng() % 2001) - 1000) * 0.013f;
      const std::vector<float> a = dequantize_bytes(format, q), b = dequantize_wide(format, q);
      for (size_t i = 0; i < a.size(); ++i)
        EXPECT(same_bits(a[i], b[i]) || (std::isnan(a[i]) && std::isnan(b[i])), "format %d element %zu: %g vs %g",
               int(format), i, a[i], b[i]);
    }
  }
}

// Values of channels [channel, channel + 8) of row `row` (channel a multiple of 8, so the 8
// lie in one group) through the words decoder: the scalar statement of what the decode
// kernels' 8-channel loads compute (kWordsPer8Channels words, dequantize_words).
template <KVFormat F>
void dequantize_8_channels(const attnkit::QuantizedRows& rows, int64_t row, int channel, float* out) {
  uint32_t w[attnkit::kWordsPer8Channels<F>];
  std::memcpy(w, rows.codes(row, channel), sizeof(w));
  attnkit::dequantize_words<F, attnkit::kWordsPer8Channels<F>>(w, rows.scale_at(row, channel),
                                                               rows.zero_at(row, channel), out);
}

// QuantizedRows addressing and the 8-channel decoder of the decode kernels: every 8
// channels of every row equal the byte-wise decoding with the row's group scale / zero.
template <KVFormat F>
void check_rows(int head_dim, int group_size, std::mt19937& rng) {
  constexpr int kRows = 5;
  const int per = attnkit::channels_per_byte(F), groups = head_dim / group_size;
  std::vector<uint8_t> data(size_t(kRows) * head_dim / per);
  std::vector<float> scale(size_t(kRows) * groups), zero(scale.size());
  for (uint8_t& b : data) b = uint8_t(rng());
  for (size_t i = 0; i < scale.size(); ++i) {
    scale[i] = std::ldexp(float(rng() % 1000 + 1), -int(rng() % 20));
    zero[i] = float(int(rng() % 2001) - 1000) * 0.013f;
  }
  attnkit::QuantizedRows rows;
  rows.format = F;
  rows.data = data.data();
  rows.scale = scale.data();
  rows.zero = F == KVFormat::kFp8E4M3 ? nullptr : zero.data();
  rows.head_dim = head_dim;
  rows.group_size = group_size;
  for (int c = 0; c < head_dim; ++c)
    EXPECT((c >> rows.group_shift()) == c / group_size, "group_shift: head_dim %d group %d channel %d", head_dim,
           group_size, c);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < head_dim; c += 8) {
      float got[8], want[8];
      dequantize_8_channels<F>(rows, r, c, got);
      const int g = r * groups + c / group_size;
      const float z = F == KVFormat::kFp8E4M3 ? 0.0f : zero[g];
      for (int i = 0; i < 8; i += per)
        attnkit::dequantize_byte<F>(data[(size_t(r) * head_dim + c + i) / per], scale[g], z, &want[i]);
      for (int i = 0; i < 8; ++i)
        EXPECT(same_bits(got[i], want[i]) || (std::isnan(got[i]) && std::isnan(want[i])),
               "format %d head_dim %d group %d row %d channel %d: %g vs %g", int(F), head_dim, group_size, r, c + i,
               got[i], want[i]);
    }
}

void test_quantized_rows() {
  std::mt19937 rng(4);
  for (auto [head_dim, group_size] :
       {std::pair{128, 32}, std::pair{128, 64}, std::pair{128, 128}, std::pair{96, 96}, std::pair{256, 32},
        std::pair{64, 64}}) {
    check_rows<KVFormat::kInt8>(head_dim, group_size, rng);
    check_rows<KVFormat::kInt4>(head_dim, group_size, rng);
    if (group_size == head_dim) check_rows<KVFormat::kFp8E4M3>(head_dim, group_size, rng);
  }
}

}  // namespace

// The Hadamard rotation of rotated key rows: hadamard_rotate against the Sylvester matrix in
// double; the orders the CUDA kernels split it in (cuda/quant/warp_row.cuh: lanes holding
// channels l + 32 j, and butterflies of a stage dealt out to lanes by their index t) give
// its bits exactly; and the 32-channel blocks the warp quantizer folds into a group are that
// group's channels.
void test_hadamard(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int n = 32; n <= 256; n *= 2) {
    EXPECT(std::fabs(attnkit::hadamard_norm(n) * std::sqrt(float(n)) - 1.0f) < 2e-7f, "norm of %d", n);
    std::vector<float> x(n);
    for (float& e : x) e = normal(rng);
    std::vector<float> rotated = x;
    attnkit::hadamard_rotate(rotated.data(), n);
    double err = 0, norm = 0;
    for (int r = 0; r < n; ++r) {
      double want = 0;
      for (int c = 0; c < n; ++c) want += (__builtin_popcount(r & c) % 2 ? -1.0 : 1.0) * x[c];
      want /= std::sqrt(double(n));
      err += (rotated[r] - want) * (rotated[r] - want);
      norm += want * want;
    }
    EXPECT(std::sqrt(err / norm) < 1e-6, "n %d: relative error %g against the matrix", n, std::sqrt(err / norm));

    // Warp layout: lane l, register j holds channel l + 32 j.
    const int per = n / 32;
    std::vector<float> lanes = x;  // index l + 32 j
    for (int h = 1; h < 32; h <<= 1) {
      std::vector<float> next(n);
      for (int j = 0; j < per; ++j)
        for (int l = 0; l < 32; ++l)
          next[l + 32 * j] = attnkit::hadamard_butterfly(lanes[l + 32 * j], lanes[(l ^ h) + 32 * j], l & h);
      lanes = next;
    }
    for (int h = 1; h < per; h <<= 1)
      for (int l = 0; l < 32; ++l)
        for (int j = 0; j < per; ++j) {
          if (j & h) continue;
          const float lower = lanes[l + 32 * j], upper = lanes[l + 32 * (j + h)];
          lanes[l + 32 * j] = attnkit::hadamard_butterfly(lower, upper, false);
          lanes[l + 32 * (j + h)] = attnkit::hadamard_butterfly(upper, lower, true);
        }
    for (float& e : lanes) e *= attnkit::hadamard_norm(n);
    EXPECT(std::memcmp(lanes.data(), rotated.data(), n * sizeof(float)) == 0, "n %d: warp-register order differs", n);

    // Shared-memory order: stage h, butterfly t -> lower channel t / h * 2h + t % h.
    for (int h = 1; h < n; h <<= 1) {
      std::vector<int> seen(n, 0);
      for (int t = 0; t < n / 2; ++t) {
        const int c = t / h * 2 * h + t % h;
        EXPECT(c + h < n && (c & h) == 0, "n %d h %d: butterfly %d at %d", n, h, t, c);
        if (c + h < n) ++seen[c], ++seen[c + h];
      }
      for (int c = 0; c < n; ++c) EXPECT(seen[c] == 1, "n %d h %d: channel %d in %d butterflies", n, h, c, seen[c]);
    }

    // Warp quantizer groups: block j (channels 32 j .. 32 j + 31) belongs to group j / (group_size / 32).
    for (int group_size : {32, 64, 128, n}) {
      if (group_size > n) continue;
      const int blocks_per_group = group_size / 32;
      for (int j = 0; j < per; ++j)
        for (int l = 0; l < 32; ++l)
          EXPECT((l + 32 * j) / group_size == j / blocks_per_group, "n %d group %d: block %d", n, group_size, j);
    }
  }
}

int main() {
  test_fp8_decode_all_bytes();
  test_fp8_encode();
  test_int_round_trip();
  test_edge_values();
  test_wide_matches_bytes();
  test_quantized_rows();
  std::mt19937 rng(7);
  test_hadamard(rng);
  if (failures == 0) std::printf("quant: all tests passed\n");
  return failures == 0 ? 0 : 1;
}
