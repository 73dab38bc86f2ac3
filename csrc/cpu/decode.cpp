// CPU decode: a few queries per sequence against a long contiguous or paged KV cache, on
// the lean (stream-K) schedule of attnkit/schedule.h that the CUDA decode uses too: the
// KV tiles of all (sequence, kv head group) pairs are split into one equal share per
// thread; an item that holds a whole pair writes the output directly, split pairs leave
// normalised partial results (out, lse) in their slots, merged afterwards with
// merge_weights() from attnkit/softmax.h. docs/decode.md has the design.
//
// Sparse decode (selected pages or tokens) runs the same worker over each pair's work axis
// (attnkit/decode_layout.h): one kv head per group, since selections differ per head, and
// a per-key mask on the token positions.
//
// A head group is a run of kv heads processed together (all of them unless the
// accumulators would outgrow the L2 budget): key row j of every head of the group is
// one contiguous run of group_heads * head_dim elements in both cache layouts, so a
// worker streams K sequentially. Reading one kv head at a time strides by kv_heads *
// head_dim elements (4 KB at 8 x 128 fp32), which the hardware prefetchers do not follow
// across pages: where the P V pass does (bf16), the step's V rows have been prefetched
// into L2 by hand while its scores were computed (DecodeWorker). docs/decode.md has the
// numbers.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <stdexcept>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "attnkit/decode_layout.h"
#include "attnkit/mask.h"
#include "attnkit/schedule.h"
#include "attnkit/softmax.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/tile_math.h"

namespace attnkit::cpu {
namespace {

constexpr int kTileKeys = 64;                 // keys per schedule tile and (at most) per online-softmax step
constexpr int64_t kStepBytes = 128 * 1024;    // K bytes of one step (see DecodeWorker)
constexpr int kValueBlock = 8;                // keys per P V pass in memory order (see DecodeWorker)
constexpr int64_t kGroupFloats = 32 * 1024;   // accumulator floats of one head group (128 KB)

// kv heads per group: as many as the accumulator budget allows, evened out; one for sparse
// decode.
int heads_per_group(const DecodeParams& p) {
  if (p.is_sparse()) return 1;
  const int64_t per_head = int64_t(p.heads_q / p.heads_kv) * p.seqlen_q * round_up(p.head_dim, kVec);
  const int most = int(std::clamp<int64_t>(kGroupFloats / per_head, 1, p.heads_kv));
  const int groups = (p.heads_kv + most - 1) / most;
  return (p.heads_kv + groups - 1) / groups;
}

// Row r of the head group that starts at kv head h0 is query `s` of q head `h`: rows go
// kv head by kv head, then query by query, then q head by q head within the kv group.
struct GroupRow {
  int s, h;
  GroupRow(int r, int h0, int qgroup, int rows_head)
      : s((r % rows_head) / qgroup), h((h0 + r / rows_head) * qgroup + r % qgroup) {}
};

// Final output row of (b, row): src * mul, and its lse.
template <typename T>
void write_output(const DecodeParams& p, int b, GroupRow row, const float* src, float mul, float lse) {
  T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + row.s * p.out_strides.row + row.h * p.out_strides.head;
  store_row(src, p.head_dim, mul, out);
  p.lse[(int64_t(b) * p.heads_q + row.h) * p.seqlen_q + row.s] = lse;
}

// Offset of token row j of kv head 0 of sequence b in a cache with strides s.
inline int64_t row_offset(const DecodeParams& p, const Strides& s, int b, int j) {
  if (!p.is_paged()) return b * s.batch + int64_t(j) * s.row;
  const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
  return page * s.batch + int64_t(j % p.page_size) * s.row;
}

// Prefetches the cache line at p into L2 (PREFETCHT2 on x86). In inline assembly, a side
// effect the compiler keeps: GCC deletes a loop whose only statements are
// __builtin_prefetch calls (C++ loops are assumed to terminate, -ffinite-loops, and the
// builtin counts as no effect), which silently removed every prefetch of the previous
// decode kernel. Into L2 rather than L1 (PREFETCHT0): on Zen 4, bf16 decode of 32k tokens
// on one thread took 16-18 ms with T2 against 26-33 ms with T0, whose L1 fills compete
// with the demand loads of the tile being computed.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht2 %0" : : "m"(*p));
#elif defined(__aarch64__)
  asm volatile("prfm pldl2keep, %0" : : "Q"(*p));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}

// Prefetches `bytes` from p into L1 (PREFETCHT0), for rows already in L2.
inline void prefetch_l1(const char* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(p[i]));
#elif defined(__aarch64__)
    asm volatile("prfm pldl1keep, %0" : : "Q"(p[i]));
#else
    __builtin_prefetch(p + i, 0, 3);
#endif
  }
}

