// Prefill forward on CUDA, the FlashAttention-2 algorithm: one CTA per (query block,
// q head, sequence); K and V tiles stream through shared memory with cp.async (the load of
// V[n] overlaps the S = Q K^T MMAs, the load of K[n-1] overlaps softmax and O += P V);
// online softmax in registers; out and LSE written once at the end.
//
// Which key tiles a query block visits, in which order, and which logits it masks is a
// policy (a template parameter): PrefillMask below for causal / window masks, and the
// neighbourhood policy of csrc/cuda/neighborhood/ for neighborhood attention, on the same
// mainloop. PrefillMask visits key tiles from the last to the first: with a causal mask
// the last tile is the partial one, and blocks that need no per-element mask skip it
// (AttentionMask::block_fully_visible). Rows that see no key get out = 0 and lse = -inf.
#pragma once

#include "cuda/check.h"
#include "cuda/prefill/common.cuh"
#include "cuda/prefill/launch.h"

namespace attnkit::cuda::prefill {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_>
struct FwdConfig {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  using Smem = SmemTiles<Element, kHeadDim>;
  // Each warp owns 16-row slices of the query block; N = 16 lets ldmatrix.x4 feed B.
  using TiledMma = TiledMMA<typename MmaAtomFor<Element>::type, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;
  using LayoutQ = typename Smem::template Tile<kBlockM>;
  using LayoutKV = typename Smem::template Tile<kBlockN>;
  using LayoutVt = typename Smem::template TileT<kBlockN>;
  static constexpr int kSmemBytes = int(sizeof(Element)) * (kBlockM + 2 * kBlockN) * kHeadDim;
};

// Tile shapes per head_dim: the largest that compile without (or with a few bytes of)
// register spills for 4 warps; the O accumulator (kBlockM x kHeadDim fp32) dominates.
// Untuned: no GPU has measured them yet.
template <typename Element, int kHeadDim>
struct FwdConfigFor;
template <typename E>
struct FwdConfigFor<E, 64> : FwdConfig<E, 64, 128, 64, 4> {};
template <typename E>
struct FwdConfigFor<E, 96> : FwdConfig<E, 96, 64, 64, 4> {};
template <typename E>
struct FwdConfigFor<E, 128> : FwdConfig<E, 128, 64, 64, 4> {};
template <typename E>
struct FwdConfigFor<E, 256> : FwdConfig<E, 256, 64, 32, 4> {};

// Tiles of the kernel that reads K / V row by row (pages, quantized rows): the row addresses
// of a tile take registers the dense loader does not, so head_dim 64 takes 64-row query
// tiles (128 spills in its mainloop).
template <typename Element, int kHeadDim>
struct RowwiseFwdConfigFor : FwdConfigFor<Element, kHeadDim> {};
template <typename E>
struct RowwiseFwdConfigFor<E, 64> : FwdConfig<E, 64, 64, 64, 4> {};

// Running max and sum of each of a thread's rows; rescales O when the max moves and turns
// the logits of acc_s into unnormalised probabilities exp(s - max).
template <typename AccS, typename AccO, int kRows>
__device__ __forceinline__ void online_softmax(AccS& acc_s, AccO& acc_o, float (&row_max)[kRows],
                                               float (&row_sum)[kRows], float scale_log2) {
  Tensor s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
  Tensor o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  static_assert(decltype(size<0>(s))::value == kRows);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float m = row_max[r];
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) m = fmaxf(m, s(r, j));
    m = quad_max(m);
    // A row that has seen only -inf keeps max -inf; exp2(-inf - 0) = 0 then, never NaN.
    const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
    const float factor = fast_exp2(row_max[r] * scale_log2 - m_scaled);
    row_max[r] = m;
    float sum = 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      s(r, j) = fast_exp2(s(r, j) * scale_log2 - m_scaled);
      sum += s(r, j);
    }
    row_sum[r] = row_sum[r] * factor + sum;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o); ++j) o(r, j) *= factor;
  }
}

