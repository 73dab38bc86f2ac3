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
// worker streams K and V sequentially. Reading one kv head at a time instead strides by
// kv_heads * head_dim elements (4 KB at 8 x 128 fp32), which the hardware prefetchers do
// not follow across pages: docs/decode.md has the numbers.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
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

constexpr int kTileKeys = 64;                 // keys per schedule tile and per online-softmax step
constexpr int kValueKeys = 4;                 // keys per pass over the accumulators
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

// Prefetches key row `row` of `heads` kv heads (head_stride elements apart) into the cache.
template <typename T>
inline void prefetch_heads(const T* row, int heads, int64_t head_stride, int D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t run = int64_t(D) * int64_t(sizeof(T));
  if (head_stride == D) {  // one contiguous run
    for (int64_t i = 0; i < run * heads; i += 64) __builtin_prefetch(bytes + i);
    return;
  }
  for (int h = 0; h < heads; ++h)
    for (int64_t i = 0; i < run; i += 64) __builtin_prefetch(bytes + h * head_stride * int64_t(sizeof(T)) + i);
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
  QuantRow<F> row(int64_t r) const {
    return {rows.data + r * row_bytes, rows.scale + r * groups, rows.zero ? rows.zero + r * groups : nullptr,
            group_shift};
  }
  void prefetch(int64_t r, int heads, int64_t head_stride, int) const {
    prefetch_heads(rows.data + r * row_bytes, heads, head_stride * row_bytes, row_bytes);
    for (int h = 0; h < heads; ++h) __builtin_prefetch(rows.scale + (r + h * head_stride) * groups);
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

// Scores of keys k0 and k1 (two adjacent columns of s) for the `rows` query rows q (Dp
// apart, Dp a multiple of 8): s[r * ss] = q_r . k0, s[r * ss + 1] = q_r . k1. Two keys and
// four rows give eight independent FMA chains and share every q load.
template <typename Row>
inline void score_rows2(const float* q, int rows, int Dp, Row k0, Row k1, float* s, int ss) {
  int r = 0;
  for (; r + 4 <= rows; r += 4, q += 4 * Dp, s += 4 * ss) {
    vec8 a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
    for (int d = 0; d < Dp; d += kVec) {
      const vec8 x = load8(k0 + d), y = load8(k1 + d);
      const vec8 q0 = load8(q + d), q1 = load8(q + Dp + d), q2 = load8(q + 2 * Dp + d), q3 = load8(q + 3 * Dp + d);
      a0 += q0 * x, b0 += q0 * y;
      a1 += q1 * x, b1 += q1 * y;
      a2 += q2 * x, b2 += q2 * y;
      a3 += q3 * x, b3 += q3 * y;
    }
    hsum4(a0, a1, a2, a3, s, s + ss, s + 2 * ss, s + 3 * ss);
    hsum4(b0, b1, b2, b3, s + 1, s + ss + 1, s + 2 * ss + 1, s + 3 * ss + 1);
  }
  for (; r < rows; ++r, q += Dp, s += ss) {
    vec8 a{}, b{};
    for (int d = 0; d < Dp; d += kVec) {
      const vec8 qv = load8(q + d);
      a += qv * load8(k0 + d), b += qv * load8(k1 + d);
    }
    s[0] = hsum8(a), s[1] = hsum8(b);
  }
}

// One key: s[r * ss] = q_r . k.
template <typename Row>
inline void score_rows1(const float* q, int rows, int Dp, Row k, float* s, int ss) {
  for (int r = 0; r < rows; ++r, q += Dp, s += ss) {
    vec8 a0{}, a1{};
    int d = 0;
    for (; d + 2 * kVec <= Dp; d += 2 * kVec) {
      a0 += load8(q + d) * load8(k + d);
      a1 += load8(q + d + kVec) * load8(k + (d + kVec));
    }
    if (d < Dp) a0 += load8(q + d) * load8(k + d);
    *s = hsum8(a0 + a1);
  }
}

// o_r += sum over i < kKeys of prob[r * ps + i] * v[i], for the `rows` accumulator rows o
// (Dp apart): several keys per pass cut the loads and stores of o.
template <int kKeys, typename Row>
inline void accumulate_rows(float* o, int rows, int Dp, const float* prob, int ps, const Row* v) {
  int r = 0;
  for (; r + 2 <= rows; r += 2, o += 2 * Dp, prob += 2 * ps) {
    float p0[kKeys], p1[kKeys];
    for (int i = 0; i < kKeys; ++i) p0[i] = prob[i], p1[i] = prob[ps + i];
    for (int d = 0; d < Dp; d += kVec) {
      vec8 o0 = load8(o + d), o1 = load8(o + Dp + d);
      for (int i = 0; i < kKeys; ++i) {
        const vec8 x = load8(v[i] + d);
        o0 += p0[i] * x, o1 += p1[i] * x;
      }
      store8(o + d, o0);
      store8(o + Dp + d, o1);
    }
  }
  if (r < rows) {
    for (int d = 0; d < Dp; d += kVec) {
      vec8 o0 = load8(o + d);
      for (int i = 0; i < kKeys; ++i) o0 += prob[i] * load8(v[i] + d);
      store8(o + d, o0);
    }
  }
}

// Runs the items of one worker; its buffers live as long as the worker. T: the dtype of q
// and out; Cache: PlainCache<T> or QuantCache<format>.
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
        lens_(lens),
        part_out_(part_out),
        part_lse_(part_lse),
        q_tile_(size_t(rows_head_) * group_heads * Dp_),
        acc_(q_tile_.size()),
        s_tile_(size_t(rows_head_) * group_heads * kTileKeys),
        row_buf_(Dp_, 0.f),
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
      if (p_.k_quant.rotated) hadamard_rotate(dst, D_);  // keys stored as H k: (H q) . (H k) = q . k
      std::fill(dst + D_, dst + Dp_, 0.f);
      state_[r] = RowSoftmax{};
      const KeyRange keys = mask.keys_of(row.s);
      visible_[r] = p_.is_sparse() ? keys : KeyRange{std::max(keys.begin, first), std::min(keys.end, last)};
    }
    std::fill(acc_.begin(), acc_.begin() + size_t(rows) * Dp_, 0.f);

    const int64_t k_head = p_.k_strides.head, v_head = p_.v_strides.head;
    for (int key0 = first; key0 < last; key0 += kTileKeys) {
      const int n = std::min(kTileKeys, last - key0), n_pad = round_up(n, kVec);
      for (int c = 0; c < n; ++c) {
        pos_[c] = decode_key_position(p_, b, h0, key0 + c, len);
        const int row = std::max(pos_[c], 0);  // a key naming no token reads row 0 (len > 0), masked
        k_off_[c] = row_offset(p_, p_.k_strides, b, row) + int64_t(h0) * k_head;
        v_off_[c] = row_offset(p_, p_.v_strides, b, row) + int64_t(h0) * v_head;
      }
      // Scores: keys in pairs, in memory order (key, then head), each against its head's
      // rows; meanwhile this tile's values are prefetched.
      int c = 0;
      for (; c + 2 <= n; c += 2) {
        v_cache_.prefetch(v_off_[c], heads, v_head, D_);
        v_cache_.prefetch(v_off_[c + 1], heads, v_head, D_);
        for (int hh = 0; hh < heads; ++hh) {
          const auto key_a = k_cache_.row(k_off_[c] + hh * k_head);
          const auto key_b = k_cache_.row(k_off_[c + 1] + hh * k_head);
          const float* q = q_tile_.data() + size_t(hh) * rows_head_ * Dp_;
          float* s = s_tile_.data() + size_t(hh) * rows_head_ * kTileKeys + c;
          if (D_ == Dp_) {
            score_rows2(q, rows_head_, Dp_, key_a, key_b, s, kTileKeys);
          } else {
            score_rows1(q, rows_head_, Dp_, padded(key_a), s, kTileKeys);
            score_rows1(q, rows_head_, Dp_, padded(key_b), s + 1, kTileKeys);
          }
        }
      }
      for (; c < n; ++c)
        for (int hh = 0; hh < heads; ++hh) {
          const auto k = k_cache_.row(k_off_[c] + hh * k_head);
          const float* q = q_tile_.data() + size_t(hh) * rows_head_ * Dp_;
          float* s = s_tile_.data() + size_t(hh) * rows_head_ * kTileKeys + c;
          if (D_ == Dp_) score_rows1(q, rows_head_, Dp_, k, s, kTileKeys);
          else score_rows1(q, rows_head_, Dp_, padded(k), s, kTileKeys);
        }
      for (int r = 0; r < rows; ++r) {
        float* s = s_tile_.data() + size_t(r) * kTileKeys;
        if (p_.is_sparse()) {  // mask by token position, key by key
          transform_and_mask_row(s, n_pad, n, 0, KeyRange{0, n}, p_.softcap);
          for (int c = 0; c < n; ++c)
            if (!visible_[r].contains(pos_[c])) s[c] = kNegInf;
        } else {
          transform_and_mask_row(s, n_pad, n, key0, visible_[r], p_.softcap);
        }
        const float factor = softmax_update_row(s, n_pad, state_[r]);
        if (factor != 1.f) scale_row(acc_.data() + size_t(r) * Dp_, Dp_, factor);
      }
      if (!every_row_sees(key0, n, rows)) {
        accumulate_visible(key0, n, rows);
        continue;
      }
      // Values: keys in fours, same order; meanwhile the next tile's keys are prefetched.
      for (c = 0; c < n; c += kValueKeys) {
        const int m = std::min(kValueKeys, n - c);
        for (int j = key0 + kTileKeys + c; j < std::min(last, key0 + kTileKeys + c + m); ++j) {
          const int pos = decode_key_position(p_, b, h0, j, len);
          if (pos >= 0) k_cache_.prefetch(row_offset(p_, p_.k_strides, b, pos) + int64_t(h0) * k_head, heads, k_head, D_);
        }
        for (int hh = 0; hh < heads; ++hh) {
          float* o = acc_.data() + size_t(hh) * rows_head_ * Dp_;
          const float* prob = s_tile_.data() + size_t(hh) * rows_head_ * kTileKeys + c;
          if (D_ == Dp_ && m == kValueKeys) {
            Row v[kValueKeys];
            for (int i = 0; i < kValueKeys; ++i) v[i] = v_cache_.row(v_off_[c + i] + hh * v_head);
            accumulate_rows<kValueKeys>(o, rows_head_, Dp_, prob, kTileKeys, v);
          } else {
            for (int i = 0; i < m; ++i) {
              const Row row = v_cache_.row(v_off_[c + i] + hh * v_head);
              if (D_ == Dp_) {
                accumulate_rows<1>(o, rows_head_, Dp_, prob + i, kTileKeys, &row);
              } else {
                const float* f = padded(row);
                accumulate_rows<1>(o, rows_head_, Dp_, prob + i, kTileKeys, &f);
              }
            }
          }
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

  // Whether row r sees key c of the tile that starts at work key key0.
  bool sees(int r, int key0, int c) const {
    return visible_[r].contains(p_.is_sparse() ? pos_[c] : key0 + c);
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

  // acc += P V for a tile holding keys some row does not see (a window edge, the causal
  // corner of several queries, unselected or padding keys): each row reads only the values
  // of its visible keys, so a masked key's NaN or inf value never meets its zero
  // probability (0 * NaN = NaN). Rare tiles: one value row per (row, key).
  void accumulate_visible(int key0, int n, int rows) {
    const int64_t v_head = p_.v_strides.head;
    for (int r = 0; r < rows; ++r) {
      float* o = acc_.data() + size_t(r) * Dp_;
      const float* prob = s_tile_.data() + size_t(r) * kTileKeys;
      for (int c = 0; c < n; ++c) {
        if (!sees(r, key0, c)) continue;
        const Row row = v_cache_.row(v_off_[c] + r / rows_head_ * v_head);
        if (D_ == Dp_) {
          accumulate_rows<1>(o, 1, Dp_, prob + c, kTileKeys, &row);
        } else {
          const float* f = padded(row);
          accumulate_rows<1>(o, 1, Dp_, prob + c, kTileKeys, &f);
        }
      }
    }
  }

  // A cache row whose head_dim is not a multiple of 8, as floats zero-padded to Dp_ (rows
  // of a multiple of 8 are read in place, converted 8 elements at a time). Quantized
  // caches have head_dims that are multiples of 32 (checked by the binding), so only plain
  // rows come here.
  const float* padded(const T* row) {
    load_row(row, D_, row_buf_.data(), 1.f);
    return row_buf_.data();
  }
  template <KVFormat F>
  const float* padded(QuantRow<F>) {
    throw std::logic_error("attnkit decode: quantized cache rows are multiples of 32 channels");
  }

  const DecodeParams& p_;
  const Cache k_cache_, v_cache_;
  const int D_, Dp_, qgroup_, rows_head_, group_heads_, head_groups_;
  const int32_t* lens_;
  float* part_out_;
  float* part_lse_;
  std::vector<float> q_tile_, acc_, s_tile_, row_buf_;
  int64_t k_off_[kTileKeys], v_off_[kTileKeys];  // rows of kv head h0 of the current keys
  int pos_[kTileKeys];                            // their token positions (-1: none)
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

  // Partial results of split pairs, by slot; slots of whole pairs are never touched, so
  // the buffers are left uninitialised (their untouched pages cost nothing).
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
        for (int slot = parts.first_slot; slot < parts.first_slot + parts.count; ++slot) {
          const size_t row = size_t(slot) * rows_group + r;
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