// Prefetches key row `row` of `heads` kv heads (head_stride elements apart) into L2.
template <typename T>
inline void prefetch_heads(const T* row, int heads, int64_t head_stride, int D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t run = int64_t(D) * int64_t(sizeof(T));
  if (head_stride == D) {  // one contiguous run
    for (int64_t i = 0; i < run * heads; i += 64) prefetch_line(bytes + i);
    return;
  }
  for (int h = 0; h < heads; ++h)
    for (int64_t i = 0; i < run; i += 64) prefetch_line(bytes + h * head_stride * int64_t(sizeof(T)) + i);
}

// 8 elements of a cache row as floats (fp32: tile_math.h's load8).
using cpu::load8;
inline vec8 load8(const BFloat16* src) {
#if defined(__AVX2__)
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
  vec8 f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
#else
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  u16x8 bits;
  std::memcpy(&bits, src, sizeof(bits));
  const ivec8 wide = __builtin_convertvector(bits, ivec8) << 16;
  vec8 f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
#endif
}
inline vec8 load8(const Half* src) {
#if defined(__F16C__)
  vec8 f;
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  std::memcpy(&f, &v, sizeof(f));
  return f;
#else
  vec8 f;
  for (int i = 0; i < kVec; ++i) f[i] = to_float(src[i]);
  return f;
#endif
}

// Cache readers: row(offset) is the cache row at `offset` (from the strides in
// DecodeParams: elements for a plain cache, rows for a quantized one) as a value that
// load8(row + d) reads channels d..d+7 of. A quantized row is dequantized 8 channels at a
// time through attnkit/quant.h as it is read; no dequantized copy of the cache is made.
template <typename T>
struct PlainCache {
  const T* base;
  const T* row(int64_t offset) const { return base + offset; }
  int64_t bytes_per_row(int D) const { return int64_t(D) * int64_t(sizeof(T)); }
  void prefetch(int64_t offset, int heads, int64_t head_stride, int D) const {
    prefetch_heads(base + offset, heads, head_stride, D);
  }
};

template <KVFormat F>
struct QuantChannels {  // 8 channels of a row of a quantized cache: their codes, scale, zero
  const uint8_t* codes;
  float scale, zero;
};

template <KVFormat F>
struct QuantRow {  // a row of a quantized cache: its codes, scales and zeros
  const uint8_t* codes;
  const float* scale;
  const float* zero;  // nullptr for fp8
  int group_shift;    // the group of channel c is c >> group_shift
  QuantChannels<F> operator+(int channel) const {
    const int g = channel >> group_shift;
    return {codes + (F == KVFormat::kInt4 ? channel / 2 : channel), scale[g], zero ? zero[g] : 0.f};
  }
};

// The float value of each e4m3 code, from quant.h's e4m3_to_float.
struct E4M3Values {
  float value[256];
  E4M3Values() {
    for (uint32_t b = 0; b < 256; ++b) value[b] = e4m3_to_float(b);
  }
};
inline const E4M3Values kE4M3Values;

// 8 channels dequantized with 8-wide vector ops: codes as exact floats, then quant.h's
// int_value (code * scale + zero, fused like its fmaf under -ffp-contract=fast with FMA)
// or fp8_value (e4m3 value * scale), so the values equal dequantize_kv's.
template <KVFormat F>
inline vec8 load8(QuantChannels<F> at) {
  if constexpr (F == KVFormat::kFp8E4M3) {
    vec8 v;
    for (int i = 0; i < kVec; ++i) v[i] = kE4M3Values.value[at.codes[i]];
    return v * at.scale;
  } else {
    ivec8 codes;
    if constexpr (F == KVFormat::kInt8) {
#if defined(__AVX2__)
      const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at.codes)));
      std::memcpy(&codes, &wide, sizeof(codes));
#else
      typedef uint8_t u8x8 __attribute__((vector_size(8)));
      u8x8 bytes;
      std::memcpy(&bytes, at.codes, sizeof(bytes));
      codes = __builtin_convertvector(bytes, ivec8);
#endif
    } else {  // channel i of a little-endian word is nibble i (docs/quantization.md)
      uint32_t word;
      std::memcpy(&word, at.codes, sizeof(word));
      codes = ((ivec8{} + int32_t(word)) >> ivec8{0, 4, 8, 12, 16, 20, 24, 28}) & 0xf;
    }
    return __builtin_convertvector(codes, vec8) * at.scale + at.zero;
  }
}

template <KVFormat F>
struct QuantCache {
  QuantizedRows rows;
  int row_bytes = rows.row_bytes(), groups = rows.groups();
  int group_shift = rows.group_shift();
  int64_t bytes_per_row(int) const { return row_bytes; }
  QuantRow<F> row(int64_t r) const {
    return {rows.data + r * row_bytes, rows.scale + r * groups, rows.zero ? rows.zero + r * groups : nullptr,
            group_shift};
  }
  void prefetch(int64_t r, int heads, int64_t head_stride, int) const {
    prefetch_heads(rows.data + r * row_bytes, heads, head_stride * row_bytes, row_bytes);
    for (int h = 0; h < heads; ++h) prefetch_line(reinterpret_cast<const char*>(rows.scale + (r + h * head_stride) * groups));
  }
};