// The mask policy of prefill attention. A policy is built per query block from the params,
// its own Args (kernel parameter), the sequence, the block's sequence and q head, and its
// first row, and offers:
// first() the first key tile to visit, next(n) the one after tile n (the same value however
// often it is asked), valid(n) whether a tile index is one to visit (false past the last);
// needs_mask(n) whether tile n holds a hidden or biased logit; apply(acc, coords, n) which
// sets the hidden logits to -inf (and biases the others). PrefillMask visits the tiles of
// its rows' windows from the last down, then the sink tiles below them (sink_tiles: tiles
// [0, sink_tiles) hold the sinks); with ALiBi every tile is biased.
template <int kBlockM, int kBlockN>
struct PrefillMask {
  struct Args {};
  AttentionMask mask;
  KeyRange tiles;
  int sink_tiles;
  int m0;
  float alibi;  // slope in accumulator units: the softmax scales logits by p.scale unless capped

  __device__ PrefillMask(const AttentionParams& p, const Args&, const Sequence& seq, int b, int h, int m0_)
      : mask(seq.len_q, seq.len_k, p.causal, p.window_left, p.window_right, p.sink_tokens),
        tiles(tiles_of(mask.keys_of_rows(m0_, min(seq.len_q, m0_ + kBlockM)), kBlockN)),
        sink_tiles(tiles_of(mask.sink_keys_of_rows(m0_, min(seq.len_q, m0_ + kBlockM)), kBlockN).end),
        m0(m0_),
        alibi(p.alibi_slope(b, h) / (p.softcap > 0.f ? 1.f : p.scale)) {}
  __device__ int first() const { return tiles.end - 1; }
  __device__ int next(int n) const { return n - 1 >= tiles.begin || n - 1 < sink_tiles ? n - 1 : sink_tiles - 1; }
  __device__ bool valid(int n) const { return n >= 0 && (n >= tiles.begin || n < sink_tiles); }
  __device__ bool needs_mask(int n) const {
    return alibi != 0.f || !mask.block_fully_visible(m0, m0 + kBlockM, n * kBlockN, (n + 1) * kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int n) const {
    apply_mask(acc, coords, mask, m0, n * kBlockN);
    if (alibi != 0.f) add_alibi(acc, coords, mask, m0, n * kBlockN, alibi);
  }
};

// A policy with gathered_keys(tile) may name the keys of a tile one by one (block-sparse
// columns): key r of it is gathered_keys(tile)[r], for r < gathered_count(tile), loaded
// row by row. Returns whether the tile was such a tile (and loaded); false for every tile
// of a policy without gathered_keys.
template <typename Element, typename Policy, typename Dst, typename Coords>
__device__ __forceinline__ bool load_gathered_tile(const Policy& policy, int tile, const void* base,
                                                   const Strides& strides, int b, const Sequence& seq, int h_kv,
                                                   Dst& dst, const Coords& coords, int cols) {
  if constexpr (requires { policy.gathered_keys(tile); }) {
    const int32_t* keys = policy.gathered_keys(tile);
    if (keys == nullptr) return false;
    const int count = policy.gathered_count(tile);
    copy_rows_tile<Element>(base, dst, coords, cols, [&](int row) -> int64_t {
      if (row >= count) return -1;
      const int key = keys[row];  // outside the sequence only in a non-canonical list: not read
      return key >= 0 && key < seq.len_k ? offset_of(strides, b, seq.row_k + key, h_kv) : -1;
    });
    return true;
  } else {
    return false;
  }
}

// kPagedKV: K and V are read row by row through key_offset: pages (AttentionParams::
// block_table; cp.async) or a quantized cache (AttentionParams::k_quant, packed or paged rows;
// dequantized on the way). Otherwise rows of one (sequence, kv head) at a fixed stride.
template <typename Cfg, typename Policy, bool kPagedKV>
__global__ void __launch_bounds__(Cfg::kThreads)
    fwd_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ typename Policy::Args args) {
  using Element = typename Cfg::Element;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(128) char smem[];

  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest (causal) rows start first
  const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const Sequence seq = sequence_of(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int rows_left = seq.len_q - m0;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  Policy policy(p, args, seq, b, h, m0);
  int n = policy.first();

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  Tensor gQ = local_tile(gmem_rows<Element>(p.q, offset_of(p.q_strides, b, seq.row_q, h), seq.len_q, p.head_dim,
                                            p.q_strides.row),
                         TileQ{}, make_coord(m_block, 0));
  Tensor gO = local_tile(gmem_rows<Element>(p.out, offset_of(p.out_strides, b, seq.row_q, h), seq.len_q, p.head_dim,
                                            p.out_strides.row),
                         TileQ{}, make_coord(m_block, 0));
  Tensor gK = local_tile(gmem_rows<Element>(p.k, offset_of(p.k_strides, b, seq.row_k, h_kv), seq.len_k, p.head_dim,
                                            p.k_strides.row),
                         TileKV{}, make_coord(_, 0));  // (kBlockN, kHeadDim, tiles)
  Tensor gV = local_tile(gmem_rows<Element>(p.v, offset_of(p.v_strides, b, seq.row_k, h_kv), seq.len_k, p.head_dim,
                                            p.v_strides.row),
                         TileKV{}, make_coord(_, 0));
  float* lse = p.lse + lse_offset(p, b, h, seq) + m0;
  const Tensor cQ = make_identity_tensor(TileQ{});  // tile coordinates, for predicates
  const Tensor cKV = make_identity_tensor(TileKV{});

  typename Cfg::Smem::template GmemStore<kThreads> gmem_store;
  auto thr_store = gmem_store.get_thread_slice(tid);
  if (!policy.valid(n)) {  // no row of this block sees a key
    Tensor tOgO = thr_store.partition_D(gO);
    Tensor zeros = make_tensor<Element>(shape(tOgO));
    clear(zeros);
    copy_tile<false>(gmem_store, zeros, tOgO, thr_store.partition_D(cQ), rows_left, p.head_dim);
    for (int r = tid; r < min(rows_left, kBlockM); r += kThreads) lse[r] = -INFINITY;
    return;
  }

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Cfg::LayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Cfg::LayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Cfg::LayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Cfg::LayoutVt{});

  typename Cfg::Smem::template GmemLoad<kThreads> gmem_load;
  auto thr_load = gmem_load.get_thread_slice(tid);
  Tensor tQgQ = thr_load.partition_S(gQ);
  Tensor tQsQ = thr_load.partition_D(sQ);
  Tensor tQcQ = thr_load.partition_S(cQ);
  Tensor tKgK = thr_load.partition_S(gK);
  Tensor tKsK = thr_load.partition_D(sK);
  Tensor tVgV = thr_load.partition_S(gV);
  Tensor tVsV = thr_load.partition_D(sV);
  Tensor tKVc = thr_load.partition_S(cKV);

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt);
  Tensor acc_o = partition_fragment_C(mma, TileQ{});
  clear(acc_o);

  auto copy_q = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  auto copy_v = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);
  Tensor tOsVt = thr_copy_v.partition_S(sVt);

  const auto keys_left = [&](int tile) { return seq.len_k - tile * kBlockN; };
  // Key tile `tile` of K or V (base, strides, quant: the tensor's) into its shared tile dst.
  const auto load_rowwise = [&](const void* base, const Strides& strides, const QuantizedRows& quant, auto& dst,
                                int tile) {
    const int first = tile * kBlockN;
    if (!p.is_quantized()) {
      copy_paged_tile<Element>(p, base, strides, b, seq, h_kv, first, dst, tKVc, keys_left(tile), p.head_dim);
      return;
    }
    switch (quant.format) {
      case KVFormat::kInt8:
        copy_quantized_tile<Element, KVFormat::kInt8>(p, quant, strides, b, seq, h_kv, first, dst, tKVc,
                                                      keys_left(tile), p.head_dim);
        break;
      case KVFormat::kInt4:
        copy_quantized_tile<Element, KVFormat::kInt4>(p, quant, strides, b, seq, h_kv, first, dst, tKVc,
                                                      keys_left(tile), p.head_dim);
        break;
      case KVFormat::kFp8E4M3:
        copy_quantized_tile<Element, KVFormat::kFp8E4M3>(p, quant, strides, b, seq, h_kv, first, dst, tKVc,
                                                         keys_left(tile), p.head_dim);
        break;
    }
  };
  const auto load_gathered = [&](const void* base, const Strides& strides, auto& dst, int tile) {
    return load_gathered_tile<Element>(policy, tile, base, strides, b, seq, h_kv, dst, tKVc, p.head_dim);
  };
  const auto load_k = [&](int tile) {
    if constexpr (kPagedKV)
      load_rowwise(p.k, p.k_strides, p.k_quant, tKsK, tile);
    else if (!load_gathered(p.k, p.k_strides, tKsK, tile))
      copy_tile<true>(gmem_load, tKgK(_, _, _, tile), tKsK, tKVc, keys_left(tile), p.head_dim);
  };
  const auto load_v = [&](int tile) {
    if constexpr (kPagedKV)
      load_rowwise(p.v, p.v_strides, p.v_quant, tVsV, tile);
    else if (!load_gathered(p.v, p.v_strides, tVsV, tile))
      copy_tile<true>(gmem_load, tVgV(_, _, _, tile), tVsV, tKVc, keys_left(tile), p.head_dim);
  };
  copy_tile<true>(gmem_load, tQgQ, tQsQ, tQcQ, rows_left, p.head_dim);
  load_k(n);
  cp_async_fence();

  constexpr int kRows = 2 * decltype(size<1>(acc_o))::value;
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.f;
  const bool capped = p.softcap > 0.f;
  const float logit_scale = capped ? 1.f : p.scale;  // softcap folds the scale into tanh
  const float scale_log2 = logit_scale * float(M_LOG2E);
  const Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));

  for (; policy.valid(n); n = policy.next(n)) {
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n] landed; every warp is done with V[n + 1]
    load_v(n);
    cp_async_fence();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, copy_q, copy_k, thr_copy_q, thr_copy_k);
    if (capped) apply_softcap(acc_s, p.scale, p.softcap);
    if (policy.needs_mask(n)) policy.apply(acc_s, tScS, n);

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (const int n_next = policy.next(n); policy.valid(n_next)) {
      load_k(n_next);
      cp_async_fence();
    }

    online_softmax(acc_s, acc_o, row_max, row_sum, scale_log2);
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_operand_a(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, mma, copy_v, thr_copy_v);
  }

  // Normalise, then stage O through shared memory (over Q) for 16-byte row stores.
  Tensor o = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  float row_lse[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    // sum 0: the row saw no key; a NaN sum (NaN among its visible keys) stays NaN.
    row_lse[r] = sum == 0.f ? -INFINITY : row_max[r] * logit_scale + logf(sum);
    const float inv = sum == 0.f ? 0.f : 1.f / sum;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o); ++j) o(r, j) *= inv;
  }
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Cfg::LayoutQ{});
  auto copy_o = make_tiled_copy_C(Copy_Atom<DefaultCopy, Element>{}, mma);
  auto thr_copy_o = copy_o.get_thread_slice(tid);
  __syncthreads();
  copy(copy_o, thr_copy_o.retile_S(rO), thr_copy_o.partition_D(sO));
  __syncthreads();
  Tensor tOgO = thr_store.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_store, thr_store.partition_S(sO), tOrO);
  copy_tile<false>(gmem_store, tOrO, tOgO, thr_store.partition_D(cQ), rows_left, p.head_dim);

  // The thread holding column 0 of a row writes its lse.
  const Tensor c = thr_mma.partition_C(cQ);
  const Tensor crc = make_tensor(c.data(), rowcol(c.layout()));
  if (get<1>(crc(0, 0)) == 0) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = get<0>(crc(r, 0));
      if (row < rows_left) lse[row] = row_lse[r];
    }
  }
}

