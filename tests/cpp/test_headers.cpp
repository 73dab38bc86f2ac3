// Unit tests of the torch-free shared headers that both the CPU and the CUDA kernels use:
// the mask rule (mask.h), the online-softmax merge (softmax.h) and the fp16 / bf16
// conversions (dtype.h). Run by ctest; exits non-zero on the first failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "attnkit/dtype.h"
#include "attnkit/mask.h"
#include "attnkit/softmax.h"
#include "expect.h"

namespace {

// The rule of docs/semantics.md, written out key by key.
bool visible(int i, int j, int sq, int sk, bool causal, int wl, int wr) {
  const int d = i + sk - sq;
  if (causal) wr = 0;
  if (j < 0 || j >= sk) return false;
  if (wl >= 0 && j < d - wl) return false;
  if (wr >= 0 && j > d + wr) return false;
  return true;
}

void test_mask() {
  const int lengths[] = {0, 1, 2, 5, 17, 64, 65};
  const int windows[] = {-1, 0, 1, 3, 70};
  int cases = 0;
  for (int sq : lengths)
    for (int sk : lengths)
      for (int causal = 0; causal < 2; ++causal)
        for (int wl : windows)
          for (int wr : windows) {
            const attnkit::AttentionMask mask(sq, sk, causal, wl, wr);
            int union_begin = sk, union_end = 0;
            for (int i = 0; i < sq; ++i) {
              const attnkit::KeyRange r = mask.keys_of(i);
              for (int j = -1; j <= sk; ++j)
                EXPECT(r.contains(j) == visible(i, j, sq, sk, causal, wl, wr),
                       "sq=%d sk=%d causal=%d window=(%d,%d) i=%d j=%d", sq, sk, causal, wl, wr, i, j);
              if (!r.empty()) {
                union_begin = std::min(union_begin, r.begin);
                union_end = std::max(union_end, r.end);
              }
            }
            // keys_of_rows over the tiles of 4 rows covers exactly the union of the rows.
            for (int q0 = 0; q0 < sq; q0 += 4) {
              const int q1 = std::min(sq, q0 + 4);
              int lo = sk, hi = 0;
              for (int i = q0; i < q1; ++i) {
                const attnkit::KeyRange r = mask.keys_of(i);
                if (!r.empty()) lo = std::min(lo, r.begin), hi = std::max(hi, r.end);
              }
              const attnkit::KeyRange u = mask.keys_of_rows(q0, q1);
              if (hi <= lo)
                EXPECT(u.empty(), "rows %d..%d should see nothing", q0, q1);
              else
                EXPECT(u.begin == lo && u.end == hi, "rows %d..%d: got [%d,%d) want [%d,%d)", q0, q1, u.begin,
                       u.end, lo, hi);
            }
            ++cases;
          }
  std::printf("mask: %d configurations checked\n", cases);
}

void test_merge() {
  using attnkit::kNegInf;
  const float values[] = {kNegInf, -1e30f, -80.f, -3.5f, 0.f, 2.f, 50.f};
  for (float a : values)
    for (float b : values) {
      const attnkit::MergeWeights w = attnkit::merge_weights(a, b);
      if (a == kNegInf && b == kNegInf) {
        EXPECT(w.w_a == 0.f && w.w_b == 0.f && w.lse == kNegInf, "both -inf");
        continue;
      }
      const double m = std::max<double>(a, b);
      const double ea = a == kNegInf ? 0 : std::exp(double(a) - m), eb = b == kNegInf ? 0 : std::exp(double(b) - m);
      const double lse = m + std::log(ea + eb);
      EXPECT(std::fabs(w.lse - lse) <= 1e-6 * std::max(1.0, std::fabs(lse)), "lse(%g,%g)=%g want %g", a, b, w.lse, lse);
      EXPECT(std::fabs(w.w_a - ea / (ea + eb)) < 1e-6, "w_a(%g,%g)", a, b);
      EXPECT(std::fabs(w.w_a + w.w_b - 1.f) < 1e-6, "weights sum to 1 (%g,%g)", a, b);
    }
  // Folding a row in two halves with RowSoftmax and merging equals one pass.
  attnkit::RowSoftmax whole, left, right;
  const float logits[] = {0.5f, -2.f, 3.f, 1.f, -7.f, 2.5f};
  auto add = [](attnkit::RowSoftmax& s, float x) {
    s.rescale_to(std::max(s.max, x));
    s.sum += std::exp(x - s.max);
  };
  for (int i = 0; i < 6; ++i) add(whole, logits[i]), add(i < 3 ? left : right, logits[i]);
  const attnkit::MergeWeights w = attnkit::merge_weights(left.lse(), right.lse());
  EXPECT(std::fabs(w.lse - whole.lse()) < 1e-5, "split lse %g vs %g", w.lse, whole.lse());
  EXPECT(attnkit::RowSoftmax{}.lse() == kNegInf && attnkit::RowSoftmax{}.inv_sum() == 0.f, "empty row");
  EXPECT(std::fabs(attnkit::apply_softcap(100.f, 30.f) - 30.f * std::tanh(100.f / 30.f)) < 1e-5, "softcap");
  EXPECT(attnkit::apply_softcap(7.f, 0.f) == 7.f, "softcap off");
  std::printf("merge: ok\n");
}

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void test_dtype() {
  // Every finite half survives half -> float -> half; every bf16 likewise.
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const attnkit::Half h{uint16_t(bits)};
    const float f = attnkit::to_float(h);
    if (std::isnan(f)) continue;
    EXPECT(attnkit::from_float<attnkit::Half>(f).bits == bits, "half %04x -> %g", bits, f);
    const attnkit::BFloat16 b{uint16_t(bits)};
    const float g = attnkit::to_float(b);
    if (!std::isnan(g)) EXPECT(attnkit::from_float<attnkit::BFloat16>(g).bits == bits, "bf16 %04x", bits);
  }
  // Known values and round-to-nearest-even.
  EXPECT(attnkit::to_float(attnkit::Half{0x3c00}) == 1.f, "half 1");
  EXPECT(attnkit::to_float(attnkit::Half{0x0001}) == std::ldexp(1.f, -24), "smallest subnormal");
  EXPECT(attnkit::from_float<attnkit::Half>(65520.f).bits == 0x7c00, "overflow to inf");
  EXPECT(attnkit::from_float<attnkit::Half>(1.f + std::ldexp(1.f, -11)).bits == 0x3c00, "tie to even (down)");
  EXPECT(attnkit::from_float<attnkit::Half>(std::ldexp(1.f, -25)).bits == 0x0000, "half of smallest: tie to 0");
  EXPECT(attnkit::from_float<attnkit::Half>(std::ldexp(3.f, -26)).bits == 0x0001, "above half: rounds up");
  EXPECT(attnkit::from_float<attnkit::BFloat16>(bits_to_float(0x3f808000u)).bits == 0x3f80, "bf16 tie to even");
  EXPECT(attnkit::from_float<attnkit::BFloat16>(bits_to_float(0x3f818000u)).bits == 0x3f82, "bf16 tie up");
  EXPECT(std::isnan(attnkit::to_float(attnkit::from_float<attnkit::BFloat16>(NAN))), "bf16 nan");
  std::printf("dtype: ok\n");
}

}  // namespace

int main() {
  test_mask();
  test_merge();
  test_dtype();
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
