// CUDA decode with the lean (stream-K) schedule of attnkit/schedule.h; docs/decode.md
// ("CUDA") explains the design. Dense and sparse decode (selected pages or tokens, see
// decode_layout.h) share every kernel. Three or four launches, none of whose sizes depends
// on the values of cache_seqlens or the selection, so a decode step can be captured in a
// CUDA graph. cache_seqlens is read by the first launch only, which writes its clamped
// values into the workspace (the snapshot); the later launches read the snapshot, so a
// length rewritten meanwhile (another stream) cannot make them disagree.
//  0. pair_keys_kernel (sparse only), a block per sequence: the snapshot seq_len[b] and the
//     length of each pair's work axis (pair_keys), a warp per pair.
//  1. offsets_kernel: dense: the snapshot seq_len from cache_seqlens; then
//     lean_seq_offsets() of the schedule's lengths (seq_len, or pair_keys) into the
//     workspace (one block, a prefix sum of the tile counts).
//  2. lean_kernel: W CTAs (W = SMs x resident CTAs per SM, from the occupancy API);
//     CTA w walks its share of KV tiles with for_each_lean_item().
//     An item (sequence b, kv head h, tiles [t0, t1)) runs all rows of the pair (the q
//     heads of h times the seqlen_q queries, kRows per pass) over its tiles with online
//     softmax: K/V tiles stream through shared memory with cp.async double buffering
//     (16-byte copies, rows found per key: selection, then block_table), scores
//     and P @ V on CUDA cores in fp32; the softmax runs in base 2 (log2(e) folded into the q
//     scale, exp2f), its lse is returned in natural log. It writes the final output when it
//     holds the whole pair, else an fp32 partial (out, lse) to its slot in the workspace
//     (only a worker's first and last items can be partial: 2 slots per worker at most).
//     A quantized cache (docs/quantization.md) streams its code bytes instead, 16 bytes
//     (16 int8 / fp8 or 32 int4 channels) per cp.async as for a plain cache, and each key's
//     scales (and zeros), and is dequantized in registers where the plain kernel converts to
//     float, through attnkit/quant.h's dequantize_words: no dequantized copy is ever written.
//  3. merge_kernel: each pair split over several workers merges its slots in key order with
//     merge_weights() (pair_partials() finds them); pairs with no visible key get out 0 and
//     lse -inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <stdexcept>

#include "attnkit/decode_layout.h"
#include "attnkit/mask.h"
#include "attnkit/quant.h"
#include "attnkit/schedule.h"
#include "attnkit/softmax.h"
#include "cuda/check.h"
#include "cuda/convert.cuh"
#include "cuda/kernels.h"
#include "cuda/quant/warp_row.cuh"

namespace attnkit::cuda {
namespace {

constexpr int kThreads = 128;     // 4 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;         // rows (q head x query) of a pair per pass over its tiles
// __launch_bounds__ minimum of resident CTAs per SM: a register budget, not the grid (the
// grid is SMs x what the occupancy API reports, prepare_lean_kernel()). 2: up to 255
// registers per thread; 3 for plain head_dim 64 (41 KB of shared memory), which fits in 168
// registers without spilling (ptxas -v), so three CTAs can share an SM there.
template <int kHeadDim, typename Kv>
constexpr int min_ctas_per_sm() { return kHeadDim == 64 && !Kv::kQuantized ? 3 : 2; }
constexpr int kOffsetThreads = 256;

// Kernels exist for head_dim 64, 128 and 256; a smaller multiple of 8 runs on the next one
// with its extra columns zero (loaded as 0, never stored).
constexpr int padded_head_dim(int head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }
// Keys per tile: K and V tiles of 16 KB (head_dim 64: 8 KB) each, double buffered.
constexpr int tile_keys_for(int head_dim) { return padded_head_dim(head_dim) <= 128 ? 64 : 32; }

template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};

// What the K/V tiles hold: a plain cache's elements of type T, or a quantized cache's codes
// of format F plus per key kMaxGroups scales and zeros. Tiles are copied and swizzled in
// units of 16 bytes (8 channels of T, 16 of int8 / fp8, 32 of int4); a chunk is the 8
// channels a P @ V thread reads (kChunkBytes: 16, 8 or 4 bytes).
template <typename T>
struct PlainKV {
  static constexpr bool kQuantized = false;
  static constexpr int kChunkBytes = 8 * int(sizeof(T));
};
template <KVFormat F>
struct QuantKV {
  static constexpr bool kQuantized = true;
  static constexpr KVFormat kFormat = F;
  static constexpr int kChunkBytes = F == KVFormat::kInt4 ? 4 : 8;
};

// Tile config of one (dtype, head_dim, K/V storage).
template <typename T, int kHeadDim, typename Kv>
struct Config {
  static constexpr int kD = kHeadDim;
  static constexpr int kChunks = kHeadDim / 8;  // chunks of 8 channels per K/V row
  static constexpr int kChunksPerUnit = 16 / Kv::kChunkBytes;
  static constexpr int kUnitChannels = 8 * kChunksPerUnit;
  static constexpr int kUnits = kHeadDim / kUnitChannels;  // 16-byte units per K/V row
  static constexpr int kTileKeys = tile_keys_for(kHeadDim);
  // Scores: thread = (key of the tile, group of kRowsS rows); a warp shares its rows.
  static constexpr int kRowGroupsS = kThreads / kTileKeys;
  static constexpr int kRowsS = kRows / kRowGroupsS;
  // P @ V: thread = (8-channel column chunk, group of kRowsPV rows).
  static constexpr int kRowGroupsPV = kThreads / kChunks;
  static constexpr int kRowsPV = kRows / kRowGroupsPV;
  static_assert(kChunks >= 8 && kChunks <= 32, "the thread maps need head_dim in [64, 256]");
  static_assert(kUnits >= 2 && kUnits <= 32 && (kUnits & (kUnits - 1)) == 0, "swizzle");
  static_assert(kTileKeys >= 32 && kThreads % kTileKeys == 0 && kRows % kRowGroupsS == 0, "score map");
  static_assert(kThreads % kChunks == 0 && kRows % kRowGroupsPV == 0, "P @ V map");
  static_assert(kTileKeys % 32 == 0 && kRows % kWarps == 0, "softmax map");