// The four horizontal sums of a, b, c, d.
inline void hsum4(vec8 a, vec8 b, vec8 c, vec8 d, float* out0, float* out1, float* out2, float* out3) {
  const vec8 ab = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
                  __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  const vec8 cd = __builtin_shufflevector(c, d, 0, 8, 2, 10, 4, 12, 6, 14) +
                  __builtin_shufflevector(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
  const vec8 abcd = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                    __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
  *out0 = abcd[0] + abcd[4];
  *out1 = abcd[1] + abcd[5];
  *out2 = abcd[2] + abcd[6];
  *out3 = abcd[3] + abcd[7];
}

// Register tiles of the micro-kernels below. With AVX-512 (32 vector registers) a score
// tile is 4 q rows x 4 keys (16 accumulators) and a value tile 4 rows x 32 channels;
// with 16 registers (AVX2, SSE, NEON) half of each, so nothing spills.
#if defined(__AVX512F__)
constexpr int kScoreKeys = 4;
constexpr int kAccRegs = 16;
#else
constexpr int kScoreKeys = 2;
constexpr int kAccRegs = 8;
#endif
constexpr int kRowBlock = 4;  // q rows per micro-kernel call

// Scores of kK keys for kR q rows (Dp apart, Dp a multiple of 8): s[r * ss + i] = q_r . k_i.
// Every 8 channels of a key are read (and converted or dequantized) once for all kR rows.
template <int kR, int kK, typename Row>
inline void score_block(const float* q, int Dp, const Row* k, float* s, int ss) {
  vec8 acc[kR][kK];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < kK; ++i) acc[r][i] = vec8{};
  for (int d = 0; d < Dp; d += kVec) {
    vec8 x[kK];
#pragma GCC unroll 16
    for (int i = 0; i < kK; ++i) x[i] = load8(k[i] + d);
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const vec8 qv = load8(q + r * Dp + d);
#pragma GCC unroll 16
      for (int i = 0; i < kK; ++i) acc[r][i] += qv * x[i];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
    float* out = s + r * ss;
    int i = 0;
#pragma GCC unroll 16
    for (; i + 4 <= kK; i += 4) hsum4(acc[r][i], acc[r][i + 1], acc[r][i + 2], acc[r][i + 3], out + i, out + i + 1, out + i + 2, out + i + 3);
#pragma GCC unroll 16
    for (; i < kK; ++i) out[i] = hsum8(acc[r][i]);
  }
}

// score_block over any number of rows (blocks of kRowBlock, then the rest).
template <int kK, typename Row>
inline void score_rows(const float* q, int rows, int Dp, const Row* k, float* s, int ss) {
  int r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) score_block<kRowBlock, kK>(q + r * Dp, Dp, k, s + r * ss, ss);
  q += r * Dp, s += r * ss;
  switch (rows - r) {
    case 3: score_block<3, kK>(q, Dp, k, s, ss); break;
    case 2: score_block<2, kK>(q, Dp, k, s, ss); break;
    case 1: score_block<1, kK>(q, Dp, k, s, ss); break;
    default: break;
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define ATTNKIT_DECODE_BF16_DOT 1
// bf16 keys against bf16 q rows with AVX512-BF16 (VDPBF16PS: 32 products a
// instruction, exact in fp32, summed in fp32): no conversion of K at all, and half the
// instructions of the fp32 FMA path. q is used as given (its bf16 values, unscaled) and
// the scale multiplies the scores, so a score is the same fp32 dot product as
// (q * scale) . k up to rounding. Channels in groups of 32, so head_dim % 32 == 0.
inline vec8 fold16(__m512 a) {  // lanes i and i + 8 summed
  // Through memory, not _mm512_extractf64x4_pd / _mm512_castps512_ps256, whose GCC 12
  // headers warn "__Y is used uninitialized" (their _mm256_undefined_pd); the compiler
  // turns the copies into register moves.
  vec8 halves[2];
  std::memcpy(halves, &a, sizeof(halves));
  return halves[0] + halves[1];
}

template <int kR, int kK>
inline void score_block_bf16(const BFloat16* q, int D, const BFloat16* const* k, float* s, int ss, float scale) {
  __m512 acc[kR][kK];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < kK; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 32) {
    __m512bh x[kK];
#pragma GCC unroll 16
    for (int i = 0; i < kK; ++i) x[i] = (__m512bh)_mm512_loadu_si512(k[i] + d);
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + r * D + d);
#pragma GCC unroll 16
      for (int i = 0; i < kK; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], qv, x[i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
    float* out = s + r * ss;
    int i = 0;
#pragma GCC unroll 16
    for (; i + 4 <= kK; i += 4)
      hsum4(fold16(acc[r][i]), fold16(acc[r][i + 1]), fold16(acc[r][i + 2]), fold16(acc[r][i + 3]), out + i,
            out + i + 1, out + i + 2, out + i + 3);
#pragma GCC unroll 16
    for (; i < kK; ++i) out[i] = hsum8(fold16(acc[r][i]));
#pragma GCC unroll 16
    for (i = 0; i < kK; ++i) out[i] *= scale;
  }
}

