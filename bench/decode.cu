// bench/decode: torch-free microbenchmark of the CUDA decode kernel
// (attnkit::cuda::decode from csrc/cuda/kernels.h, lean / stream-K schedule).
//
//   decode [--dtype bf16|fp16] [--hdim D] [--heads H] [--kv-heads HKV] [--seqlen-q Q]
//          [--cases B:CTX[,B:CTX...]] [--page P] [--keep N] [--iters N] [--warmup N] [--no-check]
//          [--kv-format int8|int4|fp8_e4m3 [--group-size N] [--rotate-keys]]
//
// Default: bf16, head_dim 128, 32 q heads / 8 kv heads, one query per sequence, batch x
// context in {1 x 8k, 1 x 32k, 1 x 128k, 1 x 512k, 8 x 32k, 32 x 8k, 64 x 32k}, each with a
// contiguous cache and a paged one (page 16, shuffled block table), and a sparse decode of
// the paged cache selecting 1/N of its pages per (sequence, kv head) (--keep N, default 16:
// the first and last page plus random ones, ascending; 0 = no sparse case). Method
// (docs/benchmarking.md): random inputs filled on the device, input sets rotated to exceed
// 3x the L2, warm-up, CUDA events around each call, median and min-max; GB/s counts the K
// and V bytes the call must read (every cached key of every kv head; sparse: of the
// selected pages), and "% copy" divides
// it by a device-to-device copy measured in the same run. Each case checks 8 sampled
// (sequence, q head) rows against a naive fp32 kernel and scans the output for NaN / inf.
//
// --kv-format adds, after each case, the same case on a quantized cache (docs/quantization.md;
// --group-size channels per scale, default one group per row): rows of random normal K and
// V quantized on the host by attnkit/quant.h (a pool of up to 64k rows per tensor, repeated
// over the cache), so the fp32 check compares with the dequantized cache (quant.h's byte
// decoder). Its GB/s counts the bytes the kernel must read (codes, scales, zeros) and its
// notes give the speed-up over the plain case of the same shape just measured.
// --rotate-keys marks the quantized K rows as rotated (H k, PagedKVCache's default for int8 /
// int4), so the kernel rotates its query rows first; the fp32 check rotates q the same way.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>

#include "attnkit/decode_layout.h"
#include "attnkit/params.h"
#include "attnkit/quant.h"
#include "common.cuh"
#include "cuda/kernels.h"

