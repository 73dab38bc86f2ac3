// Building blocks of the CUDA prefill kernels (forward and backward), FlashAttention-2
// style on CuTe: tile configurations, where a (batch, head) lives in memory, predicated
// global->shared copies, shared->register GEMMs, and fragment re-layouts. The mask rule
// and the softmax arithmetic come from the shared headers (attnkit/mask.h, softmax.h).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "attnkit/mask.h"
#include "attnkit/params.h"
#include "attnkit/quant.h"
#include "attnkit/sequence.h"
#include "cuda/prefill/layouts.hpp"

namespace attnkit::cuda::prefill {

using namespace cute;

template <typename Element>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>;
};
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>;
};

// Shared-memory tiles of rows x head_dim: atoms of 8 rows x 64 (or 32) columns, XOR-swizzled
// so that 16-byte cp.async stores and ldmatrix loads of one phase hit distinct banks.
template <typename Element, int kHeadDim>
struct SmemTiles {
  static constexpr int kAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  using Atom = decltype(composition(Swizzle<kAtomCols == 64 ? 3 : 2, 3, 3>{},
                                    Layout<Shape<_8, Int<kAtomCols>>, Stride<Int<kAtomCols>, _1>>{}));
  template <int kRows>
  using Tile = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<kHeadDim>>{}));
  // A tile read transposed ((head_dim, rows) view of a (rows, head_dim) tile): the B operand
  // of O = P V, dK = dS^T Q and friends, loaded with ldmatrix.trans.
  template <int kRows>
  using TileT = decltype(composition(Tile<kRows>{}, make_layout(Shape<Int<kHeadDim>, Int<kRows>>{}, GenRowMajor{})));

  static constexpr int kElemsPerVec = 16 / sizeof(Element);
  static constexpr int kThreadsPerRow = kAtomCols / kElemsPerVec;
  template <int kThreads>
  using ThreadLayout = Layout<Shape<Int<kThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  // 16-byte asynchronous global->shared loads and plain 16-byte shared->global stores.
  template <int kThreads>
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Element>{},
                                            ThreadLayout<kThreads>{}, Layout<Shape<_1, Int<kElemsPerVec>>>{}));
  template <int kThreads>
  using GmemStore = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<uint128_t>, Element>{}, ThreadLayout<kThreads>{},
                                             Layout<Shape<_1, Int<kElemsPerVec>>>{}));
};

// (rows, head_dim) global tensor of one (sequence, head), row stride `row_stride`.
template <typename Element>
__device__ __forceinline__ auto gmem_rows(const void* base, int64_t offset, int rows, int cols, int64_t row_stride) {
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(base) + offset), make_shape(rows, cols),
                     make_stride(row_stride, _1{}));
}
template <typename Element>
__device__ __forceinline__ auto gmem_rows(void* base, int64_t offset, int rows, int cols, int64_t row_stride) {
  return make_tensor(make_gmem_ptr(static_cast<Element*>(base) + offset), make_shape(rows, cols),
                     make_stride(row_stride, _1{}));
}

// Copies a partitioned tile (CPY, CPY_M, CPY_K) with rows >= rows_left or columns >= cols
// skipped; with kClear the skipped vectors of dst are zeroed (shared memory that an MMA
// reads must hold finite values: 0 * NaN would poison the output). coords holds the tile
// coordinates of src, partitioned like it.
template <bool kClear, typename TiledCopy, typename Src, typename Dst, typename Coords>
__device__ __forceinline__ void copy_tile(const TiledCopy& tiled_copy, const Src& src, Dst&& dst, const Coords& coords,
                                          int rows_left, int cols) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    const bool row_ok = get<0>(coords(0, m, 0)) < rows_left;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      if (row_ok && get<1>(coords(0, m, k)) < cols) {
        copy(tiled_copy, src(_, m, k), dst(_, m, k));
      } else if constexpr (kClear) {
        clear(dst(_, m, k));
      }
    }
  }
}