template <int kK>
inline void score_rows_bf16(const BFloat16* q, int rows, int D, const BFloat16* const* k, float* s, int ss,
                            float scale) {
  int r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock)
    score_block_bf16<kRowBlock, kK>(q + r * D, D, k, s + r * ss, ss, scale);
  q += r * D, s += r * ss;
  switch (rows - r) {
    case 3: score_block_bf16<3, kK>(q, D, k, s, ss, scale); break;
    case 2: score_block_bf16<2, kK>(q, D, k, s, ss, scale); break;
    case 1: score_block_bf16<1, kK>(q, D, k, s, ss, scale); break;
    default: break;
  }
}
#endif

// A row seen from channel d0 on: row + c reads channels d0 + c.. (a plain row: the pointer
// itself, so the micro-kernels address with constant offsets).
template <typename Row>
struct Shifted {
  Row row;
  int d0;
  auto operator+(int c) const { return row + (d0 + c); }
};
template <typename Row>
inline auto shifted(Row row, int d0) {
  if constexpr (std::is_pointer_v<Row>) return row + d0;
  else return Shifted<Row>{row, d0};
}

inline vec8 bcast8(float x) { return vec8{x, x, x, x, x, x, x, x}; }

// o_r[d0, d0 + 8 kC) += sum over keys i < n of prob[r * ps + i] * v_i[d0, d0 + 8 kC), for
// kR accumulator rows (Dp apart): the kR x kC accumulators stay in registers over all n
// keys, and every 8 channels of a value row are read (and converted) once for all rows.
template <int kR, int kC, typename Row>
// Not inlined: as its own function GCC keeps all kR x kC accumulators in registers (inlined
// into the worker it spilled one and chained every key through a store and a reload).
__attribute__((noinline)) void accumulate_block(float* o, int Dp, const float* prob, int ps, const Row* v, int n, int d0) {
  vec8 acc[kR][kC];
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < kC; ++j) acc[r][j] = load8(o + r * Dp + d0 + j * kVec);
  for (int i = 0; i < n; ++i) {
    const auto x_row = shifted(v[i], d0);
    vec8 w[kR];
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) w[r] = bcast8(prob[r * ps + i]);
#pragma GCC unroll 16
    for (int j = 0; j < kC; ++j) {
      const vec8 x = load8(x_row + j * kVec);
#pragma GCC unroll 16
      for (int r = 0; r < kR; ++r) acc[r][j] += w[r] * x;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < kC; ++j) store8(o + r * Dp + d0 + j * kVec, acc[r][j]);
}

template <int kR, typename Row>
inline void accumulate_block_rows(float* o, int Dp, const float* prob, int ps, const Row* v, int n) {
  constexpr int kC = kAccRegs / kR > 8 ? 8 : kAccRegs / kR;
  int d = 0;
  for (; d + kC * kVec <= Dp; d += kC * kVec) accumulate_block<kR, kC>(o, Dp, prob, ps, v, n, d);
  for (; d < Dp; d += kVec) accumulate_block<kR, 1>(o, Dp, prob, ps, v, n, d);
}

// o_r += sum over keys i < n of prob[r * ps + i] * v_i for `rows` accumulator rows (Dp apart).
template <typename Row>
inline void accumulate_rows(float* o, int rows, int Dp, const float* prob, int ps, const Row* v, int n) {
  int r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock)
    accumulate_block_rows<kRowBlock>(o + r * Dp, Dp, prob + r * ps, ps, v, n);
  o += r * Dp, prob += r * ps;
  switch (rows - r) {
    case 3: accumulate_block_rows<3>(o, Dp, prob, ps, v, n); break;
    case 2: accumulate_block_rows<2>(o, Dp, prob, ps, v, n); break;
    case 1: accumulate_block_rows<1>(o, Dp, prob, ps, v, n); break;
    default: break;
  }
}