  // Shared memory, in bytes from the start.
  static constexpr int kQBytes = kRows * kD * 4;              // float q rows, pre-scaled
  static constexpr int kTileBytes = kTileKeys * kUnits * 16;
  // Quantized: per buffer and key, the scale and zero of each group (groups >= 32 channels).
  static constexpr int kMaxGroups = kD / 32;
  static constexpr int kScaleBytes = Kv::kQuantized ? 2 * kTileKeys * kMaxGroups * 4 : 0;
  static constexpr int kSBytes = kRows * kTileKeys * 4;       // scores, then probabilities
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + 2 * kTileBytes;
  static constexpr int kSOffset = kVOffset + 2 * kTileBytes;
  static constexpr int kRowOffset = kSOffset + kSBytes;       // per row: factor, inv_sum
  static constexpr int kPosOffset = kRowOffset + 2 * kRows * 4;  // per buffer and key: token or -1
  static constexpr int kScaleOffset = kPosOffset + 2 * kTileKeys * 4;  // K scale, K zero, V scale, V zero
  static constexpr int kSmemBytes = kScaleOffset + 4 * kScaleBytes;

  // Byte offset of 16-byte unit u of tile row j, XOR-swizzled so that 8 consecutive rows
  // read at one unit (the score loop) hit the 8 different 16-byte bank groups: rows of >= 8
  // units permute their units by j % 8; shorter rows (2 or 4 units, quantized) share a
  // 128-byte line and permute the units of the line by the line's index.
  __device__ static int unit_offset(int j, int u) {
    if constexpr (kUnits >= 8) {
      return (j * kUnits + (u ^ (j & 7))) * 16;
    } else {
      constexpr int kRowsPerLine = 8 / kUnits;
      const int line = j / kRowsPerLine;
      return (line * 8 + (((j % kRowsPerLine) * kUnits + u) ^ (line & 7))) * 16;
    }
  }
  // Byte offset of chunk c (8 channels) of tile row j: inside its unit, unswizzled.
  __device__ static int chunk_offset(int j, int c) {
    return unit_offset(j, c / kChunksPerUnit) + c % kChunksPerUnit * Kv::kChunkBytes;
  }
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: zero-fill (keys past the sequence)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}
// A 4-byte copy (a scale or zero of a quantized cache), through L1: .cg takes 16 bytes only.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The words of one chunk (8 channels) in shared memory: one 16-, 8- or 4-byte load.
template <int kBytes>
struct alignas(kBytes) ChunkWords {
  uint32_t w[kBytes / 4];
};

// 8 channels as floats from the words of their chunk: plain T converted, or codes
// dequantized with scale and zero by attnkit/quant.h (dequantize_kv's decoder).
template <typename T, typename Kv>
__device__ __forceinline__ void chunk_to_float(const uint32_t* w, float scale, float zero, float (&x)[8]) {
  if constexpr (!Kv::kQuantized) {
    Vec8<T> v;
    memcpy(&v, w, sizeof(v));
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = to_float(v.v[i]);
  } else {
    dequantize_words<Kv::kFormat, kWordsPer8Channels<Kv::kFormat>>(w, scale, zero, x);
  }
}

// 0. Sparse: a block per sequence b. Thread 0 reads cache_seqlens[b] (the only read of it)
//    into the snapshot seq_len[b], clamped to [0, capacity]; warp w then finds
//    pair_keys[b * heads_kv + h] = decode_pair_keys() for h = w, w + 8, ...: its lanes test
//    32 selection entries at a time from the end, and the first chunk holding a valid entry
//    ends the search (every lane runs the same iterations, so the ballot sees the full warp).
constexpr int kPairKeysThreads = 256;
__global__ void __launch_bounds__(kPairKeysThreads) pair_keys_kernel(const __grid_constant__ DecodeParams p,
                                                                      const int capacity, int32_t* seq_len,
                                                                      int32_t* pair_keys) {
  __shared__ int len_s;
  const int b = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    len_s = max(0, min(p.cache_seqlens[b], capacity));
    seq_len[b] = len_s;
  }
  __syncthreads();
  const int len = len_s;
  for (int h = warp; h < p.heads_kv; h += kPairKeysThreads / 32) {
    int last = -1;
    for (int base = (p.selection_len - 1) / 32 * 32; base >= 0 && last < 0; base -= 32) {
      const int e = base + lane;
      const unsigned valid = __ballot_sync(0xffffffffu, e < p.selection_len && decode_entry_valid(p, b, h, e, len));
      if (valid != 0u) last = base + 31 - __clz(valid);
    }
    if (lane == 0) pair_keys[int64_t(b) * p.heads_kv + h] = (last + 1) * p.selection_unit;
  }
}

