// Prefill backward on CUDA, the FlashAttention-2 algorithm in three kernels:
//  1. rows:   delta = rowsum(dO * O) per query row (laid out like lse); dq_accum zeroed.
//  2. main:   one CTA per (key block, kv head, sequence) keeps K, V in shared memory and
//             dK, dV in registers, and walks the query blocks that see its keys (a mask
//             policy, as in the forward) for every q head of its GQA group: recompute
//             P from lse, dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q,
//             and dq_accum += dS K with fp32 atomics. dK and dV are complete when the CTA
//             ends (the group's q heads are summed in registers, no atomics).
//  3. dq:     dq = scale * dq_accum in the input dtype.
// The softmax scale (and the softcap derivative) is applied to dS; scale multiplies dK
// and dq at the end.
#pragma once

#include "attnkit/softmax.h"
#include "cuda/check.h"
#include "cuda/prefill/common.cuh"
#include "cuda/prefill/launch.h"

namespace attnkit::cuda::prefill {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_>
struct BwdConfig {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static_assert(kBlockM == 64 && kBlockN == 64 && kWarps % 4 == 0, "warp tiling below assumes 64 x 64 blocks");
  using Smem = SmemTiles<Element, kHeadDim>;
  using SmemP = SmemTiles<Element, kBlockN>;  // P and dS tiles: kBlockM x kBlockN
  // One MMA tiling serves the five GEMMs: C tiles are 64 rows (4 warps of 16) by
  // kBlockN or kHeadDim columns (kWarps / 4 warps side by side).
  using TiledMma = TiledMMA<typename MmaAtomFor<Element>::type, Layout<Shape<_4, Int<kWarps / 4>, _1>>,
                            Tile<_64, Int<16 * kWarps / 4>, _16>>;
  using LayoutQ = typename Smem::template Tile<kBlockM>;    // Q, dO
  using LayoutQt = typename Smem::template TileT<kBlockM>;  // (head_dim, kBlockM)
  using LayoutKV = typename Smem::template Tile<kBlockN>;   // K, V
  using LayoutKt = typename Smem::template TileT<kBlockN>;  // (head_dim, kBlockN)
  using LayoutP = typename SmemP::template Tile<kBlockM>;   // P, dS
  using LayoutPt = typename SmemP::template TileT<kBlockM>; // (kBlockN, kBlockM)
  static constexpr int kSmemBytes =
      int(sizeof(Element)) * (2 * kBlockM * kHeadDim + 2 * kBlockN * kHeadDim + 2 * kBlockM * kBlockN) +
      2 * kBlockM * int(sizeof(float));
};

// 8 warps from head_dim 128 up keep the dK and dV accumulators within the registers.
template <typename Element, int kHeadDim>
struct BwdConfigFor : BwdConfig<Element, kHeadDim, 64, 64, (kHeadDim >= 128 ? 8 : 4)> {};

constexpr int kRowWarps = 8;  // rows kernels: one warp per row, 8 rows per CTA
constexpr int kRowVec = 8;    // channels per lane and access: 16 bytes of fp16 / bf16 (the bindings
                              // give rows 16-byte aligned and head_dim a multiple of 8)

// Kernel 1: delta = rowsum(dO * O) (- grad_lse) and dq_accum = 0 for every query row.
template <typename Element>
__global__ void __launch_bounds__(32 * kRowWarps) bwd_rows_kernel(const __grid_constant__ AttentionBwdParams bp) {
  const AttentionParams& p = bp.fwd;
  const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % 32;
  const int row = blockIdx.x * kRowWarps + threadIdx.x / 32;
  const Sequence seq = sequence_of(p, b);
  if (row >= seq.len_q) return;
  const Element* o = static_cast<const Element*>(p.out) + offset_of(p.out_strides, b, seq.row_q + row, h);
  const Element* d_o = static_cast<const Element*>(bp.dout) + offset_of(bp.dout_strides, b, seq.row_q + row, h);
  float* acc = bp.dq_accum + offset_of(bp.dq_accum_strides, b, seq.row_q + row, h);
  float dot = 0.f;
  for (int c = lane * kRowVec; c < p.head_dim; c += 32 * kRowVec) {
    const uint4 o_bits = *reinterpret_cast<const uint4*>(o + c);
    const uint4 do_bits = *reinterpret_cast<const uint4*>(d_o + c);
    const Element* o_vec = reinterpret_cast<const Element*>(&o_bits);
    const Element* do_vec = reinterpret_cast<const Element*>(&do_bits);
    CUTE_UNROLL
    for (int i = 0; i < kRowVec; ++i) dot += float(o_vec[i]) * float(do_vec[i]);
    reinterpret_cast<float4*>(acc + c)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    reinterpret_cast<float4*>(acc + c)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffff, dot, offset);
  const int64_t lse_index = lse_offset(p, b, h, seq) + row;
  if (lane == 0) bp.delta[lse_index] = bp.grad_lse ? dot - bp.grad_lse[lse_index] : dot;
}

// Kernel 3: dq = scale * dq_accum.
template <typename Element>
__global__ void __launch_bounds__(32 * kRowWarps) bwd_dq_kernel(const __grid_constant__ AttentionBwdParams bp) {
  const AttentionParams& p = bp.fwd;
  const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % 32;
  const int row = blockIdx.x * kRowWarps + threadIdx.x / 32;
  const Sequence seq = sequence_of(p, b);
  if (row >= seq.len_q) return;
  const float* acc = bp.dq_accum + offset_of(bp.dq_accum_strides, b, seq.row_q + row, h);
  Element* dq = static_cast<Element*>(bp.dq) + offset_of(bp.dq_strides, b, seq.row_q + row, h);
  for (int c = lane * kRowVec; c < p.head_dim; c += 32 * kRowVec) {
    const float4 lo = reinterpret_cast<const float4*>(acc + c)[0], hi = reinterpret_cast<const float4*>(acc + c)[1];
    const float values[kRowVec] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    cutlass::Array<Element, kRowVec> out;
    CUTE_UNROLL
    for (int i = 0; i < kRowVec; ++i) out[i] = Element(values[i] * p.scale);
    *reinterpret_cast<uint4*>(dq + c) = *reinterpret_cast<const uint4*>(&out);
  }
}

// Writes an fp32 accumulator tile (rows x head_dim) times `scale` as Element, skipping rows
// >= rows_left and columns >= cols. coords: the identity tile partitioned like acc.
template <typename Element, typename Acc, typename Coords>
__device__ __forceinline__ void store_acc(const Acc& acc, const Coords& coords, Element* base, int64_t row_stride,
                                          int rows_left, int cols, float scale) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int r = get<0>(coords(i)), c = get<1>(coords(i));
    if (r < rows_left && c < cols) base[r * row_stride + c] = Element(acc(i) * scale);
  }
}