// Runs the items of one worker; its buffers live as long as the worker. T: the dtype of q
// and out; Cache: PlainCache<T> or QuantCache<format>.
//
// An item's keys go in steps (step_keys(): 64 keys at bf16 8 x 128, 32 at fp32). Per step:
// - scores in memory order (blocks of kScoreKeys keys, every head of the group), each block
//   against its head's q rows by score_block (fp32 FMAs; K read, and converted, once per
//   block of 4 q rows) or, for bf16 caches with AVX512-BF16, score_block_bf16 (VDPBF16PS
//   on K as stored); meanwhile the step's V rows are prefetched into L2;
// - the online-softmax step of every row;
// - values head by head, the accumulators of 4 rows x 32 channels in registers over all
//   keys of the step (accumulate_block; every V element read and converted once per 4 q
//   rows), while the next step's K rows are prefetched into L2 and the next head's V rows
//   into L1; or, where a head's V row is >= 512 bytes (fp32 at head_dim 128), in memory
//   order, kValueBlock keys x every head at a time (measured faster there: 25-26 ms
//   against 27-31 ms for fp32 32k on one thread; bf16 16 ms against 19-22 ms the other way).
// GQA groups of more than 4 rows per kv head (or head_dims that are not multiples of 8)
// convert each head's K and V rows of the step once into a per-thread fp32 scratch tile
// instead and run the same micro-kernels on it, so no element is converted per q row.
template <typename T, typename Cache>
class DecodeWorker {
 public:
  // lens: the schedule's lengths (cache_seqlens, or the sparse pairs' work keys).
  DecodeWorker(const DecodeParams& p, const Cache& k_cache, const Cache& v_cache, int group_heads,
               const int32_t* lens, float* part_out, float* part_lse)
      : p_(p),
        k_cache_(k_cache),
        v_cache_(v_cache),
        D_(p.head_dim),
        Dp_(round_up(p.head_dim, kVec)),
        qgroup_(p.heads_q / p.heads_kv),
        rows_head_(qgroup_ * p.seqlen_q),
        group_heads_(group_heads),
        head_groups_((p.heads_kv + group_heads - 1) / group_heads),
        convert_(D_ != Dp_ || (rows_head_ > kRowBlock && !std::is_same_v<Row, const float*>)),
        dot_bf16_(kCanDotBf16 && !convert_ && D_ % 32 == 0),
        values_by_block_(v_cache.bytes_per_row(D_) >= 512),
        lens_(lens),
        part_out_(part_out),
        part_lse_(part_lse),
        q_tile_(size_t(rows_head_) * group_heads * Dp_),
        acc_(q_tile_.size()),
        s_tile_(size_t(rows_head_) * group_heads * kTileKeys),
        kv_tile_(convert_ ? size_t(kTileKeys) * Dp_ : 0),
        q_bf16_(dot_bf16_ ? size_t(rows_head_) * group_heads * D_ : 0),
        state_(size_t(rows_head_) * group_heads),
        visible_(state_.size()) {}

