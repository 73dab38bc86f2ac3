// Unit tests of the torch-free shared headers that both the CPU and the CUDA kernels use:
// the mask rule (mask.h), the online-softmax merge (softmax.h) and the fp16 / bf16
// conversions (dtype.h). Run by ctest; exits non-zero on the first failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "attnkit/dtype.h"
#include "attnkit/mask.h"
#include "attnkit/softmax.h"
#include "expect.h"

namespace {

// The rule of docs/semantics.md, written out key by key: a sink (j < sinks) escapes only the
// left bound.
bool visible(int i, int j, int sq, int sk, bool causal, int wl, int wr, int sinks) {
  const int d = i + sk - sq;
  if (causal) wr = 0;
  if (j < 0 || j >= sk) return false;
  if (wl >= 0 && j < d - wl && j >= sinks) return false;
  if (wr >= 0 && j > d + wr) return false;
  return true;
}

void test_mask() {
  const int lengths[] = {0, 1, 2, 5, 17, 64, 65};
  const int windows[] = {-1, 0, 1, 3, 70};
  const int sink_counts[] = {0, 2, 9};
  int cases = 0;
  for (int sq : lengths)
    for (int sk : lengths)
      for (int causal = 0; causal < 2; ++causal)
        for (int wl : windows)
          for (int wr : windows)
            for (int sinks : sink_counts) {
            const attnkit::AttentionMask mask(sq, sk, causal, wl, wr, sinks);
            const auto visible = [&](int i, int j) { return ::visible(i, j, sq, sk, causal, wl, wr, sinks); };
            for (int i = 0; i < sq; ++i) {
              const attnkit::KeyRange r = mask.keys_of(i);
              for (int j = -1; j <= sk; ++j)
                EXPECT(mask.sees(r, j) == visible(i, j), "sq=%d sk=%d causal=%d window=(%d,%d) sinks=%d i=%d j=%d",
                       sq, sk, causal, wl, wr, sinks, i, j);
            }
            // sink_keys_of_rows over tiles of 4 rows: [0, the largest sink end of a row).
            for (int q0 = 0; q0 < sq; q0 += 4) {
              const int q1 = std::min(sq, q0 + 4);
              int hi = 0;
              for (int i = q0; i < q1; ++i) hi = std::max(hi, mask.sink_end(mask.keys_of(i)));
              const attnkit::KeyRange u = mask.sink_keys_of_rows(q0, q1);
              EXPECT(u.begin == 0 && u.end == hi, "sinks of rows %d..%d: got [%d,%d) want [0,%d)", q0, q1, u.begin,
                     u.end, hi);
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
            // rows_of_keys and block_fully_visible over key blocks of 3 and row blocks of 4.
            for (int k0 = 0; k0 < sk; k0 += 3) {
              const int k1 = std::min(sk, k0 + 3);
              int lo = sq, hi = 0;
              for (int i = 0; i < sq; ++i)
                for (int j = k0; j < k1; ++j)
                  if (visible(i, j)) lo = std::min(lo, i), hi = std::max(hi, i + 1);
              const attnkit::RowRange rows = mask.rows_of_keys(k0, k1);
              if (hi <= lo)
                EXPECT(rows.empty(), "keys %d..%d should be seen by no row, got [%d,%d)", k0, k1, rows.begin,
                       rows.end);
              else
                EXPECT(rows.begin == lo && rows.end == hi, "keys %d..%d: got rows [%d,%d) want [%d,%d)", k0, k1,
                       rows.begin, rows.end, lo, hi);
              for (int q0 = 0; q0 < sq; q0 += 4) {
                bool all = true;
                for (int i = q0; i < std::min(sq, q0 + 4); ++i)
                  for (int j = k0; j < k0 + 3; ++j) all = all && visible(i, j);
                // May be conservative (false when all are visible) only for rows that see nothing.
                const bool got = mask.block_fully_visible(q0, q0 + 4, k0, k0 + 3);
                EXPECT(!got || all, "block rows %d.. keys %d..%d claimed fully visible", q0, k0, k0 + 3);
                EXPECT(got || !all, "block rows %d.. keys %d..%d is fully visible", q0, k0, k0 + 3);
              }
            }
            ++cases;
          }
  std::printf("mask: %d configurations checked\n", cases);
}

void test_tiles() {
  using attnkit::KeyRange;
  for (int begin = 0; begin < 40; ++begin)
    for (int end = 0; end < 40; ++end)
      for (int tile : {1, 3, 16}) {
        const KeyRange t = attnkit::tiles_of({begin, end}, tile);
        for (int i = 0; i < 40; ++i) {
          const bool in_tiles = i / tile >= t.begin && i / tile < t.end;
          if (i >= begin && i < end) EXPECT(in_tiles, "[%d,%d) tile %d: index %d not covered", begin, end, tile, i);
        }
        if (end > begin)
          EXPECT(t.begin * tile <= begin && (t.begin + 1) * tile > begin && (t.end - 1) * tile < end,
                 "[%d,%d) tile %d: tiles [%d,%d) not tight", begin, end, tile, t.begin, t.end);
        else
          EXPECT(t.empty(), "empty range has tiles");
      }
  std::printf("tiles: ok\n");
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
  // The base-2 state (the CUDA decode: log2(e) folded into the scale and the softcap, exp2f)
  // gives the same natural-log lse and the same normalised weights; -inf logits count 0.
  {
    const float scale = 0.37f, softcap = 3.f;
    const float raw[] = {4.f, -6.f, 25.f, kNegInf, 0.f, -40.f, 11.f, 9.5f};
    attnkit::RowSoftmax e;
    attnkit::RowSoftmax2 two;
    float acc_e = 0.f, acc_2 = 0.f;
    for (int i = 0; i < 8; ++i) {
      const float v = float(i) - 2.5f;
      const float se = raw[i] == kNegInf ? kNegInf : attnkit::apply_softcap(raw[i] * scale, softcap);
      const float s2 = raw[i] == kNegInf ? kNegInf
                                         : attnkit::apply_softcap(raw[i] * (scale * attnkit::kLog2e),
                                                                  softcap * attnkit::kLog2e);
      acc_e *= e.rescale_to(std::max(e.max, se));
      acc_2 *= two.rescale_to(std::max(two.max, s2));
      const float pe = attnkit::exp_diff(se, e.max), p2 = attnkit::exp2_diff(s2, two.max);
      e.sum += pe, two.sum += p2;
      acc_e += pe * v, acc_2 += p2 * v;
    }
    EXPECT(std::fabs(two.lse() - e.lse()) <= 1e-5f * std::max(1.f, std::fabs(e.lse())), "base-2 lse %g vs %g",
           two.lse(), e.lse());
    EXPECT(std::fabs(acc_2 * two.inv_sum() - acc_e * e.inv_sum()) < 1e-5f, "base-2 output %g vs %g",
           acc_2 * two.inv_sum(), acc_e * e.inv_sum());
    EXPECT(attnkit::RowSoftmax2{}.lse() == kNegInf && attnkit::exp2_diff(kNegInf, kNegInf) == 0.f, "base-2 empty");
  }
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
  test_tiles();
  test_merge();
  test_dtype();
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