// 1. One block: lens[b] = source[b] clamped to [0, shape.max_seqlen_k], each read once by
//    one thread (dense: source = cache_seqlens and lens = the snapshot seq_len; sparse:
//    both pair_keys, already in range), then seq_offset[0..shape.batch] =
//    lean_seq_offsets(shape, lens) by a block-wide prefix sum.
__global__ void __launch_bounds__(kOffsetThreads) offsets_kernel(const LeanShape shape, const int32_t* source,
                                                                  int32_t* lens, int64_t* seq_offset) {
  using Scan = cub::BlockScan<int64_t, kOffsetThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int per = ceil_div_nonneg(shape.batch, kOffsetThreads);
  const int b0 = int(min(int64_t(shape.batch), int64_t(threadIdx.x) * per));
  const int b1 = int(min(int64_t(shape.batch), int64_t(b0) + per));
  int64_t local = 0;
  for (int b = b0; b < b1; ++b) {
    const int len = max(0, min(source[b], shape.max_seqlen_k));
    lens[b] = len;  // sparse: source == lens, the same thread's element
    local += int64_t(shape.head_groups) * shape.tiles(len).size();
  }
  int64_t run;
  Scan(scan_storage).ExclusiveSum(local, run);
  if (threadIdx.x == 0) seq_offset[0] = 0;
  for (int b = b0; b < b1; ++b) {
    run += int64_t(shape.head_groups) * shape.tiles(lens[b]).size();  // this thread's own writes
    seq_offset[b + 1] = run;
  }
}