namespace {

using attnkit::DecodeParams;
using attnkit::KVFormat;
using attnkit::QuantizedRows;
using attnkit::Strides;
using namespace attnkit::bench;

struct Options {
  DType dtype = DType::kBFloat16;
  int hdim = 128, heads = 32, kv_heads = 8, seqlen_q = 1;
  std::vector<std::pair<int, int>> cases{{1, 8192},  {1, 32768}, {1, 131072}, {1, 524288},
                                         {8, 32768}, {32, 8192}, {64, 32768}};
  std::vector<int> pages{0, 16};  // 0 = contiguous
  int keep = 16;                  // sparse case: 1/keep of the pages (0 = none)
  int iters = 20, warmup = 5;
  bool check_rows = true;
  bool quantized = false;  // --kv-format: also run each case on a quantized cache
  KVFormat kv_format = KVFormat::kInt8;
  int group_size = 0;  // channels per scale; 0 = head_dim (one group per row)
  bool rotate_keys = false;  // --rotate-keys: the quantized K rows are rotated (docs/quantization.md)
};

// The quantized cache of a case, or none (plain cache of the q dtype).
struct KvCache {
  bool quantized = false;
  KVFormat format = KVFormat::kInt8;
  int group_size = 0;
  bool rotated_keys = false;  // K rows taken as H k: the kernel rotates q
};

const char* format_name(KVFormat f) {
  return f == KVFormat::kInt8 ? "int8" : f == KVFormat::kInt4 ? "int4" : "fp8_e4m3";
}

[[noreturn]] void usage(const char* why, int code = 2) {
  std::fprintf(code ? stderr : stdout,
               "decode: %s\n"
               "usage: decode [--dtype bf16|fp16] [--hdim D] [--heads H] [--kv-heads HKV] [--seqlen-q Q]\n"
               "              [--cases B:CTX[,B:CTX...]] [--page P (0 = contiguous only)]\n"
               "              [--keep N (sparse: 1/N of the pages; 0 = none)] [--iters N]\n"
               "              [--warmup N] [--no-check] [--kv-format int8|int4|fp8_e4m3 [--group-size N] [--rotate-keys]]\n",
               why);
  std::exit(code);
}

int to_int(const std::string& s, const char* flag, int min = 1) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (end == s.c_str() || *end != '\0' || v < min || v > (1L << 30)) usage((std::string("bad value for ") + flag).c_str());
  return int(v);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage((a + " needs a value").c_str());
      return argv[++i];
    };
    if (a == "--dtype") {
      o.dtype = dtype_arg(value(), usage);
    } else if (a == "--hdim") {
      o.hdim = to_int(value(), "--hdim");
    } else if (a == "--heads") {
      o.heads = to_int(value(), "--heads");
    } else if (a == "--kv-heads") {
      o.kv_heads = to_int(value(), "--kv-heads");
    } else if (a == "--seqlen-q") {
      o.seqlen_q = to_int(value(), "--seqlen-q");
    } else if (a == "--cases") {
      o.cases.clear();
      const std::string list = value();
      for (size_t pos = 0; pos < list.size();) {
        size_t comma = list.find(',', pos);
        if (comma == std::string::npos) comma = list.size();
        const std::string item = list.substr(pos, comma - pos);
        const size_t colon = item.find(':');
        if (colon == std::string::npos) usage("--cases takes B:CTX pairs");
        o.cases.push_back({to_int(item.substr(0, colon), "--cases"), to_int(item.substr(colon + 1), "--cases")});
        pos = comma + 1;
      }
    } else if (a == "--page") {
      const int page = to_int(value(), "--page", 0);
      o.pages = page ? std::vector<int>{0, page} : std::vector<int>{0};
    } else if (a == "--keep") {
      o.keep = to_int(value(), "--keep", 0);
    } else if (a == "--iters") {
      o.iters = to_int(value(), "--iters");
    } else if (a == "--warmup") {
      o.warmup = to_int(value(), "--warmup");
    } else if (a == "--no-check") {
      o.check_rows = false;
    } else if (a == "--kv-format") {
      const std::string v = value();
      o.quantized = true;
      if (v == "int8") o.kv_format = KVFormat::kInt8;
      else if (v == "int4") o.kv_format = KVFormat::kInt4;
      else if (v == "fp8_e4m3") o.kv_format = KVFormat::kFp8E4M3;
      else usage("--kv-format takes int8, int4 or fp8_e4m3");
    } else if (a == "--group-size") {
      o.group_size = to_int(value(), "--group-size");
    } else if (a == "--rotate-keys") {
      o.rotate_keys = true;
    } else if (a == "-h" || a == "--help") {
      usage("torch-free microbenchmark of attnkit's CUDA decode kernel", 0);
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  if (o.heads % o.kv_heads != 0) usage("--heads must be a multiple of --kv-heads");
  if (o.quantized && o.hdim % 32 != 0) usage("--kv-format needs an --hdim that is a multiple of 32");
  if (o.group_size && !o.quantized) usage("--group-size needs --kv-format");
  if (o.rotate_keys && (!o.quantized || o.hdim < 32 || o.hdim > 256 || (o.hdim & (o.hdim - 1))))
    usage("--rotate-keys needs --kv-format and --hdim 32, 64, 128 or 256");
  if (o.group_size && (o.kv_format == KVFormat::kFp8E4M3 || o.group_size % 32 || o.hdim % o.group_size))
    usage("--group-size must be a multiple of 32 dividing --hdim, and int8 / int4 only (fp8 scales rows)");
  return o;
}

// Offset of row t of (sequence b, kv head h) in a contiguous or paged cache: in elements
// (plain), or in rows of QuantizedRows (quantized; the strides count rows).
__device__ int64_t key_row(const DecodeParams& p, const Strides& s, int b, int t, int h) {
  if (!p.is_paged()) return b * s.batch + int64_t(t) * s.row + int64_t(h) * s.head;
  const int page = p.block_table[b * p.block_table_stride + t / p.page_size];
  return page * s.batch + int64_t(t % p.page_size) * s.row + int64_t(h) * s.head;
}