// One 16-byte global->shared copy by cp.async (L2 only, as SM80_CP_ASYNC_CACHEGLOBAL).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}

// copy_tile for rows found one by one: dst partitioned like copy_tile's (CPY, CPY_M, CPY_K),
// coords its tile coordinates; tile row r is the row at element offset row_offset(r) of base
// (negative: no row), resolved once per row, its 16-byte vectors copied by cp.async. Absent
// rows and columns >= cols are zeroed, as copy_tile<true> does.
template <typename Element, typename Dst, typename Coords, typename RowOffset>
__device__ __forceinline__ void copy_rows_tile(const void* base, Dst&& dst, const Coords& coords, int cols,
                                               RowOffset&& row_offset) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    const int64_t offset = row_offset(get<0>(coords(0, m, 0)));
    const Element* src = static_cast<const Element*>(base) + (offset >= 0 ? offset : 0);
    CUTE_UNROLL
    for (int k = 0; k < size<2>(dst); ++k) {
      const int col = get<1>(coords(0, m, k));
      if (offset >= 0 && col < cols) {
        cp_async_16(&dst(0, m, k), src + col);
      } else {
        clear(dst(_, m, k));
      }
    }
  }
}

// copy_rows_tile for key rows that live in pages: tile row r is key first + r, resolved
// through the block table (key_offset); rows >= rows_left are zeroed.
template <typename Element, typename Dst, typename Coords>
__device__ __forceinline__ void copy_paged_tile(const AttentionParams& p, const void* base, const Strides& strides,
                                                int b, const Sequence& seq, int h_kv, int first, Dst&& dst,
                                                const Coords& coords, int rows_left, int cols) {
  copy_rows_tile<Element>(base, dst, coords, cols, [&](int row) -> int64_t {
    return row < rows_left ? key_offset(p, strides, b, seq, first + row, h_kv) : -1;
  });
}

// copy_paged_tile for a quantized cache (k_quant / v_quant of AttentionParams; rows by
// key_offset, pages or packed): each 16-byte vector of dst (8 channels) is dequantized from
// the channels' 8 (int8, fp8) or 4 (int4) code bytes with attnkit/quant.h's dequantize_words
// and stored to shared memory. Plain loads and stores, no cp.async: the codes are converted
// on the way; the barrier the caller passes before reading the tile publishes them as it
// does cp.async's. Rows >= rows_left and columns >= cols are zeroed.
template <typename Element, KVFormat F, typename Dst, typename Coords>
__device__ __forceinline__ void copy_quantized_tile(const AttentionParams& p, const QuantizedRows& rows,
                                                    const Strides& strides, int b, const Sequence& seq, int h_kv,
                                                    int first, Dst&& dst, const Coords& coords, int rows_left,
                                                    int cols) {
  constexpr int kWords = kWordsPer8Channels<F>;
  static_assert(decltype(size<0>(dst))::value == 8, "a vector of the shared tile holds 8 channels");
  const int group_shift = rows.group_shift();
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    const int row = get<0>(coords(0, m, 0));
    const bool row_ok = row < rows_left;
    const int64_t index = row_ok ? key_offset(p, strides, b, seq, first + row, h_kv) : 0;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(dst); ++k) {
      const int col = get<1>(coords(0, m, k));
      if (row_ok && col < cols) {
        uint32_t words[kWords];
        const uint8_t* codes = rows.codes(index, col);  // 8-byte (4-byte for int4) aligned: head_dim % 32 == 0
        if constexpr (kWords == 2) {
          const uint2 w = *reinterpret_cast<const uint2*>(codes);
          words[0] = w.x;
          words[1] = w.y;
        } else {
          words[0] = *reinterpret_cast<const uint32_t*>(codes);
        }
        const int64_t group = index * rows.groups() + (col >> group_shift);
        float values[8];
        dequantize_words<F, kWords>(words, rows.scale[group], rows.zero ? rows.zero[group] : 0.f, values);
        cutlass::Array<Element, 8> converted;
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) converted[i] = Element(values[i]);
        *reinterpret_cast<uint4*>(&dst(0, m, k)) = *reinterpret_cast<const uint4*>(&converted);
      } else {
        clear(dst(_, m, k));
      }
    }
  }
}