// 2. The lean pass: CTA w = worker w. It reads the lengths from the snapshot only. Logits are
// base 2 (RowSoftmax2 of softmax.h, exp2f instead of expf; its lse() is natural-log):
// q_scale = scale * log2(e) (one rounding) and softcap = p.softcap * log2(e), as
// log2(e) c tanh(s / c) = c' tanh(s' / c') with s' = log2(e) s, c' = log2(e) c. (Kernel
// arguments, like p, live in the constant bank: no registers.)
// A minimum of two CTAs per SM lets ptxas use up to 255 registers: with
// __launch_bounds__(kThreads) alone it capped the kernel at 128 and spilled (docs/decode.md).
template <typename T, int kHeadDim, typename Kv>
__global__ void __launch_bounds__(kThreads, (min_ctas_per_sm<kHeadDim, Kv>()))
    lean_kernel(const __grid_constant__ DecodeParams p, const LeanShape shape, const int workers, char* workspace,
                const float q_scale, const float softcap) {
  using C = Config<T, kHeadDim, Kv>;
  constexpr int kD = C::kD, kTK = C::kTileKeys, kChunks = C::kChunks, kUnits = C::kUnits;
  extern __shared__ __align__(16) char smem[];
  float* q_s = reinterpret_cast<float*>(smem);
  char* k_s = smem + C::kKOffset;
  char* v_s = smem + C::kVOffset;
  // Quantized: [K scale, K zero, V scale, V zero][buffer][key][group].
  float* scales_s = reinterpret_cast<float*>(smem + C::kScaleOffset);
  constexpr int kScaleFloats = C::kScaleBytes / 4;
  float* s_s = reinterpret_cast<float*>(smem + C::kSOffset);
  float* factor_s = reinterpret_cast<float*>(smem + C::kRowOffset);
  float* inv_sum_s = factor_s + kRows;
  int* pos_s = reinterpret_cast<int*>(smem + C::kPosOffset);

  const DecodeWorkspace ws = DecodeWorkspace::make(p, shape, lean_bounds(shape, workers).num_slots);
  const int64_t* seq_offset = reinterpret_cast<const int64_t*>(workspace + ws.seq_offset_bytes);
  const int32_t* seq_len = reinterpret_cast<const int32_t*>(workspace + ws.seq_len_bytes);
  const int32_t* lens = reinterpret_cast<const int32_t*>(workspace + ws.lean_lengths_bytes());
  float* part_lse = reinterpret_cast<float*>(workspace + ws.lse_bytes);
  float* part_out = reinterpret_cast<float*>(workspace + ws.out_bytes);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = p.heads_q / p.heads_kv, rows = group * p.seqlen_q;
  const int head_chunks = p.head_dim / 8;  // columns past head_dim (kD rounds it up) are 0
  const int head_units = p.head_dim / C::kUnitChannels;  // quantized: head_dim % 32 == 0
  const int group_shift = p.k_quant.group_shift();  // quantized: the group of channel c is c >> group_shift
  const char* k_cache = static_cast<const char*>(p.k_cache);
  const char* v_cache = static_cast<const char*>(p.v_cache);

  for_each_lean_item(shape, lens, seq_offset, workers, int(blockIdx.x), [&](const LeanItem& item) {
    const int pair = item.pair(shape.head_groups), b = pair / p.heads_kv, h = pair % p.heads_kv;
    const int len = seq_len[b];  // the snapshot, clamped
    const AttentionMask mask(p.seqlen_q, len, /*causal=*/true, p.window_left, -1);

    // K and V of work keys [tile * kTK, +kTK) into buffer `buf`, 16 bytes per cp.async, and
    // their token positions; keys naming no token are zero-filled (and masked through their
    // position -1).
    auto load_tile = [&](int tile, int buf) {
      for (int idx = tid; idx < kTK * kUnits; idx += kThreads) {
        const int j = idx / kUnits, u = idx % kUnits, channel = u * C::kUnitChannels;
        const int pos = decode_key_position(p, b, h, tile * kTK + j, len);
        if (u == 0) pos_s[buf * kTK + j] = pos;
        const bool valid = pos >= 0 && u < head_units;  // else zero-filled
        const int64_t k_off = valid ? decode_kv_offset(p, p.k_strides, b, pos, h) : 0;
        const int64_t v_off = valid ? decode_kv_offset(p, p.v_strides, b, pos, h) : 0;
        const int dst = buf * C::kTileBytes + C::unit_offset(j, u);
        if constexpr (!Kv::kQuantized) {
          cp_async_16(k_s + dst, k_cache + (k_off + channel) * int64_t(sizeof(T)), valid);
          cp_async_16(v_s + dst, v_cache + (v_off + channel) * int64_t(sizeof(T)), valid);
        } else {  // offsets count rows: codes, then the group's scale / zero if u starts a group
          cp_async_16(k_s + dst, p.k_quant.codes(k_off, channel), valid);
          cp_async_16(v_s + dst, p.v_quant.codes(v_off, channel), valid);
          if (channel == channel >> group_shift << group_shift) {
            const int slot = (buf * kTK + j) * C::kMaxGroups + (channel >> group_shift);
            const int64_t kg = valid ? p.k_quant.group_of(k_off, channel) : 0;
            const int64_t vg = valid ? p.v_quant.group_of(v_off, channel) : 0;
            cp_async_4(scales_s + slot, p.k_quant.scale + kg, valid);
            cp_async_4(scales_s + 2 * kScaleFloats + slot, p.v_quant.scale + vg, valid);
            if (p.k_quant.zero != nullptr) {
              cp_async_4(scales_s + kScaleFloats + slot, p.k_quant.zero + kg, valid);
              cp_async_4(scales_s + 3 * kScaleFloats + slot, p.v_quant.zero + vg, valid);
            }
          }
        }
      }
    };

    // Scale and zero of channel `channel` of key j of buffer `buf`; which = 0 for K, 2 for V.
    // A plain cache has none (never read).
    auto scale_zero = [&](int buf, int j, int channel, int which) {
      if constexpr (!Kv::kQuantized) {
        return float2{1.f, 0.f};
      } else {
        const int slot = (buf * kTK + j) * C::kMaxGroups + (channel >> group_shift);
        return float2{scales_s[which * kScaleFloats + slot], scales_s[(which + 1) * kScaleFloats + slot]};
      }
    };

    for (int row0 = 0; row0 < rows; row0 += kRows) {
      const int pass_rows = min(kRows, rows - row0);
      __syncthreads();  // the previous pass / item is done with shared memory
      for (int idx = tid; idx < kRows * kD; idx += kThreads) {
        const int r = idx / kD, d = idx % kD;
        float x = 0.f;
        if (r < pass_rows && d < p.head_dim) {
          const DecodeRow row = decode_row(row0 + r, group, h);
          x = to_float(static_cast<const T*>(p.q)[b * p.q_strides.batch + row.query * p.q_strides.row +
                                                 row.head_q * p.q_strides.head + d]) * q_scale;
        }
        q_s[idx] = x;
      }
      if (p.k_quant.rotated) {  // keys stored as H k: rotate the queries instead, (H q) . (H k) = q . k
        __syncthreads();
        for (int r = warp; r < kRows; r += kWarps) warp_hadamard_shared(q_s + r * kD, p.head_dim, lane);
      }
      // Softmax state of the rows this warp owns (rows warp, warp + kWarps, ...), in
      // every lane; the visible keys of those rows.
      RowSoftmax2 state[kRows / kWarps];
      KeyRange visible[kRows / kWarps];
#pragma unroll
      for (int i = 0; i < kRows / kWarps; ++i) {
        const int r = warp + i * kWarps;
        visible[i] = r < pass_rows ? mask.keys_of(decode_row(row0 + r, group, h).query) : KeyRange{0, 0};
      }
      float acc[C::kRowsPV][8];
#pragma unroll
      for (int i = 0; i < C::kRowsPV; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;

      load_tile(item.tile_begin, 0);
      cp_async_commit();
      for (int tile = item.tile_begin; tile < item.tile_end; ++tile) {
        const int buf = (tile - item.tile_begin) & 1;
        if (tile + 1 < item.tile_end) load_tile(tile + 1, buf ^ 1);
        cp_async_commit();  // possibly empty, so that wait_group 1 always means "this tile"
        cp_async_wait_1();
        __syncthreads();

        {  // scores S[r][j] = q_r . k_j (q pre-scaled), one 16-byte unit of k_j per step
          const int j = tid % kTK, rg = tid / kTK;
          float dot[C::kRowsS];
#pragma unroll
          for (int i = 0; i < C::kRowsS; ++i) dot[i] = 0.f;
          constexpr int kUnitUnroll = C::kChunksPerUnit == 1 ? 2 : 1;  // 2 chunks or more per step
#pragma unroll kUnitUnroll
          for (int u = 0; u < kUnits; ++u) {
            const uint4 unit = *reinterpret_cast<const uint4*>(k_s + buf * C::kTileBytes + C::unit_offset(j, u));
            const uint32_t words[4] = {unit.x, unit.y, unit.z, unit.w};
            const float2 sz = scale_zero(buf, j, u * C::kUnitChannels, 0);
#pragma unroll
            for (int k = 0; k < C::kChunksPerUnit; ++k) {
              const int c = u * C::kChunksPerUnit + k;
              float kx[8];
              chunk_to_float<T, Kv>(words + k * Kv::kChunkBytes / 4, sz.x, sz.y, kx);
#pragma unroll
              for (int i = 0; i < C::kRowsS; ++i) {
                const float4* qv = reinterpret_cast<const float4*>(q_s + (rg * C::kRowsS + i) * kD + c * 8);
                const float4 a = qv[0], bq = qv[1];
                dot[i] += a.x * kx[0] + a.y * kx[1] + a.z * kx[2] + a.w * kx[3] + bq.x * kx[4] + bq.y * kx[5] +
                          bq.z * kx[6] + bq.w * kx[7];
              }
            }
          }
#pragma unroll
          for (int i = 0; i < C::kRowsS; ++i) s_s[(rg * C::kRowsS + i) * kTK + j] = dot[i];
        }
        __syncthreads();

        // Online softmax, one warp per row: softcap, mask, rescale, probabilities.
#pragma unroll
        for (int i = 0; i < kRows / kWarps; ++i) {
          const int r = warp + i * kWarps;
          float s[kTK / 32];
          float tile_max = kNegInf;
#pragma unroll
          for (int x = 0; x < kTK / 32; ++x) {
            const int j = lane + 32 * x;
            s[x] = visible[i].contains(pos_s[buf * kTK + j]) ? apply_softcap(s_s[r * kTK + j], softcap) : kNegInf;
            tile_max = fmaxf(tile_max, s[x]);
          }
          tile_max = warp_max(tile_max);
          const float factor = state[i].rescale_to(fmaxf(state[i].max, tile_max));
          float sum = 0.f;
#pragma unroll
          for (int x = 0; x < kTK / 32; ++x) {
            const float prob = exp2_diff(s[x], state[i].max);
            s_s[r * kTK + lane + 32 * x] = prob;
            sum += prob;
          }
          state[i].sum += warp_sum(sum);
          if (lane == 0) factor_s[r] = factor;
        }
        __syncthreads();

        {  // acc = acc * factor + P @ V
          const int c = tid % kChunks, rg = tid / kChunks;
#pragma unroll
          for (int i = 0; i < C::kRowsPV; ++i) {
            const float f = factor_s[rg * C::kRowsPV + i];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] *= f;
          }
#pragma unroll 2
          for (int j = 0; j < kTK; ++j) {
            using Words = ChunkWords<Kv::kChunkBytes>;
            const Words words = *reinterpret_cast<const Words*>(v_s + buf * C::kTileBytes + C::chunk_offset(j, c));
            const float2 sz = scale_zero(buf, j, c * 8, 2);
            float vx[8];
            chunk_to_float<T, Kv>(words.w, sz.x, sz.y, vx);
#pragma unroll
            for (int i = 0; i < C::kRowsPV; ++i) {
              const float prob = s_s[(rg * C::kRowsPV + i) * kTK + j];
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[i][e] += prob * vx[e];
            }
          }
        }
        __syncthreads();  // before the next load overwrites this buffer
      }

      // Epilogue: lse by the warp that owns the row, out by the P @ V threads.
#pragma unroll
      for (int i = 0; i < kRows / kWarps; ++i) {
        const int r = warp + i * kWarps;
        if (lane == 0) inv_sum_s[r] = state[i].inv_sum();
        if (lane == 0 && r < pass_rows) {
          if (item.whole()) {
            p.lse[decode_lse_index(p, b, decode_row(row0 + r, group, h))] = state[i].lse();
          } else {
            part_lse[ws.lse_index(item.slot, row0 + r)] = state[i].lse();
          }
        }
      }
      __syncthreads();
      const int c = tid % kChunks, rg = tid / kChunks;
#pragma unroll
      for (int i = 0; i < C::kRowsPV; ++i) {
        const int r = rg * C::kRowsPV + i;
        if (r >= pass_rows || c >= head_chunks) continue;
        const float inv = inv_sum_s[r];
        if (item.whole()) {
          Vec8<T> o;
#pragma unroll
          for (int e = 0; e < 8; ++e) o.v[e] = from_float<T>(acc[i][e] * inv);
          T* out = static_cast<T*>(p.out) + decode_out_offset(p, b, decode_row(row0 + r, group, h));
          *reinterpret_cast<Vec8<T>*>(out + c * 8) = o;
        } else {
          float4* dst = reinterpret_cast<float4*>(part_out + ws.out_index(item.slot, row0 + r) + c * 8);
          dst[0] = make_float4(acc[i][0] * inv, acc[i][1] * inv, acc[i][2] * inv, acc[i][3] * inv);
          dst[1] = make_float4(acc[i][4] * inv, acc[i][5] * inv, acc[i][6] * inv, acc[i][7] * inv);
        }
      }
    }
  });
}