  // shape_groups: the schedule's head_groups (dense: head_groups_; sparse: 1, each pair
  // being a schedule sequence).
  void run(const LeanItem& item, int shape_groups) {
    const int pair = item.pair(shape_groups);
    const int b = pair / head_groups_, h0 = pair % head_groups_ * group_heads_;
    const int heads = std::min(group_heads_, p_.heads_kv - h0), rows = heads * rows_head_;
    const int len = std::max(p_.cache_seqlens[b], 0);
    const AttentionMask mask(p_.seqlen_q, len, /*causal=*/true, p_.window_left, -1);
    // Work keys [first, last): dense, the visible span; sparse, the pair's selected keys.
    const KeyRange span = p_.is_sparse() ? KeyRange{0, lens_[item.b]} : mask.keys_of_rows(0, p_.seqlen_q);
    const int first = std::max(span.begin, item.tile_begin * kTileKeys);
    const int last = std::min(span.end, item.tile_end * kTileKeys);
    for (int r = 0; r < rows; ++r) {
      const GroupRow row(r, h0, qgroup_, rows_head_);
      const T* q = static_cast<const T*>(p_.q) + b * p_.q_strides.batch + row.s * p_.q_strides.row +
                   row.h * p_.q_strides.head;
      float* dst = q_tile_.data() + size_t(r) * Dp_;
      load_row(q, D_, dst, p_.scale);
      if (dot_bf16_) std::memcpy(q_bf16_.data() + size_t(r) * D_, q, size_t(D_) * sizeof(T));
      if (p_.k_quant.rotated) hadamard_rotate(dst, D_);  // keys stored as H k: (H q) . (H k) = q . k
      std::fill(dst + D_, dst + Dp_, 0.f);
      state_[r] = RowSoftmax{};
      const KeyRange keys = mask.keys_of(row.s);
      visible_[r] = p_.is_sparse() ? keys : KeyRange{std::max(keys.begin, first), std::min(keys.end, last)};
    }
    std::fill(acc_.begin(), acc_.begin() + size_t(rows) * Dp_, 0.f);

    const int64_t k_head = p_.k_strides.head, v_head = p_.v_strides.head;
    // Steps of `step` keys (step_keys()). The first step's offsets are resolved here; each
    // step then resolves the next one's, whose K rows it prefetches while its values are
    // accumulated.
    const int step = step_keys(heads);
    int n_next = first < last ? resolve_tile(b, h0, len, first, last, step, *next_) : 0;
    for (int key0 = first; key0 < last; key0 += step) {
      const int n = n_next, n_pad = round_up(n, kVec);
      std::swap(cur_, next_);
      n_next = key0 + step < last ? resolve_tile(b, h0, len, key0 + step, last, step, *next_) : 0;

      // Scores: keys in blocks, in memory order (key, then head), each against its head's
      // rows; meanwhile this step's V rows are prefetched, block by block.
      if (!convert_) {
        int c = 0;
        for (; c + kScoreKeys <= n; c += kScoreKeys) {
          for (int i = c; i < c + kScoreKeys; ++i) v_cache_.prefetch(cur_->v_off[i], heads, v_head, D_);
          for (int hh = 0; hh < heads; ++hh) {
            Row k[kScoreKeys];
            for (int i = 0; i < kScoreKeys; ++i) k[i] = k_cache_.row(cur_->k_off[c + i] + hh * k_head);
            score_keys<kScoreKeys>(hh, k, c);
          }
        }
        for (; c < n; ++c) {
          v_cache_.prefetch(cur_->v_off[c], heads, v_head, D_);
          for (int hh = 0; hh < heads; ++hh) {
            const Row k = k_cache_.row(cur_->k_off[c] + hh * k_head);
            score_keys<1>(hh, &k, c);
          }
        }
      } else {
        for (int hh = 0; hh < heads; ++hh) {
          const float* const* k = convert_tile(k_cache_, cur_->k_off, hh * k_head, n);
          int c = 0;
          for (; c + kScoreKeys <= n; c += kScoreKeys) score_keys<kScoreKeys>(hh, k + c, c);
          for (; c < n; ++c) score_keys<1>(hh, k + c, c);
        }
        for (int c = 0; c < n; ++c) v_cache_.prefetch(cur_->v_off[c], heads, v_head, D_);
      }
      for (int r = 0; r < rows; ++r) {
        float* s = s_tile_.data() + size_t(r) * kTileKeys;  // the step's n keys
        if (p_.is_sparse()) {  // mask by token position, key by key
          transform_and_mask_row(s, n_pad, n, 0, KeyRange{0, n}, p_.softcap);
          for (int c = 0; c < n; ++c)
            if (!visible_[r].contains(cur_->pos[c])) s[c] = kNegInf;
        } else {
          transform_and_mask_row(s, n_pad, n, key0, visible_[r], p_.softcap);
        }
        const float factor = softmax_update_row(s, n_pad, state_[r]);
        if (factor != 1.f) scale_row(acc_.data() + size_t(r) * Dp_, Dp_, factor);
      }
      // Values: head by head, all keys of the step per pass; meanwhile the next step's K
      // rows are prefetched, a share per head.
      const bool full = every_row_sees(key0, n, rows);
      if (values_by_block_ && full && !convert_) {  // in memory order, kValueBlock keys at a time
        for (int c0 = 0; c0 < n; c0 += kValueBlock) {
          const int m = std::min(kValueBlock, n - c0);
          for (int c = c0; c < std::min(c0 + m, n_next); ++c) k_cache_.prefetch(next_->k_off[c], heads, k_head, D_);
          for (int hh = 0; hh < heads; ++hh) {
            for (int c = c0; c < c0 + m; ++c) v_rows_[c] = v_cache_.row(cur_->v_off[c] + hh * v_head);
            float* o = acc_.data() + size_t(hh) * rows_head_ * Dp_;
            const float* prob = s_tile_.data() + size_t(hh) * rows_head_ * kTileKeys + c0;
            accumulate_rows(o, rows_head_, Dp_, prob, kTileKeys, v_rows_ + c0, m);
          }
        }
        continue;
      }
      for (int hh = 0; hh < heads; ++hh) {
        for (int c = n_next * hh / heads; c < n_next * (hh + 1) / heads; ++c)
          k_cache_.prefetch(next_->k_off[c], heads, k_head, D_);
        if constexpr (std::is_pointer_v<Row>)  // the next head's rows, from L2 into L1
          if (hh + 1 < heads)
            for (int c = 0; c < n; ++c)
              prefetch_l1(reinterpret_cast<const char*>(v_cache_.row(cur_->v_off[c] + (hh + 1) * v_head)),
                          v_cache_.bytes_per_row(D_));
        if (convert_) {
          values_head(hh, key0, n, full, convert_tile(v_cache_, cur_->v_off, hh * v_head, n));
        } else {
          for (int c = 0; c < n; ++c) v_rows_[c] = v_cache_.row(cur_->v_off[c] + hh * v_head);
          values_head(hh, key0, n, full, v_rows_);
        }
      }
    }

    for (int r = 0; r < rows; ++r) {
      const float inv = state_[r].inv_sum();
      const float* acc = acc_.data() + size_t(r) * Dp_;
      if (item.whole()) {  // the only item of its pair: final output
        write_output<T>(p_, b, GroupRow(r, h0, qgroup_, rows_head_), acc, inv, state_[r].lse());
      } else {
        const size_t row = size_t(item.slot) * group_heads_ * rows_head_ + r;
        float* out = part_out_ + row * D_;
        for (int d = 0; d < D_; ++d) out[d] = acc[d] * inv;
        part_lse_[row] = state_[r].lse();
      }
    }
  }

 private:
  using Row = decltype(std::declval<Cache>().row(0));
#if defined(ATTNKIT_DECODE_BF16_DOT)
  static constexpr bool kCanDotBf16 = std::is_same_v<T, BFloat16> && std::is_same_v<Row, const BFloat16*>;
#else
  static constexpr bool kCanDotBf16 = false;
#endif

  // The keys of one tile: token positions (-1: none) and the rows of kv head h0 in K and V.
  struct TileKeys {
    int pos[kTileKeys];
    int64_t k_off[kTileKeys], v_off[kTileKeys];
  };

