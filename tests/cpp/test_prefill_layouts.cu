// Host checks of the register and copy layouts that the CUDA prefill kernels rely on,
// computed with CuTe's own partitioning for every thread of each kernel configuration
// (no GPU needed):
//  - rowcol(): the (row, col) view of an accumulator keeps one row per first index and
//    one column per second index;
//  - every row of an accumulator tile lives in exactly one quad (4 lanes of one warp), the
//    assumption of quad_max / quad_sum, and exactly one thread holds its column 0 (the
//    lse writer);
//  - acc_as_operand_a(): the forward's accumulator re-read as the A operand of the next MMA
//    holds, at each position, the element the A operand expects there (P in O += P V; the
//    backward passes P through shared memory instead);
//  - the 16-byte global<->shared copies cover each tile exactly once, each vector inside one
//    row and 8 columns starting at a multiple of 8 (so row / column predicates are exact).
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "cuda/prefill/bwd.cuh"
#include "cuda/prefill/fwd.cuh"
#include "expect.h"

namespace {

using namespace cute;

// kForward: the forward's tiles, which also need whole rows per quad (row softmax) and
// P reusable as an A operand.
template <typename TiledMma, int kM, int kN, bool kForward>
void check_accumulator(const char* name) {
  TiledMma mma;
  constexpr int kThreads = decltype(size(mma))::value;
  const auto tile = make_identity_tensor(Shape<Int<kM>, Int<kN>>{});
  std::vector<std::set<int>> row_threads(kM);
  std::vector<int> col0_writers(kM, 0);
  std::vector<int> seen(kM * kN, 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    const auto c = thr.partition_C(tile);
    const auto rc = make_tensor(c.data(), attnkit::cuda::prefill::rowcol(c.layout()));
    for (int r = 0; r < size<0>(rc); ++r)
      for (int j = 0; j < size<1>(rc); ++j) {
        const int row = get<0>(rc(r, j)), col = get<1>(rc(r, j));
        EXPECT(row == get<0>(rc(r, 0)), "%s tid %d: rowcol row %d mixes rows", name, tid, r);
        EXPECT(col == get<1>(rc(0, j)), "%s tid %d: rowcol col %d mixes columns", name, tid, j);
        ++seen[row * kN + col];
        row_threads[row].insert(tid);
      }
    if (get<1>(rc(0, 0)) == 0)
      for (int r = 0; r < size<0>(rc); ++r) ++col0_writers[get<0>(rc(r, 0))];

    // acc_as_operand_a: C coordinates (row, n) re-read as A coordinates (row, k = n).
    if constexpr (!kForward) continue;
    const auto a = thr.partition_A(tile);
    const auto as_a = make_tensor(c.data(), attnkit::cuda::prefill::acc_as_operand_a(c.layout()));
    EXPECT(size(a) == size(as_a), "%s: operand sizes %d vs %d", name, int(size(a)), int(size(as_a)));
    for (int i = 0; i < size(a); ++i)
      EXPECT(a(i) == as_a(i), "%s tid %d element %d: A wants (%d,%d), accumulator holds (%d,%d)", name, tid, i,
             int(get<0>(a(i))), int(get<1>(a(i))), int(get<0>(as_a(i))), int(get<1>(as_a(i))));
  }
  for (int i = 0; i < kM * kN; ++i) EXPECT(seen[i] == 1, "%s: element %d held %d times", name, i, seen[i]);
  for (int row = 0; row < kM && kForward; ++row) {
    const auto& ts = row_threads[row];
    EXPECT(ts.size() == 4, "%s: row %d held by %d threads", name, row, int(ts.size()));
    EXPECT(*ts.rbegin() - *ts.begin() == 3 && *ts.begin() % 4 == 0, "%s: row %d not held by one quad", name, row);
    EXPECT(col0_writers[row] == 1, "%s: row %d has %d lse writers", name, row, col0_writers[row]);
  }
  std::printf("%s: accumulator %dx%d over %d threads ok\n", name, kM, kN, kThreads);
}

template <typename TiledCopy, int kRows, int kCols, int kVec>
void check_gmem_copy(const char* name) {
  TiledCopy copy;
  constexpr int kThreads = decltype(size(copy))::value;
  const auto tile = make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{});
  std::vector<int> seen(kRows * kCols, 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    const auto c = copy.get_thread_slice(tid).partition_S(tile);  // (CPY, CPY_M, CPY_K)
    EXPECT(size<0>(c) == kVec, "%s: vector of %d elements", name, int(size<0>(c)));
    for (int m = 0; m < size<1>(c); ++m)
      for (int k = 0; k < size<2>(c); ++k) {
        const int row = get<0>(c(0, m, k)), col = get<1>(c(0, m, k));
        EXPECT(col % kVec == 0, "%s: vector starts at column %d", name, col);
        for (int v = 0; v < kVec; ++v) {
          EXPECT(get<0>(c(v, m, k)) == row && get<1>(c(v, m, k)) == col + v, "%s: vector not one row run", name);
          ++seen[get<0>(c(v, m, k)) * kCols + get<1>(c(v, m, k))];
        }
      }
  }
  for (int i = 0; i < kRows * kCols; ++i) EXPECT(seen[i] == 1, "%s: element %d copied %d times", name, i, seen[i]);
  std::printf("%s: %dx%d tile copy ok\n", name, kRows, kCols);
}

template <typename Cfg>
void check_fwd(const char* name) {
  check_accumulator<typename Cfg::TiledMma, Cfg::kBlockM, Cfg::kBlockN, true>(name);
  check_accumulator<typename Cfg::TiledMma, Cfg::kBlockM, Cfg::kHeadDim, true>(name);
  using Smem = typename Cfg::Smem;
  check_gmem_copy<typename Smem::template GmemLoad<Cfg::kThreads>, Cfg::kBlockM, Cfg::kHeadDim, 8>(name);
  check_gmem_copy<typename Smem::template GmemLoad<Cfg::kThreads>, Cfg::kBlockN, Cfg::kHeadDim, 8>(name);
  check_gmem_copy<typename Smem::template GmemStore<Cfg::kThreads>, Cfg::kBlockM, Cfg::kHeadDim, 8>(name);
}

template <typename Cfg>
void check_bwd(const char* name) {
  check_accumulator<typename Cfg::TiledMma, Cfg::kBlockM, Cfg::kBlockN, false>(name);
  check_accumulator<typename Cfg::TiledMma, Cfg::kBlockN, Cfg::kHeadDim, false>(name);
  using Smem = typename Cfg::Smem;
  check_gmem_copy<typename Smem::template GmemLoad<Cfg::kThreads>, Cfg::kBlockM, Cfg::kHeadDim, 8>(name);
}

}  // namespace

int main() {
  using attnkit::cuda::prefill::BwdConfigFor;
  using attnkit::cuda::prefill::FwdConfigFor;
  using bf16 = cutlass::bfloat16_t;
  check_fwd<FwdConfigFor<bf16, 64>>("fwd d64");
  check_fwd<FwdConfigFor<bf16, 96>>("fwd d96");
  check_fwd<FwdConfigFor<bf16, 128>>("fwd d128");
  check_fwd<FwdConfigFor<cutlass::half_t, 256>>("fwd d256");
  check_bwd<BwdConfigFor<bf16, 64>>("bwd d64");
  check_bwd<BwdConfigFor<bf16, 96>>("bwd d96");
  check_bwd<BwdConfigFor<bf16, 128>>("bwd d128");
  check_bwd<BwdConfigFor<cutlass::half_t, 256>>("bwd d256");
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