// 3. One thread per (pair, row, 4 columns): merge the pair's partial slots in key order.
//    Reads the schedule's lengths from the snapshot only.
template <typename T>
__global__ void merge_kernel(const __grid_constant__ DecodeParams p, const LeanShape shape, const int workers,
                             const char* workspace) {
  const DecodeWorkspace ws = DecodeWorkspace::make(p, shape, lean_bounds(shape, workers).num_slots);
  const int64_t* seq_offset = reinterpret_cast<const int64_t*>(workspace + ws.seq_offset_bytes);
  const int32_t* lens = reinterpret_cast<const int32_t*>(workspace + ws.lean_lengths_bytes());
  const float* part_lse = reinterpret_cast<const float*>(workspace + ws.lse_bytes);
  const float* part_out = reinterpret_cast<const float*>(workspace + ws.out_bytes);
  const int group = p.heads_q / p.heads_kv, vecs = p.head_dim / 4;
  const int64_t total = int64_t(shape.num_pairs()) * ws.rows * vecs;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int vec = int(idx % vecs), r = int(idx / vecs % ws.rows);
    const int pair = int(idx / (int64_t(vecs) * ws.rows));
    const int b = pair / p.heads_kv, h = pair % p.heads_kv;
    const PairPartials pp =
        pair_partials(shape, lens, seq_offset, workers, pair / shape.head_groups, pair % shape.head_groups);
    if (pp.count == 1) continue;  // the item that held the whole pair wrote the output
    float lse = kNegInf, o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < pp.count; ++k) {
      const int slot = pp.slot(k);
      const MergeWeights w = merge_weights(lse, part_lse[ws.lse_index(slot, r)]);
      const float4 x = *reinterpret_cast<const float4*>(part_out + ws.out_index(slot, r) + vec * 4);
      o[0] = w.w_a * o[0] + w.w_b * x.x;
      o[1] = w.w_a * o[1] + w.w_b * x.y;
      o[2] = w.w_a * o[2] + w.w_b * x.z;
      o[3] = w.w_a * o[3] + w.w_b * x.w;
      lse = w.lse;
    }
    const DecodeRow row = decode_row(r, group, h);
    T* out = static_cast<T*>(p.out) + decode_out_offset(p, b, row) + vec * 4;
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = from_float<T>(o[e]);
    if (vec == 0) p.lse[decode_lse_index(p, b, row)] = lse;
  }
}