  // Keys per online-softmax step: a power of two, at most a tile, at least 16, with the
  // step's K rows of the group within kStepBytes. While one step's K is read, its V (and
  // then the next step's K) is prefetched into L2, so about three steps of K/V bytes are
  // live there: 384 KB of Zen 4's 1 MB. One thread, 32k tokens, 8 x 128 fp32 (4 KB a
  // key): 25 ms with 32-key steps against 32-36 ms with 64-key ones; bf16 (2 KB a key)
  // does best with 64.
  int step_keys(int heads) const {
    const int64_t key_bytes = heads * k_cache_.bytes_per_row(D_);
    int step = kTileKeys;
    while (step > 16 && step * key_bytes > kStepBytes) step /= 2;
    return step;
  }

  // Resolves work keys [key0, min(key0 + step, last)) into t; returns their count.
  int resolve_tile(int b, int h0, int len, int key0, int last, int step, TileKeys& t) const {
    const int n = std::min(step, last - key0);
    const int64_t k_head = p_.k_strides.head, v_head = p_.v_strides.head;
    for (int c = 0; c < n; ++c) {
      t.pos[c] = decode_key_position(p_, b, h0, key0 + c, len);
      const int row = std::max(t.pos[c], 0);  // a key naming no token reads row 0 (len > 0), masked
      t.k_off[c] = row_offset(p_, p_.k_strides, b, row) + int64_t(h0) * k_head;
      t.v_off[c] = row_offset(p_, p_.v_strides, b, row) + int64_t(h0) * v_head;
    }
    return n;
  }

  // Scores of kK keys (rows k, tile columns c ..) against the rows of head hh.
  template <int kK, typename R>
  void score_keys(int hh, const R* k, int c) {
    float* s = s_tile_.data() + size_t(hh) * rows_head_ * kTileKeys + c;
#if defined(ATTNKIT_DECODE_BF16_DOT)
    if constexpr (std::is_same_v<R, const BFloat16*> && std::is_same_v<T, BFloat16>) {
      if (dot_bf16_) {
        score_rows_bf16<kK>(q_bf16_.data() + size_t(hh) * rows_head_ * D_, rows_head_, D_, k, s, kTileKeys, p_.scale);
        return;
      }
    }
#endif
    const float* q = q_tile_.data() + size_t(hh) * rows_head_ * Dp_;
    score_rows<kK>(q, rows_head_, Dp_, k, s, kTileKeys);
  }

  // acc += P V for the rows of head hh, value rows v[0..n) of the tile. A tile holding keys
  // some row does not see (a window edge, the causal corner of several queries, unselected
  // or padding keys) reads, for each row, only the values of its visible keys, so a masked
  // key's NaN or inf value never meets its zero probability (0 * NaN = NaN).
  template <typename R>
  void values_head(int hh, int key0, int n, bool full, const R* v) {
    float* o = acc_.data() + size_t(hh) * rows_head_ * Dp_;
    const float* prob = s_tile_.data() + size_t(hh) * rows_head_ * kTileKeys;
    if (full) {
      accumulate_rows(o, rows_head_, Dp_, prob, kTileKeys, v, n);
      return;
    }
    for (int r = 0; r < rows_head_; ++r)
      for (int c = 0; c < n; ++c)
        if (sees(hh * rows_head_ + r, key0, c))
          accumulate_rows(o + size_t(r) * Dp_, 1, Dp_, prob + size_t(r) * kTileKeys + c, kTileKeys, v + c, 1);
  }

  // The rows of kv head h0 + head_off / head stride of n keys (offsets off) as fp32 rows of
  // Dp_ channels (zero-padded) in the scratch tile.
  const float* const* convert_tile(const Cache& cache, const int64_t* off, int64_t head_off, int n) {
    for (int c = 0; c < n; ++c) {
      float* dst = kv_tile_.data() + size_t(c) * Dp_;
      const Row row = cache.row(off[c] + head_off);
      if constexpr (std::is_pointer_v<Row>) {
        if (D_ != Dp_) {
          load_row(row, D_, dst, 1.f);
          std::fill(dst + D_, dst + Dp_, 0.f);
          tile_rows_[c] = dst;
          continue;
        }
      }
      for (int d = 0; d < Dp_; d += kVec) store8(dst + d, load8(row + d));
      tile_rows_[c] = dst;
    }
    return tile_rows_;
  }

  // Whether row r sees key c of the tile that starts at work key key0.
  bool sees(int r, int key0, int c) const {
    return visible_[r].contains(p_.is_sparse() ? cur_->pos[c] : key0 + c);
  }
  bool every_row_sees(int key0, int n, int rows) const {
    for (int r = 0; r < rows; ++r) {
      if (!p_.is_sparse()) {
        if (visible_[r].begin > key0 || visible_[r].end < key0 + n) return false;
        continue;
      }
      for (int c = 0; c < n; ++c)
        if (!sees(r, key0, c)) return false;
    }
    return true;
  }