// The mask policy of the backward, the forward's (fwd.cuh) seen from a key block: built per
// key block from the params, its Args, the sequence, the block's sequence and its first key,
// it offers first(h) the first query block q head h visits (asked again to restart for each
// q head of the GQA group; invalid when that head visits none), next(m) the block after
// block m (asked once per visited block, in order), valid(m), needs_mask(m) and
// apply(acc, coords, h, m) as in the forward, for q head h.
template <int kBlockM, int kBlockN>
struct PrefillBwdMask {
  struct Args {};
  AttentionMask mask;
  KeyRange tiles;
  int n0;
  const AttentionParams& p;  // the kernel's __grid_constant__ parameter: ALiBi slopes per head
  int b;

  __device__ PrefillBwdMask(const AttentionParams& p_, const Args&, const Sequence& seq, int b_, int n0_)
      : mask(seq.len_q, seq.len_k, p_.causal, p_.window_left, p_.window_right, p_.sink_tokens),
        tiles(tiles_of(mask.rows_of_keys(n0_, n0_ + kBlockN), kBlockM)),
        n0(n0_),
        p(p_),
        b(b_) {}
  __device__ int first(int) const { return tiles.begin; }
  __device__ int next(int m) const { return m + 1; }
  __device__ bool valid(int m) const { return m < tiles.end; }
  __device__ bool needs_mask(int m) const {
    return p.alibi_slopes || !mask.block_fully_visible(m * kBlockM, (m + 1) * kBlockM, n0, n0 + kBlockN);
  }
  template <typename Acc, typename Coords>
  __device__ void apply(Acc& acc, const Coords& coords, int h, int m) const {
    apply_mask(acc, coords, mask, m * kBlockM, n0);
    if (p.alibi_slopes)  // slope in accumulator units, as in the forward
      add_alibi(acc, coords, mask, m * kBlockM, n0, p.alibi_slope(b, h) / (p.softcap > 0.f ? 1.f : p.scale));
  }
};