// Once per device and instantiation (cached): the shared-memory check, the opt-in to the
// kernel's dynamic shared memory (cudaFuncSetAttribute; the occupancy query needs it too),
// and the workers W = SMs x resident CTAs per SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor
// of this instantiation: registers and shared memory decide, e.g. one CTA per SM at head_dim
// 256 on sm_80 or at head_dim 128 on sm_86 / sm_89). A shape-only value: later calls cost a
// cudaGetDevice and an atomic load, and call nothing that depends on cache_seqlens.
constexpr int kMaxCachedDevices = 64;
template <typename T, int kHeadDim, typename Kv>
int prepare_lean_kernel() {
  using C = Config<T, kHeadDim, Kv>;
  static std::atomic<int> workers_of_device[kMaxCachedDevices];  // 0: not prepared yet
  int device = 0;
  check(cudaGetDevice(&device), "decode: cudaGetDevice");
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int workers = workers_of_device[device].load(std::memory_order_acquire);
    if (workers > 0) return workers;
  }
  require_shared_memory(C::kSmemBytes, "decode", kHeadDim);
  const auto kernel = lean_kernel<T, kHeadDim, Kv>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes),
        "decode: cudaFuncSetAttribute");
  int sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "decode: SM count");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, C::kSmemBytes),
        "decode: cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int workers = std::max(1, sms) * std::max(1, per_sm);
  if (cacheable) workers_of_device[device].store(workers, std::memory_order_release);
  return workers;
}