// Launches the forward kernel of tile configuration Cfg with mask policy
// Policy<kBlockM, kBlockN> (and K / V in pages when kPagedKV).
template <typename Cfg, template <int, int> class Policy, bool kPagedKV = false>
void launch_fwd_with(const AttentionParams& p, const typename Policy<Cfg::kBlockM, Cfg::kBlockN>::Args& args,
                     cudaStream_t stream, const char* op) {
  auto kernel = fwd_kernel<Cfg, Policy<Cfg::kBlockM, Cfg::kBlockN>, kPagedKV>;
  constexpr int smem = Cfg::kSmemBytes;
  if constexpr (smem > 48 * 1024) {
    require_shared_memory(smem, op, Cfg::kHeadDim);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), op);
  }
  const dim3 grid((p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p, args);
  check(cudaGetLastError(), op);
}

template <typename Element, int kHeadDim>
void launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (p.is_paged() || p.is_quantized())
    launch_fwd_with<RowwiseFwdConfigFor<Element, kHeadDim>, PrefillMask, true>(
        p, {}, stream, "attention_fwd launch (paged or quantized K / V)");
  else
    launch_fwd_with<FwdConfigFor<Element, kHeadDim>, PrefillMask>(p, {}, stream, "attention_fwd launch");
}

}  // namespace attnkit::cuda::prefill