// Channel c of the cache row at `row` (key_row) as a float: the element, or its code
// dequantized one byte at a time by quant.h (not the kernel's 16-byte decoder).
template <typename T>
__device__ float cache_value(const void* cache, const QuantizedRows& quant, int64_t row, int c) {
  if (quant.data == nullptr) return attnkit::cuda::to_float(static_cast<const T*>(cache)[row + c]);
  const uint32_t byte = *quant.codes(row, c - c % attnkit::channels_per_byte(quant.format));
  const float scale = quant.scale_at(row, c), zero = quant.zero_at(row, c);
  float x[2];
  switch (quant.format) {
    case KVFormat::kInt8: attnkit::dequantize_byte<KVFormat::kInt8>(byte, scale, zero, x); return x[0];
    case KVFormat::kInt4: attnkit::dequantize_byte<KVFormat::kInt4>(byte, scale, zero, x); return x[c % 2];
    case KVFormat::kFp8E4M3: attnkit::dequantize_byte<KVFormat::kFp8E4M3>(byte, scale, zero, x); return x[0];
  }
  return NAN;
}

// Naive fp32 decode of one sampled (sequence, q head, query) per block: scores of every
// visible key into `scratch`, then max, sum and P @ V. out: head_dim floats per row.
// Sparse: the keys are the work axis of decode_layout.h (ctest checks that mapping).
constexpr int kRefThreads = 256;
template <typename T>
__global__ void reference_rows(const __grid_constant__ DecodeParams p, const int* rows, float* scratch, int max_len,
                               float* out, float* lse) {
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int len = p.cache_seqlens[b];
  const int last = len - p.seqlen_q + i;  // the query's own position: keys [0, last]
  const int n_keys = p.is_sparse() ? p.selection_len * p.selection_unit : last + 1;
  auto token = [&](int j) {  // token of work key j, or -1 when it is not visible
    const int t = attnkit::decode_key_position(p, b, h_kv, j, len);
    return t <= last ? t : -1;
  };
  float* s = scratch + int64_t(blockIdx.x) * max_len;
  const T* q_row = static_cast<const T*>(p.q) + b * p.q_strides.batch + int64_t(i) * p.q_strides.row +
                   h * p.q_strides.head;
  __shared__ float q[256];  // the query, rotated as the keys are (H q) when they are stored as H k
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) q[c] = attnkit::cuda::to_float(q_row[c]);
  __syncthreads();
  if (p.k_quant.rotated && threadIdx.x == 0) attnkit::hadamard_rotate(q, p.head_dim);
  __syncthreads();
  __shared__ float red[kRefThreads];
  float m = -INFINITY;
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
    const int t = token(j);
    s[j] = -INFINITY;
    if (t < 0) continue;
    const int64_t k = key_row(p, p.k_strides, b, t, h_kv);
    float dot = 0.f;
    for (int c = 0; c < p.head_dim; ++c)
      dot += q[c] * cache_value<T>(p.k_cache, p.k_quant, k, c);
    s[j] = dot * p.scale;
    m = fmaxf(m, s[j]);
  }
  m = block_reduce(m, true, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) sum += (s[j] = token(j) < 0 ? 0.f : expf(s[j] - m));
  sum = block_reduce(sum, false, red);
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < n_keys; ++j) {
      const int t = token(j);
      if (t >= 0) acc += s[j] * cache_value<T>(p.v_cache, p.v_quant, key_row(p, p.v_strides, b, t, h_kv), c);
    }
    out[int64_t(blockIdx.x) * p.head_dim + c] = sum > 0.f ? acc / sum : 0.f;
  }
  if (threadIdx.x == 0) lse[blockIdx.x] = sum > 0.f ? m + logf(sum) : -INFINITY;
}

template <typename T>
__global__ void gather_rows(const __grid_constant__ DecodeParams p, const int* rows, float* out, float* lse) {
  const int b = rows[3 * blockIdx.x], h = rows[3 * blockIdx.x + 1], i = rows[3 * blockIdx.x + 2];
  const T* o = static_cast<const T*>(p.out) + b * p.out_strides.batch + int64_t(i) * p.out_strides.row +
               h * p.out_strides.head;
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x)
    out[int64_t(blockIdx.x) * p.head_dim + c] = attnkit::cuda::to_float(o[c]);
  if (threadIdx.x == 0) lse[blockIdx.x] = p.lse[(int64_t(b) * p.heads_q + h) * p.seqlen_q + i];
}