template <typename T, int kHeadDim, typename Kv>
void launch(const DecodeParams& p, int max_seqlen_k, int workers, void* workspace, cudaStream_t stream) {
  using C = Config<T, kHeadDim, Kv>;
  prepare_lean_kernel<T, kHeadDim, Kv>();  // the shared-memory opt-in on this device (cached)
  const LeanShape shape = decode_lean_shape(p, C::kTileKeys, max_seqlen_k);
  char* ws = static_cast<char*>(workspace);
  const DecodeWorkspace layout = DecodeWorkspace::make(p, shape, lean_bounds(shape, workers).num_slots);
  int32_t* lens = reinterpret_cast<int32_t*>(ws + layout.lean_lengths_bytes());
  const int32_t* source = p.cache_seqlens;  // read by the first launch only
  if (p.is_sparse()) {
    pair_keys_kernel<<<p.batch, kPairKeysThreads, 0, stream>>>(
        p, max_seqlen_k, reinterpret_cast<int32_t*>(ws + layout.seq_len_bytes), lens);
    check(cudaGetLastError(), "decode: pair_keys launch");
    source = lens;  // pair_keys
  }
  offsets_kernel<<<1, kOffsetThreads, 0, stream>>>(shape, source, lens,
                                                   reinterpret_cast<int64_t*>(ws + layout.seq_offset_bytes));
  check(cudaGetLastError(), "decode: offsets launch");
  lean_kernel<T, kHeadDim, Kv><<<workers, kThreads, C::kSmemBytes, stream>>>(p, shape, workers, ws, p.scale * kLog2e,
                                                                            p.softcap * kLog2e);
  check(cudaGetLastError(), "decode: lean launch");
  const int64_t threads = int64_t(shape.num_pairs()) * layout.rows * (p.head_dim / 4);
  const int blocks = int(std::min<int64_t>((threads + 255) / 256, int64_t(workers) * 8));
  if (blocks == 0) return;
  merge_kernel<T><<<blocks, 256, 0, stream>>>(p, shape, workers, ws);
  check(cudaGetLastError(), "decode: merge launch");
}