// Kernel 2: dK, dV of one key block; dS K added into dq_accum.
template <typename Cfg, typename Policy>
__global__ void __launch_bounds__(Cfg::kThreads)
    bwd_main_kernel(const __grid_constant__ AttentionBwdParams bp, const __grid_constant__ typename Policy::Args args) {
  using Element = typename Cfg::Element;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(128) char smem[];
  const AttentionParams& p = bp.fwd;

  const int n_block = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const Sequence seq = sequence_of(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.len_k) return;
  const int keys_left = seq.len_k - n0;
  const int group = p.heads_q / p.heads_kv;
  Policy policy(p, args, seq, b, n0);

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
  Tensor gK = local_tile(gmem_rows<Element>(p.k, offset_of(p.k_strides, b, seq.row_k, h_kv), seq.len_k, p.head_dim,
                                            p.k_strides.row),
                         TileKV{}, make_coord(n_block, 0));
  Tensor gV = local_tile(gmem_rows<Element>(p.v, offset_of(p.v_strides, b, seq.row_k, h_kv), seq.len_k, p.head_dim,
                                            p.v_strides.row),
                         TileKV{}, make_coord(n_block, 0));
  const Tensor cQ = make_identity_tensor(TileQ{});
  const Tensor cKV = make_identity_tensor(TileKV{});

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Cfg::LayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Cfg::LayoutQ{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Cfg::LayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Cfg::LayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Cfg::LayoutP{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Cfg::LayoutP{});
  float* s_lse = reinterpret_cast<float*>(raw_pointer_cast((sdS.data() + size(sdS))));  // log2-scaled lse
  float* s_delta = s_lse + kBlockM;
  Tensor sQt = make_tensor(sQ.data(), typename Cfg::LayoutQt{});
  Tensor sdOt = make_tensor(sdO.data(), typename Cfg::LayoutQt{});
  Tensor sKt = make_tensor(sK.data(), typename Cfg::LayoutKt{});
  Tensor sPt = make_tensor(sP.data(), typename Cfg::LayoutPt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Cfg::LayoutPt{});

  typename Cfg::Smem::template GmemLoad<kThreads> gmem_load;
  auto thr_load = gmem_load.get_thread_slice(tid);
  Tensor tQsQ = thr_load.partition_D(sQ);
  Tensor tQsdO = thr_load.partition_D(sdO);
  Tensor tQc = thr_load.partition_S(cQ);
  Tensor tKVc = thr_load.partition_S(cKV);
  copy_tile<true>(gmem_load, thr_load.partition_S(gK), thr_load.partition_D(sK), tKVc, keys_left, p.head_dim);
  copy_tile<true>(gmem_load, thr_load.partition_S(gV), thr_load.partition_D(sV), tKVc, keys_left, p.head_dim);
  cp_async_fence();

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  // S = Q K^T and dP = dO V^T
  auto copy_a_n = make_tiled_copy_A(LdsmN{}, mma);
  auto thr_a_n = copy_a_n.get_thread_slice(tid);
  auto copy_b_n = make_tiled_copy_B(LdsmN{}, mma);
  auto thr_b_n = copy_b_n.get_thread_slice(tid);
  // dV = P^T dO, dK = dS^T Q (transposed A and B), dQ = dS K (transposed B)
  auto copy_a_t = make_tiled_copy_A(LdsmT{}, mma);
  auto thr_a_t = copy_a_t.get_thread_slice(tid);
  auto copy_b_t = make_tiled_copy_B(LdsmT{}, mma);
  auto thr_b_t = copy_b_t.get_thread_slice(tid);

  Tensor rQ = thr_mma.partition_fragment_A(sQ);
  Tensor rdO = thr_mma.partition_fragment_A(sdO);
  Tensor rK = thr_mma.partition_fragment_B(sK);
  Tensor rV = thr_mma.partition_fragment_B(sV);
  Tensor rPt = thr_mma.partition_fragment_A(sPt);
  Tensor rdSt = thr_mma.partition_fragment_A(sdSt);
  Tensor rdOt = thr_mma.partition_fragment_B(sdOt);
  Tensor rQt = thr_mma.partition_fragment_B(sQt);
  Tensor rdS = thr_mma.partition_fragment_A(sdS);
  Tensor rKt = thr_mma.partition_fragment_B(sKt);

  Tensor acc_dk = partition_fragment_C(mma, TileKV{});
  Tensor acc_dv = partition_fragment_C(mma, TileKV{});
  clear(acc_dk);
  clear(acc_dv);

  const bool capped = p.softcap > 0.f;
  const float logit_scale = capped ? 1.f : p.scale;
  const float scale_log2 = logit_scale * float(M_LOG2E);
  const Tensor tScS = thr_mma.partition_C(make_identity_tensor(TileS{}));
  auto copy_p = make_tiled_copy_C(Copy_Atom<DefaultCopy, Element>{}, mma);
  auto thr_copy_p = copy_p.get_thread_slice(tid);

  // The steps are (q head g of the group, query block m) pairs, walked with the next step
  // known ahead, so that its Q and dO loads can be issued as soon as the current step is
  // done reading sdO (after dV) and sQ (after dK): they land while dK and dQ are computed.
  const auto tile_of = [&](const void* base, const Strides& strides, int g, int m) {
    return local_tile(gmem_rows<Element>(base, offset_of(strides, b, seq.row_q, h_kv * group + g), seq.len_q,
                                         p.head_dim, strides.row),
                      TileQ{}, make_coord(m, 0));
  };
  const auto load_q = [&](int g, int m) {
    copy_tile<true>(gmem_load, thr_load.partition_S(tile_of(p.q, p.q_strides, g, m)), tQsQ, tQc,
                    seq.len_q - m * kBlockM, p.head_dim);
    cp_async_fence();
  };
  const auto load_do = [&](int g, int m) {
    copy_tile<true>(gmem_load, thr_load.partition_S(tile_of(bp.dout, bp.dout_strides, g, m)), tQsdO, tQc,
                    seq.len_q - m * kBlockM, p.head_dim);
    cp_async_fence();
  };
  // The first step of q head g or of a later one of the group that visits a query block
  // (g == group: none does).
  const auto first_step = [&](int& g, int& m) {
    for (; g < group; ++g)
      if (policy.valid(m = policy.first(h_kv * group + g))) return;
  };
  int g = 0, m;
  first_step(g, m);
  bool more = g < group;
  if (more) {
    load_q(g, m);
    load_do(g, m);
  }

  while (more) {
    int g_next = g, m_next = policy.next(m);
    if (!policy.valid(m_next)) first_step(++g_next, m_next);
    more = g_next < group;
    const int h = h_kv * group + g;
    const int m0 = m * kBlockM;
    const int rows_left = seq.len_q - m0;
    const int64_t lse_row0 = lse_offset(p, b, h, seq);
    // The previous step read s_lse / s_delta before its first barrier after them, which
    // every thread has passed by now.
    for (int r = tid; r < kBlockM; r += kThreads) {
      // Padding rows and rows that see no key (lse = -inf) get P = exp2(s - inf) = 0.
      const float lse = r < rows_left ? p.lse[lse_row0 + m0 + r] : -INFINITY;
      s_lse[r] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
      s_delta[r] = r < rows_left ? bp.delta[lse_row0 + m0 + r] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V) landed; s_lse, s_delta written; sP, sdS free

    // S = Q K^T -> P = exp(logit - lse), masked.
    Tensor acc_s = partition_fragment_C(mma, TileS{});
    clear(acc_s);
    gemm_ss(acc_s, rQ, rK, thr_a_n.partition_S(sQ), thr_b_n.partition_S(sK), mma, copy_a_n, copy_b_n, thr_a_n,
            thr_b_n);
    if (capped) apply_softcap(acc_s, p.scale, p.softcap);
    Tensor capped_logits = make_fragment_like(acc_s);  // for the softcap derivative
    if (capped) copy(acc_s, capped_logits);
    if (policy.needs_mask(m)) policy.apply(acc_s, tScS, h, m);
    CUTE_UNROLL
    for (int e = 0; e < size(acc_s); ++e)
      acc_s(e) = fast_exp2(acc_s(e) * scale_log2 - s_lse[get<0>(tScS(e))]);

    // dP = dO V^T -> dS = P (dP - delta) (times the softcap derivative).
    Tensor acc_dp = partition_fragment_C(mma, TileS{});
    clear(acc_dp);
    gemm_ss(acc_dp, rdO, rV, thr_a_n.partition_S(sdO), thr_b_n.partition_S(sV), mma, copy_a_n, copy_b_n, thr_a_n,
            thr_b_n);
    CUTE_UNROLL
    for (int e = 0; e < size(acc_dp); ++e) {
      float ds = acc_s(e) * (acc_dp(e) - s_delta[get<0>(tScS(e))]);
      if (capped) ds *= softcap_grad(capped_logits(e), p.softcap);
      acc_dp(e) = ds;
    }
    // P and dS go through shared memory: the next GEMMs read them transposed.
    copy(copy_p, thr_copy_p.retile_S(convert_fragment<Element>(acc_s)), thr_copy_p.partition_D(sP));
    copy(copy_p, thr_copy_p.retile_S(convert_fragment<Element>(acc_dp)), thr_copy_p.partition_D(sdS));
    __syncthreads();

    gemm_ss(acc_dv, rPt, rdOt, thr_a_t.partition_S(sPt), thr_b_t.partition_S(sdOt), mma, copy_a_t, copy_b_t,
            thr_a_t, thr_b_t);
    __syncthreads();  // every warp is done with sdO
    if (more) load_do(g_next, m_next);
    gemm_ss(acc_dk, rdSt, rQt, thr_a_t.partition_S(sdSt), thr_b_t.partition_S(sQt), mma, copy_a_t, copy_b_t,
            thr_a_t, thr_b_t);
    __syncthreads();  // every warp is done with sQ
    if (more) load_q(g_next, m_next);
    Tensor acc_dq = partition_fragment_C(mma, TileQ{});
    clear(acc_dq);
    gemm_ss(acc_dq, rdS, rKt, thr_a_n.partition_S(sdS), thr_b_t.partition_S(sKt), mma, copy_a_n, copy_b_t, thr_a_n,
            thr_b_t);
    float* dq_accum = bp.dq_accum + offset_of(bp.dq_accum_strides, b, seq.row_q + m0, h);
    const Tensor tdQc = thr_mma.partition_C(cQ);
    CUTE_UNROLL
    for (int e = 0; e < size(acc_dq); ++e) {
      const int r = get<0>(tdQc(e)), c = get<1>(tdQc(e));
      if (r < rows_left && c < p.head_dim) atomicAdd(dq_accum + r * bp.dq_accum_strides.row + c, acc_dq(e));
    }
    g = g_next;
    m = m_next;
  }

  cp_async_wait<0>();  // K and V may still be landing when no query block saw them
  const Tensor tdKc = thr_mma.partition_C(cKV);
  store_acc(acc_dk, tdKc, static_cast<Element*>(bp.dk) + offset_of(bp.dk_strides, b, seq.row_k + n0, h_kv),
            bp.dk_strides.row, keys_left, p.head_dim, p.scale);
  store_acc(acc_dv, tdKc, static_cast<Element*>(bp.dv) + offset_of(bp.dv_strides, b, seq.row_k + n0, h_kv),
            bp.dv_strides.row, keys_left, p.head_dim, 1.f);
}

// Launches the three backward kernels of (Element, kHeadDim), the main one with mask policy
// Policy<kBlockM, kBlockN>.
template <typename Element, int kHeadDim, template <int, int> class Policy>
void launch_bwd_with(const AttentionBwdParams& bp,
                     const typename Policy<BwdConfigFor<Element, kHeadDim>::kBlockM,
                                           BwdConfigFor<Element, kHeadDim>::kBlockN>::Args& args,
                     cudaStream_t stream, const char* op) {
  const AttentionParams& p = bp.fwd;
  const dim3 row_grid((p.seqlen_q + kRowWarps - 1) / kRowWarps, p.heads_q, p.batch);
  bwd_rows_kernel<Element><<<row_grid, 32 * kRowWarps, 0, stream>>>(bp);
  check(cudaGetLastError(), op);

  using Cfg = BwdConfigFor<Element, kHeadDim>;
  auto kernel = bwd_main_kernel<Cfg, Policy<Cfg::kBlockM, Cfg::kBlockN>>;
  constexpr int smem = Cfg::kSmemBytes;
  if constexpr (smem > 48 * 1024) {
    require_shared_memory(smem, op, kHeadDim);
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), op);
  }
  const dim3 grid((p.seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN, p.heads_kv, p.batch);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(bp, args);
  check(cudaGetLastError(), op);

  bwd_dq_kernel<Element><<<row_grid, 32 * kRowWarps, 0, stream>>>(bp);
  check(cudaGetLastError(), op);
}

template <typename Element, int kHeadDim>
void launch_bwd(const AttentionBwdParams& bp, cudaStream_t stream) {
  launch_bwd_with<Element, kHeadDim, PrefillBwdMask>(bp, {}, stream, "attention_bwd launch");
}

}  // namespace attnkit::cuda::prefill