// Checks 8 sampled rows against reference_rows and scans the output. Returns a verdict.
std::string check_rows(const DecodeParams& p, int ctx) {
  const int nrows = 8;
  std::vector<int> rows(3 * nrows);
  std::mt19937 rng(7);
  for (int r = 0; r < nrows; ++r) {
    rows[3 * r] = int(rng() % p.batch);
    rows[3 * r + 1] = int(rng() % p.heads_q);
    rows[3 * r + 2] = int(rng() % p.seqlen_q);
  }
  DeviceBuffer scratch(size_t(nrows) * ctx * 4);
  SampledRows sample(rows, nrows, p.head_dim);
  const int64_t n_out = int64_t(p.batch) * p.seqlen_q * p.heads_q * p.head_dim;
  for_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    reference_rows<T><<<nrows, kRefThreads>>>(p, sample.rows.as<int>(), scratch.as<float>(), ctx,
                                              sample.ref_out.as<float>(), sample.ref_lse.as<float>());
    gather_rows<T><<<nrows, 128>>>(p, sample.rows.as<int>(), sample.got_out.as<float>(), sample.got_lse.as<float>());
    count_nonfinite<T><<<1024, 256>>>(static_cast<const T*>(p.out), n_out, sample.nonfinite.as<unsigned long long>());
  });
  return sample.verdict();
}

struct Sets : DeviceArena {
  std::vector<DecodeParams> params;
};

// Fills `rows` rows of a quantized cache (codes, scale, zero on the device) with random
// normal rows quantized on the host by quant.h: a pool of up to 64k rows, repeated.
void fill_quantized(const KvCache& kv, const QuantizedRows& dst, int64_t rows, uint32_t seed) {
  const int64_t pool = std::min<int64_t>(rows, 1 << 16);
  const int groups = dst.groups(), row_bytes = dst.row_bytes();
  std::vector<uint8_t> codes(size_t(pool) * row_bytes);
  std::vector<float> scale(size_t(pool) * groups), zero(scale.size()), x(dst.head_dim);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (int64_t r = 0; r < pool; ++r) {
    for (float& v : x) v = normal(rng);
    for (int g = 0; g < groups; ++g) {
      const int c0 = g * kv.group_size;
      attnkit::quantize_group(kv.format, [&](int i) { return x[c0 + i]; }, kv.group_size,
                              codes.data() + r * row_bytes + c0 / attnkit::channels_per_byte(kv.format),
                              scale.data() + r * groups + g, zero.data() + r * groups + g);
    }
  }
  for (int64_t r = 0; r < rows; r += pool) {
    const int64_t n = std::min(pool, rows - r);
    check(cudaMemcpy(const_cast<uint8_t*>(dst.data) + r * row_bytes, codes.data(), n * row_bytes,
                     cudaMemcpyHostToDevice), "cudaMemcpy");
    check(cudaMemcpy(const_cast<float*>(dst.scale) + r * groups, scale.data(), n * groups * 4,
                     cudaMemcpyHostToDevice), "cudaMemcpy");
    if (dst.zero)
      check(cudaMemcpy(const_cast<float*>(dst.zero) + r * groups, zero.data(), n * groups * 4,
                       cudaMemcpyHostToDevice), "cudaMemcpy");
  }
}