// One kernel instantiation: q / out dtype T, padded head_dim, K/V storage Kv.
template <typename T_, int kHeadDim_, typename Kv_>
struct Instance {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  using Kv = Kv_;
};

template <typename T, typename Kv, typename Fn>
void dispatch_head_dim(int head_dim, Fn&& fn) {
  switch (padded_head_dim(head_dim)) {  // kernels for 64, 128, 256; others pad columns
    case 64: return fn(Instance<T, 64, Kv>{});
    case 128: return fn(Instance<T, 128, Kv>{});
    case 256: return fn(Instance<T, 256, Kv>{});
  }
  throw std::invalid_argument("attnkit decode (CUDA): head_dim must be a multiple of 8 up to 256");
}

// The K/V storage: plain T, or a quantized format.
template <typename T, typename Fn>
void dispatch_kv(const DecodeParams& p, Fn&& fn) {
  if (!p.is_quantized()) return dispatch_head_dim<T, PlainKV<T>>(p.head_dim, fn);
  switch (p.k_quant.format) {
    case KVFormat::kInt8: return dispatch_head_dim<T, QuantKV<KVFormat::kInt8>>(p.head_dim, fn);
    case KVFormat::kInt4: return dispatch_head_dim<T, QuantKV<KVFormat::kInt4>>(p.head_dim, fn);
    case KVFormat::kFp8E4M3: return dispatch_head_dim<T, QuantKV<KVFormat::kFp8E4M3>>(p.head_dim, fn);
  }
  throw std::invalid_argument("attnkit decode (CUDA): unsupported kv format");
}

// fn(Instance<...>{}) for the instantiation that runs p.
template <typename Fn>
void dispatch_instance(const DecodeParams& p, Fn&& fn) {
  if (!decode_supports(p.dtype, p.head_dim))
    throw std::invalid_argument("attnkit decode (CUDA): dtype must be float16 or bfloat16 and head_dim a multiple "
                                "of 8 up to 256");
  if (p.dtype == DType::kFloat16)
    dispatch_kv<__half>(p, fn);
  else
    dispatch_kv<__nv_bfloat16>(p, fn);
}

}  // namespace

bool decode_supports(DType dtype, int head_dim) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && head_dim >= 8 && head_dim <= 256 &&
         head_dim % 8 == 0;
}

int decode_workers(const DecodeParams& p) {
  int workers = 1;
  dispatch_instance(p, [&](auto instance) {
    using I = decltype(instance);
    workers = prepare_lean_kernel<typename I::T, I::kHeadDim, typename I::Kv>();
  });
  return workers;
}

int64_t decode_workspace_bytes(const DecodeParams& p, int max_seqlen_k, int workers) {
  if (p.batch == 0 || p.heads_kv == 0 || p.heads_q == 0) return 0;  // decode() launches nothing
  const LeanShape shape = decode_lean_shape(p, tile_keys_for(p.head_dim), max_seqlen_k);
  return DecodeWorkspace::make(p, shape, lean_bounds(shape, workers).num_slots).total_bytes;
}

void decode(const DecodeParams& p, int max_seqlen_k, int workers, void* workspace, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_kv == 0 || p.heads_q == 0) return;  // nothing to compute (no launch of 0 blocks)
  if (workers < 1) throw std::invalid_argument("attnkit decode (CUDA): workers must be >= 1");
  dispatch_instance(p, [&](auto instance) {
    using I = decltype(instance);
    launch<typename I::T, I::kHeadDim, typename I::Kv>(p, max_seqlen_k, workers, workspace, stream);
  });
}

}  // namespace attnkit::cuda