// acc += A B^T with both operands in shared memory, double-buffering the k-slices through
// registers (load slice k + 1 while multiplying slice k).
template <typename Acc, typename RegA, typename RegB, typename SmemA, typename SmemB, typename TiledMma,
          typename CopyA, typename CopyB, typename ThrCopyA, typename ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RegA& rA, RegB& rB, const SmemA& sA, const SmemB& sB,
                                        const TiledMma& mma, const CopyA& copy_a, const CopyB& copy_b,
                                        const ThrCopyA& thr_a, const ThrCopyB& thr_b) {
  auto rA_view = thr_a.retile_D(rA);
  auto rB_view = thr_b.retile_D(rB);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers (probabilities) and B in shared memory.
template <typename Acc, typename RegA, typename RegB, typename SmemB, typename TiledMma, typename CopyB,
          typename ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, const RegA& rA, RegB& rB, const SmemB& sB, const TiledMma& mma,
                                        const CopyB& copy_b, const ThrCopyB& thr_b) {
  auto rB_view = thr_b.retile_D(rB);
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Element-wise conversion of a register fragment (fp32 accumulators to fp16 / bf16).
template <typename To, typename Fragment>
__device__ __forceinline__ auto convert_fragment(const Fragment& x) {
  using From = typename Fragment::value_type;
  constexpr int kN = decltype(size(x))::value;
  cutlass::NumericArrayConverter<To, From, kN> convert;
  auto out = make_tensor_like<To>(x);
  *reinterpret_cast<cutlass::Array<To, kN>*>(out.data()) =
      convert(*reinterpret_cast<const cutlass::Array<From, kN>*>(x.data()));
  return out;
}

// 2^x on the special function unit (ex2.approx: 2^-inf = +0, 2 ulp).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Sets the logits of an accumulator tile that the mask hides to -inf. Tile element
// (r, c) is query m0 + r against key n0 + c; coords is the identity tile partitioned like
// acc. Rows past the sequence get some finite or -inf values: they are never stored.
template <typename Acc, typename Coords>
__device__ __forceinline__ void apply_mask(Acc& acc, const Coords& coords, const AttentionMask& mask, int m0, int n0) {
  Tensor s = make_tensor(acc.data(), rowcol(acc.layout()));
  Tensor c = make_tensor(coords.data(), rowcol(coords.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const KeyRange keys = mask.keys_of(m0 + get<0>(c(r, 0)));
    const int sink_end = mask.sink_end(keys);
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      const int key = n0 + get<1>(c(r, j));
      if (!keys.contains(key) && key >= sink_end) s(r, j) = -INFINITY;
    }
  }
}

// Adds the ALiBi bias (attnkit/mask.h) to the logits of a tile, indexed as in apply_mask;
// slope is in the accumulator's units (the ALiBi slope over the softmax's logit scale).
template <typename Acc, typename Coords>
__device__ __forceinline__ void add_alibi(Acc& acc, const Coords& coords, const AttentionMask& mask, int m0, int n0,
                                          float slope) {
  Tensor s = make_tensor(acc.data(), rowcol(acc.layout()));
  Tensor c = make_tensor(coords.data(), rowcol(coords.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const int diagonal = mask.diagonal(m0 + get<0>(c(r, 0)));
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) s(r, j) += alibi_bias(slope, diagonal, n0 + get<1>(c(r, j)));
  }
}

// Logits -> softcap * tanh(scale * s / softcap), in place (the softmax then uses scale 1).
template <typename Acc>
__device__ __forceinline__ void apply_softcap(Acc& acc, float scale, float softcap) {
  const float pre = scale / softcap;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) acc(i) = softcap * tanhf(acc(i) * pre);
}

// Reductions over the 4 threads (a quad) that share a row of an MMA accumulator.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace attnkit::cuda::prefill