// keep > 0: sparse decode of the paged cache over 1/keep of each sequence's pages. kv: the
// cache's storage; plain_ms: the median of the plain case of this shape (quantized only,
// for the speed-up). Returns false on a device error; *median_ms gets the case's median.
bool run_case(const Options& o, const KvCache& kv, int batch, int ctx, int page, int keep, double copy_gbps,
              double plain_ms, double* median_ms, int& failures) {
  *median_ms = NAN;
  char name[160];
  const std::string layout = !page ? "contiguous"
                             : keep ? "page" + std::to_string(page) + " keep1/" + std::to_string(keep)
                                    : "page" + std::to_string(page);
  std::string storage = dtype_name(o.dtype);
  if (kv.quantized) {
    storage += std::string("+") + format_name(kv.format);
    if (kv.group_size != o.hdim) storage += "g" + std::to_string(kv.group_size);
    if (kv.rotated_keys) storage += "+rot";
  }
  std::snprintf(name, sizeof name, "%s B%d ctx%d Hq%d Hkv%d D%d q%d %s", storage.c_str(), batch, ctx, o.heads,
                o.kv_heads, o.hdim, o.seqlen_q, layout.c_str());
  if (!attnkit::cuda::decode_supports(o.dtype, o.hdim)) {
    std::printf("%-56s  skipped: decode_supports is false\n", name);
    return true;
  }
  if (page && ctx % page) {
    std::printf("%-56s  skipped: context not a multiple of the page\n", name);
    return true;
  }
  const size_t es = elem_size(o.dtype);
  const int64_t n_q = int64_t(batch) * o.seqlen_q * o.heads * o.hdim;
  const int64_t n_kv = int64_t(batch) * ctx * o.kv_heads * o.hdim;
  const int pages_per_seq = page ? ctx / page : 0;
  const int selected = keep ? std::max(2, pages_per_seq / keep) : 0;  // pages per (sequence, kv head)
  if (keep && selected > pages_per_seq) {
    std::printf("%-56s  skipped: fewer than 2 pages per sequence\n", name);
    return true;
  }
  // Bytes of one cache row (token, kv head): elements, or codes + scales (+ zeros).
  QuantizedRows rows_layout;
  rows_layout.format = kv.format;
  rows_layout.head_dim = o.hdim;
  rows_layout.group_size = kv.group_size;
  const int scale_arrays = kv.format == KVFormat::kFp8E4M3 ? 1 : 2;
  const double row_bytes = kv.quantized ? rows_layout.row_bytes() + 4.0 * scale_arrays * rows_layout.groups()
                                        : double(o.hdim) * es;
  const int64_t n_rows = n_kv / o.hdim;
  const double kv_bytes = 2.0 * row_bytes * (keep ? double(batch) * o.kv_heads * selected * page : double(n_rows));
  const double set_bytes = 2.0 * row_bytes * n_rows;
  int dev = 0, l2 = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
  const int nsets = int(std::min<double>(4, std::max<double>(1, std::ceil(3.0 * l2 / set_bytes))));

  Sets sets;
  try {
    for (int s = 0; s < nsets; ++s) {
      DecodeParams p{};
      p.dtype = o.dtype;
      p.batch = batch;
      p.seqlen_q = o.seqlen_q;
      p.heads_q = o.heads;
      p.heads_kv = o.kv_heads;
      p.head_dim = o.hdim;
      p.q = sets.alloc(n_q * es);
      p.out = sets.alloc(n_q * es);
      p.lse = static_cast<float*>(sets.alloc(size_t(batch) * o.heads * o.seqlen_q * 4));
      p.q_strides = p.out_strides = Strides{int64_t(o.seqlen_q) * o.heads * o.hdim, int64_t(o.heads) * o.hdim, o.hdim};
      const int64_t rows_per_block = page ? page : ctx;  // contiguous: one "page" per sequence
      if (kv.quantized) {  // strides count rows
        for (QuantizedRows* q : {&p.k_quant, &p.v_quant}) {
          *q = rows_layout;
          q->data = static_cast<const uint8_t*>(sets.alloc(size_t(n_rows) * rows_layout.row_bytes()));
          q->scale = static_cast<const float*>(sets.alloc(size_t(n_rows) * rows_layout.groups() * 4));
          q->zero = scale_arrays == 2 ? static_cast<const float*>(sets.alloc(size_t(n_rows) * rows_layout.groups() * 4))
                                      : nullptr;
        }
        p.k_quant.rotated = kv.rotated_keys;
        p.k_cache = p.k_quant.data;
        p.v_cache = p.v_quant.data;
        p.k_strides = p.v_strides = Strides{rows_per_block * o.kv_heads, o.kv_heads, 1};
      } else {
        p.k_cache = sets.alloc(n_kv * es);
        p.v_cache = sets.alloc(n_kv * es);
        p.k_strides = p.v_strides =
            Strides{rows_per_block * o.kv_heads * o.hdim, int64_t(o.kv_heads) * o.hdim, o.hdim};
      }
      std::vector<int32_t> lens(batch, ctx);
      auto* d_lens = static_cast<int32_t*>(sets.alloc(batch * 4));
      check(cudaMemcpy(d_lens, lens.data(), batch * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
      p.cache_seqlens = d_lens;
      if (page) {
        std::vector<int32_t> table(size_t(batch) * pages_per_seq);
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), std::mt19937(s + 1));
        auto* d_table = static_cast<int32_t*>(sets.alloc(table.size() * 4));
        check(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
        p.block_table = d_table;
        p.block_table_stride = pages_per_seq;
        p.page_size = page;
      }
      if (keep) {  // the first and last page and random others, ascending, per (sequence, kv head)
        std::vector<int32_t> selection;
        std::mt19937 rng(100 + s);
        std::vector<int32_t> middle(pages_per_seq - 2);
        std::iota(middle.begin(), middle.end(), 1);
        for (int r = 0; r < batch * o.kv_heads; ++r) {
          std::shuffle(middle.begin(), middle.end(), rng);
          std::vector<int32_t> row(middle.begin(), middle.begin() + (selected - 2));
          row.push_back(0);
          row.push_back(pages_per_seq - 1);
          std::sort(row.begin(), row.end());
          selection.insert(selection.end(), row.begin(), row.end());
        }
        auto* d_selection = static_cast<int32_t*>(sets.alloc(selection.size() * 4));
        check(cudaMemcpy(d_selection, selection.data(), selection.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
        p.selection = d_selection;
        p.selection_len = selected;
        p.selection_unit = page;
      }
      p.scale = 1.0f / std::sqrt(float(o.hdim));
      p.softcap = 0.f;
      p.window_left = -1;
      fill(o.dtype, const_cast<void*>(p.q), n_q, 4 * s + 1);
      if (kv.quantized) {
        fill_quantized(kv, p.k_quant, n_rows, 4 * s + 2);
        fill_quantized(kv, p.v_quant, n_rows, 4 * s + 3);
      } else {
        fill(o.dtype, const_cast<void*>(p.k_cache), n_kv, 4 * s + 2);
        fill(o.dtype, const_cast<void*>(p.v_cache), n_kv, 4 * s + 3);
      }
      sets.params.push_back(p);
    }
  } catch (const std::exception& e) {
    cudaGetLastError();
    std::printf("%-56s  skipped: %s\n", name, e.what());
    return true;
  }
  try {
    // SMs x resident CTAs per SM of this case's kernel instantiation (occupancy API, cached).
    const int workers = attnkit::cuda::decode_workers(sets.params[0]);
    const int64_t ws_bytes = attnkit::cuda::decode_workspace_bytes(sets.params[0], ctx, workers);
    void* workspace = sets.alloc(size_t(std::max<int64_t>(ws_bytes, 16)));
    const Stat t = time_calls(
        [&](int i) { attnkit::cuda::decode(sets.params[i % nsets], ctx, workers, workspace, nullptr); }, o.warmup,
        o.iters);
    *median_ms = t.median;
    std::string notes = std::to_string(workers) + " workers";
    if (kv.quantized) {
      char speedup[64];
      std::snprintf(speedup, sizeof speedup, "%.2fx %s; ", plain_ms / t.median, dtype_name(o.dtype));
      notes = speedup + notes;
    }
    if (nsets > 1) notes += ", " + std::to_string(nsets) + " input sets";
    if (o.check_rows) {
      attnkit::cuda::decode(sets.params[0], ctx, workers, workspace, nullptr);
      const std::string v = check_rows(sets.params[0], ctx);
      if (v.rfind("ok", 0) != 0) ++failures;
      notes = "check " + v + "; " + notes;
    }
    const double gbps = kv_bytes / (t.median * 1e-3) / 1e9;
    std::printf("%-56s %9.4f  %9.4f-%-9.4f %8.1f  %6.1f%%  %s\n", name, t.median, t.lo, t.hi, gbps,
                100.0 * gbps / copy_gbps, notes.c_str());
    std::fflush(stdout);
  } catch (const std::exception& e) {
    if (!case_failed(name, 56, e, failures)) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    const int dev = print_device("decode", argc, argv);
    std::string desc;
    const double copy_gbps = measure_copy_gbps(desc);
    std::printf("\ncopy ceiling: %.0f GB/s (%s)\nGB/s = K and V bytes read (quantized: codes, scales, zeros) / "
                "median time; %d warm-up + %d timed calls\n\n",
                copy_gbps, desc.c_str(), o.warmup, o.iters);
    std::printf("%-56s %9s  %-19s %8s  %7s  %s\n", "case", "ms(med)", "min-max ms", "GB/s", "% copy", "notes");
    int failures = 0;
    const KvCache quant{o.quantized, o.kv_format, o.group_size ? o.group_size : o.hdim, o.rotate_keys};
    for (const auto& [batch, ctx] : o.cases)
      for (const int page : o.pages)
        for (const int keep : page && o.keep ? std::vector<int>{0, o.keep} : std::vector<int>{0}) {
          double plain_ms = NAN, quant_ms = NAN;
          bool alive = run_case(o, KvCache{}, batch, ctx, page, keep, copy_gbps, NAN, &plain_ms, failures);
          if (alive && o.quantized)
            alive = run_case(o, quant, batch, ctx, page, keep, copy_gbps, plain_ms, &quant_ms, failures);
          if (!alive) {
            std::printf("device error: stopping\n");
            return 1;
          }
        }
    if (failures) std::printf("\n%d case(s) FAILED\n", failures);
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "decode: %s\n", e.what());
    return 1;
  }
}