  const DecodeParams& p_;
  const Cache k_cache_, v_cache_;
  const int D_, Dp_, qgroup_, rows_head_, group_heads_, head_groups_;
  const bool convert_;  // K and V rows go through the fp32 scratch tile
  const bool dot_bf16_;  // scores by score_rows_bf16 (bf16 q and K as stored)
  const bool values_by_block_;  // P V in memory order, kValueBlock keys x every head at a time
  const int32_t* lens_;
  float* part_out_;
  float* part_lse_;
  std::vector<float> q_tile_, acc_, s_tile_, kv_tile_;
  std::vector<T> q_bf16_;  // q rows as given, unscaled (dot_bf16_)
  TileKeys keys_[2];
  TileKeys* cur_ = &keys_[0];  // this tile
  TileKeys* next_ = &keys_[1];  // the next one
  Row v_rows_[kTileKeys];
  const float* tile_rows_[kTileKeys];
  std::vector<RowSoftmax> state_;
  std::vector<KeyRange> visible_;
};

template <typename T, typename Cache>
void decode_impl(const DecodeParams& p, const Cache& k_cache, const Cache& v_cache) {
  const int group_heads = heads_per_group(p);
  const int head_groups = (p.heads_kv + group_heads - 1) / group_heads;
  const int qgroup = p.heads_q / p.heads_kv, rows_head = qgroup * p.seqlen_q;
  const int rows_group = group_heads * rows_head, D = p.head_dim;
  // The schedule: dense, sequences x head groups over cache_seqlens; sparse, one schedule
  // sequence per (sequence, kv head) pair over its work keys (decode_lean_shape()).
  std::vector<int32_t> pair_keys;
  const int32_t* lens = p.cache_seqlens;
  if (p.is_sparse()) {
    pair_keys.resize(size_t(p.batch) * p.heads_kv);
    for (int b = 0; b < p.batch; ++b)
      for (int h = 0; h < p.heads_kv; ++h)
        pair_keys[size_t(b) * p.heads_kv + h] = decode_pair_keys(p, b, h, std::max(p.cache_seqlens[b], 0));
    lens = pair_keys.data();
  }
  const int shape_batch = p.is_sparse() ? p.batch * p.heads_kv : p.batch;
  int max_len = 0;
  for (int i = 0; i < shape_batch; ++i) max_len = std::max(max_len, lens[i]);
  const LeanShape shape = p.is_sparse() ? LeanShape{shape_batch, 1, p.seqlen_q, -1, kTileKeys, max_len}
                                        : LeanShape{p.batch, head_groups, p.seqlen_q, p.window_left, kTileKeys, max_len};
  const int workers = std::max(1, at::get_num_threads());
  const LeanPlan plan = make_lean_plan(shape, lens, workers);

  // Partial results of split pairs, by slot (LeanSlots: at most 2 per worker; whole pairs
  // have none); only written slots are read, so the buffers are left uninitialised.
  const size_t slot_rows = size_t(plan.num_slots) * rows_group;
  std::unique_ptr<float[]> part_out(new float[slot_rows * D]), part_lse(new float[slot_rows]);

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    DecodeWorker<T, Cache> worker(p, k_cache, v_cache, group_heads, lens, part_out.get(), part_lse.get());
    for (int64_t w = begin; w < end; ++w)
      for (int i = plan.worker_items[w]; i < plan.worker_items[w + 1]; ++i)
        worker.run(plan.items[i], shape.head_groups);
  });

  // Fix-up: pairs with no visible key get 0 / -inf; split pairs merge their slots in key order.
  at::parallel_for(0, shape.num_pairs(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(D);
    for (int64_t pair = begin; pair < end; ++pair) {
      const PairPartials parts = plan.pairs[pair];
      if (parts.count == 1) continue;  // written by its only item
      const int b = int(pair / head_groups), h0 = int(pair % head_groups) * group_heads;
      const int rows = std::min(group_heads, p.heads_kv - h0) * rows_head;
      for (int r = 0; r < rows; ++r) {
        float lse = kNegInf;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int k = 0; k < parts.count; ++k) {
          const size_t row = size_t(parts.slot(k)) * rows_group + r;
          const MergeWeights w = merge_weights(lse, part_lse[row]);
          const float* part = part_out.get() + row * D;
          for (int d = 0; d < D; ++d) merged[d] = w.w_a * merged[d] + w.w_b * part[d];
          lse = w.lse;
        }
        write_output<T>(p, b, GroupRow(r, h0, qgroup, rows_head), merged.data(), 1.f, lse);
      }
    }
  });
}

}  // namespace

void decode(const DecodeParams& params) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!params.is_quantized()) {
      const PlainCache<T> k{static_cast<const T*>(params.k_cache)}, v{static_cast<const T*>(params.v_cache)};
      decode_impl<T>(params, k, v);
      return;
    }
    dispatch_kv_format(params.k_quant.format, [&](auto format) {
      constexpr KVFormat F = decltype(format)::value;
      decode_impl<T>(params, QuantCache<F>{params.k_quant}, QuantCache<F>{params.v_quant});
    });
  });
}

}  // namespace attnkit::cpu
