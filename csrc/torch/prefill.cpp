// Bindings of attention_fwd / attention_bwd (dense and varlen): checks, allocation,
// params, dispatch to the CPU or CUDA kernels.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/kernels.h"
#include "prefill.h"
#include "quant_cache.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

// Checks one cu_seqlens tensor; on the CPU also its values (on a GPU that would need a
// host sync, so the CUDA kernels must treat lengths as untrusted and clamp).
void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch, int64_t total, int64_t max_seqlen,
                      const char* max_name, const at::Tensor& q) {
  check_index_tensor(cu, 1, name, q);
  TORCH_CHECK_VALUE(cu.size(0) == batch + 1, name, " must have batch + 1 = ", batch + 1, " entries, got ",
                    cu.size(0));
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
  if (!cu.is_cpu()) return;
  const at::Tensor c = cu.contiguous();
  const int32_t* v = c.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(v[0] == 0, name, "[0] must be 0, got ", v[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(v[b + 1] >= v[b], name, " must be non-decreasing, but ", name, "[", b + 1, "] = ", v[b + 1],
                      " < ", v[b]);
    TORCH_CHECK_VALUE(v[b + 1] - v[b] <= max_seqlen, max_name, " = ", max_seqlen, " is smaller than sequence ", b,
                      " of ", name, " (length ", v[b + 1] - v[b], ")");
  }
  TORCH_CHECK_VALUE(total < 0 || v[batch] == total, name, "[-1] must equal the number of tokens (", total,
                    "), got ", v[batch]);
}

// Paged keys (block_table) and the optional per-sequence key cap (seqused_k) of the inference
// op attention_varlen_kv; on the CPU also their values against the pages and the table.
void set_paged_keys(AttentionParams& p, const at::Tensor& k, const OptTensor& block_table,
                    const OptTensor& seqused_k, const at::Tensor& q, at::Tensor& table, at::Tensor& used) {
  if (block_table) {
    check_index_tensor(*block_table, 2, "block_table", q);
    TORCH_CHECK_VALUE(block_table->size(0) == p.batch, "block_table must have batch = ", p.batch, " rows, got ",
                      block_table->size(0));
    table = block_table->contiguous();
    p.block_table = table.data_ptr<int32_t>();
    p.block_table_stride = table.size(1);
    p.page_size = int(k.size(1));
    TORCH_CHECK_VALUE(p.page_size > 0, "k must have page_size > 0 (dim 1 of (num_pages, page_size, kv_heads, ",
                      "head_dim))");
  }
  if (seqused_k) {
    check_index_tensor(*seqused_k, 1, "seqused_k", q);
    TORCH_CHECK_VALUE(seqused_k->size(0) == p.batch, "seqused_k must have batch = ", p.batch, " entries, got ",
                      seqused_k->size(0));
    used = seqused_k->contiguous();
    p.seqused_k = used.data_ptr<int32_t>();
  }
  if (!q.is_cpu()) return;  // values are checked where reading them costs no device sync
  const int64_t capacity = p.block_table ? p.block_table_stride * p.page_size : -1;
  for (int b = 0; b < p.batch; ++b) {
    int64_t len = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    if (p.seqused_k) {
      TORCH_CHECK_VALUE(p.seqused_k[b] >= 0, "seqused_k[", b, "] = ", p.seqused_k[b], " is negative");
      len = std::min<int64_t>(len, p.seqused_k[b]);
    }
    if (!p.block_table) continue;
    TORCH_CHECK_VALUE(len <= capacity, "sequence ", b, " has ", len, " keys, more than block_table holds (",
                      p.block_table_stride, " pages x page_size ", p.page_size, ")");
    const int32_t* row = p.block_table + b * p.block_table_stride;
    for (int64_t i = 0; i < (len + p.page_size - 1) / p.page_size; ++i)
      TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < k.size(0), "block_table[", b, ", ", i, "] = ", row[i],
                        " is not a page id in [0, ", k.size(0), ")");
  }
}

// Sink tokens and ALiBi slopes (float32, (heads_q,) or (batch, heads_q), on q's device);
// slopes keeps the contiguous copy the params point into.
void set_score_mods(AttentionParams& p, int64_t sink_tokens, const OptTensor& alibi_slopes, const at::Tensor& q,
                    at::Tensor& slopes) {
  TORCH_CHECK_VALUE(sink_tokens >= 0, "sink_tokens must be >= 0, got ", sink_tokens);
  p.sink_tokens = window_as_int(sink_tokens);
  if (!alibi_slopes) return;
  const at::Tensor& a = *alibi_slopes;
  TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == q.device(), "alibi_slopes must be on the device of q (", q.device(), "), got ",
                    a.device());
  const bool per_head = a.dim() == 1 && a.size(0) == p.heads_q;
  const bool per_sequence = a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.heads_q;
  TORCH_CHECK_VALUE(per_head || per_sequence, "alibi_slopes must have shape (heads,) = (", p.heads_q,
                    ",) or (batch, heads) = (", p.batch, ", ", p.heads_q, "), got ", a.sizes());
  slopes = a.contiguous();
  p.alibi_slopes = slopes.data_ptr<float>();
  p.alibi_batch_stride = per_sequence ? p.heads_q : 0;
}

#ifdef ATTNKIT_WITH_CUDA
// The CUDA kernels move 16-byte vectors: every stride but head_dim's and the start must be
// multiples of 8 fp16 / bf16 elements. Other layouts are copied once.
at::Tensor cuda_ready(const at::Tensor& t) {
  const auto aligned = [](const at::Tensor& x) {
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
    for (int64_t d = 0; d + 1 < x.dim(); ++d)
      if (x.stride(d) % 8 != 0 && x.size(d) > 1) return false;
    return true;
  };
  if (aligned(t)) return t;
  at::Tensor c = t.contiguous();
  return aligned(c) ? c : c.clone();
}

void check_cuda(const AttentionParams& p, const char* op) {
  TORCH_CHECK_VALUE(p.dtype != DType::kFloat32, "attnkit.", op,
                    " on CUDA takes float16 or bfloat16 q, k, v (dtype float32 runs on the CPU only)");
  TORCH_CHECK_VALUE(cuda::attention_supports(p.dtype, p.head_dim), "attnkit.", op,
                    " on CUDA needs head_dim a multiple of 8 and at most 256, got head_dim ", p.head_dim);
  TORCH_CHECK_VALUE(p.batch <= 65535 && p.heads_q <= 65535, "attnkit.", op,
                    " on CUDA takes at most 65535 sequences and heads, got batch ", p.batch, " and ", p.heads_q,
                    " heads");
}
#endif

}  // namespace

// Validates q, k, v and the options; fills the params except the output pointers.
// paged: k and v are pages (num_pages, page_size, kv_heads, head_dim) of varlen sequences.
AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, bool causal, double scale, int64_t window_left,
                                      int64_t window_right, double softcap, bool paged, bool quantized) {
  const bool varlen = cu_q.has_value();
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "(total_tokens, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  const char* kv_layout = paged ? "(num_pages, page_size, kv_heads, head_dim)" : layout;
  check_rank(q, rank, "q", layout);
  check_rank(k, paged ? 4 : rank, "k", kv_layout);
  check_rank(v, paged ? 4 : rank, "v", kv_layout);
  AttentionParams p{};
  p.dtype = dtype_of(q, "q");
  if (!quantized) {
    check_like(k, "k", q, "q");
    check_like(v, "v", q, "q");
  }
  check_head_dim_contiguous(q, "q");
  check_head_dim_contiguous(k, "k");
  check_head_dim_contiguous(v, "v");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_VALUE(head_dim > 0, "q must have head_dim > 0");
  if (!quantized) {
    TORCH_CHECK_VALUE(k.size(-1) == head_dim, "k must have the head_dim of q (", head_dim, "), got ", k.size(-1));
    TORCH_CHECK_VALUE(v.size(-1) == head_dim, "v must have the head_dim of q (", head_dim, "), got ", v.size(-1));
  }
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t heads_q = q.size(-2), heads_kv = k.size(-2);
  TORCH_CHECK_VALUE(heads_kv > 0 && heads_q % heads_kv == 0, "q heads (", heads_q,
                    ") must be a multiple of k/v heads (", heads_kv, ")");
  check_options(window_left, window_right, softcap);

  if (varlen) {
    const int64_t batch = cu_q->size(0) - 1;
    TORCH_CHECK_VALUE(cu_q->dim() == 1 && batch >= 1, "cu_seqlens_q must be 1-D with at least 2 entries, got shape ",
                      cu_q->sizes());
    check_cu_seqlens(*cu_q, "cu_seqlens_q", batch, q.size(0), max_seqlen_q, "max_seqlen_q", q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", batch, paged ? -1 : k.size(0), max_seqlen_k, "max_seqlen_k", q);
    p.batch = int(batch);
    p.seqlen_q = int(max_seqlen_q);
    p.seqlen_k = int(max_seqlen_k);
    p.cu_seqlens_q = cu_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->data_ptr<int32_t>();
    p.total_q = int(q.size(0));
    p.total_k = int(k.size(0));
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
    p.batch = int(q.size(0));
    p.seqlen_q = int(q.size(1));
    p.seqlen_k = int(k.size(1));
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.heads_q = int(heads_q);
  p.heads_kv = int(heads_kv);
  p.head_dim = int(head_dim);
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.causal = causal;
  p.window_left = window_as_int(window_left);
  p.window_right = window_as_int(window_right);
  return p;
}

// A tensor as the kernels of its device take it (CUDA: 16-byte aligned rows).
at::Tensor for_device(const at::Tensor& t) {
#ifdef ATTNKIT_WITH_CUDA
  if (t.is_cuda()) return cuda_ready(t);
#endif
  return t;
}

AttentionBwdBuffers prepare_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                          const OptTensor& grad_lse, const AttentionParams& fwd) {
  AttentionBwdBuffers bw;
  AttentionBwdParams& bp = bw.params;
  bp.fwd = fwd;
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  check_like(dout, "dout", q, "q");
  check_like(out, "out", q, "q");
  check_head_dim_contiguous(dout, "dout");
  check_head_dim_contiguous(out, "out");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.device() == q.device(),
                    "lse must be float32 on the device of q");
  const std::vector<int64_t> lse_shape = bp.fwd.is_varlen() ? std::vector<int64_t>{q.size(1), q.size(0)}
                                                            : std::vector<int64_t>{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), "lse must have shape ", at::IntArrayRef(lse_shape),
                    ", got ", lse.sizes());
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->scalar_type() == at::kFloat && grad_lse->device() == q.device(),
                      "grad_lse must be float32 on the device of q");
    TORCH_CHECK_VALUE(grad_lse->sizes() == at::IntArrayRef(lse_shape), "grad_lse must have the shape of lse ",
                      at::IntArrayRef(lse_shape), ", got ", grad_lse->sizes());
    bw.grad_lse = grad_lse->contiguous();
    bp.grad_lse = bw.grad_lse.data_ptr<float>();
  }
  bw.lse = lse.contiguous();
  bw.out = for_device(out);
  bw.dout = for_device(dout);
  bw.dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  bw.dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  bw.dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  bp.fwd.out = const_cast<void*>(bw.out.data_ptr());
  bp.fwd.out_strides = strides_of(bw.out);
  bp.fwd.lse = const_cast<float*>(bw.lse.data_ptr<float>());
  bp.dout = bw.dout.data_ptr();
  bp.dout_strides = strides_of(bw.dout);
  bp.dq = bw.dq.data_ptr();
  bp.dk = bw.dk.data_ptr();
  bp.dv = bw.dv.data_ptr();
  bp.dq_strides = strides_of(bw.dq);
  bp.dk_strides = strides_of(bw.dk);
  bp.dv_strides = strides_of(bw.dv);
  if (q.numel() == 0 || k.numel() == 0) {  // nothing to recompute: gradients are zero
    bw.dq.zero_();
    bw.dk.zero_();
    bw.dv.zero_();
    bw.nothing_to_do = true;
  } else if (q.is_cuda()) {
    bw.dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // zeroed by the kernel
    bw.delta = at::empty(lse_shape, q.options().dtype(at::kFloat));
    bp.dq_accum = bw.dq_accum.data_ptr<float>();
    bp.dq_accum_strides = strides_of(bw.dq_accum);
    bp.delta = bw.delta.data_ptr<float>();
  }
  return bw;
}

namespace {

// q times the Hadamard rotation of attnkit/quant.h along head_dim (keys stored as H k:
// (H q) . (H k) = q . k), computed in float32 and returned in q's dtype. Row i of the matrix
// is the rotation of unit vector i, so q @ matrix rotates each row as hadamard_rotate does.
at::Tensor hadamard_rotated(const at::Tensor& q) {
  const int64_t n = q.size(-1);
  at::Tensor matrix = at::zeros({n, n}, at::kFloat);
  float* m = matrix.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    m[i * n + i] = 1.f;
    hadamard_rotate(m + i * n, int(n));
  }
  return at::matmul(q.to(at::kFloat), matrix.to(q.device())).to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> run_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const OptTensor& cu_q, const OptTensor& cu_k, const OptTensor& block_table,
                                           const OptTensor& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                           bool causal, double scale, int64_t window_left, int64_t window_right,
                                           double softcap, int64_t sink_tokens, const OptTensor& alibi_slopes,
                                           const CacheQuant& quant) {
  const c10::DeviceGuard guard(q.device());
  FoldedScale folded = fold_scale_for_cuda(q, scale);
  if (quant.kv_format && quant.rotated_keys) {
    check_rotation(true, q.size(-1), "rotated_keys");
    folded.q = hadamard_rotated(folded.q);
  }
  const at::Tensor qd = for_device(folded.q), kd = for_device(k), vd = for_device(v);
  AttentionParams p = make_attention_params(qd, kd, vd, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, folded.scale,
                                            window_left, window_right, softcap, block_table.has_value(),
                                            quant.kv_format.has_value());
  if (set_quantized_cache(quant, qd, kd, vd, "k", "v", p.k_quant, p.v_quant)) {
    p.k_strides = row_strides(kd);
    p.v_strides = row_strides(vd);
  }
  at::Tensor table, used, slopes;
  if (block_table || seqused_k) set_paged_keys(p, kd, block_table, seqused_k, q, table, used);
  set_score_mods(p, sink_tokens, alibi_slopes, q, slopes);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = p.is_varlen() ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                                 : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr<float>();
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda(p, "attention");
    if (q.numel() > 0) cuda::attention_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
    return {out, lse};
  }
#endif
  if (q.numel() > 0) cpu::attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k, bool causal, double scale, int64_t window_left,
                                                 int64_t window_right, double softcap, int64_t sink_tokens,
                                                 const OptTensor& alibi_slopes) {
  const std::optional<std::string> no_format;
  return run_fwd(q, k, v, cu_q, cu_k, std::nullopt, std::nullopt, max_seqlen_q, max_seqlen_k, causal, scale,
                 window_left, window_right, softcap, sink_tokens, alibi_slopes,
                 CacheQuant{no_format, 0, std::nullopt, std::nullopt, std::nullopt, std::nullopt, false});
}

// Inference-only varlen attention over paged keys (block_table), capped key counts
// (seqused_k) and / or quantized keys and values (kv_format ...: the codes and scales of a
// quantized cache, as decode takes them): FlashAttention's flash_attn_varlen_func(...,
// block_table=...) / seqused_k.
std::tuple<at::Tensor, at::Tensor> attention_varlen_kv(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    const OptTensor& block_table, const OptTensor& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, int64_t window_left, int64_t window_right, double softcap, int64_t sink_tokens,
    const OptTensor& alibi_slopes, const std::optional<std::string>& kv_format, int64_t group_size,
    const OptTensor& k_scale, const OptTensor& k_zero, const OptTensor& v_scale, const OptTensor& v_zero,
    bool rotated_keys) {
  return run_fwd(q, k, v, cu_q, cu_k, block_table, seqused_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
                 window_right, softcap, sink_tokens, alibi_slopes,
                 CacheQuant{kv_format, group_size, k_scale, k_zero, v_scale, v_zero, rotated_keys});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool causal, double scale, int64_t window_left, int64_t window_right, double softcap, const OptTensor& grad_lse,
    int64_t sink_tokens, const OptTensor& alibi_slopes) {
  const c10::DeviceGuard guard(q.device());
  const FoldedScale folded = fold_scale_for_cuda(q, scale);
  const at::Tensor qd = for_device(folded.q), kd = for_device(k), vd = for_device(v);
  AttentionParams fwd = make_attention_params(qd, kd, vd, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal,
                                              folded.scale, window_left, window_right, softcap);
  at::Tensor slopes;
  set_score_mods(fwd, sink_tokens, alibi_slopes, q, slopes);
  AttentionBwdBuffers bw = prepare_attention_bwd(dout, q, k, v, out, lse, grad_lse, fwd);
  if (bw.nothing_to_do) return {bw.dq, bw.dk, bw.dv};
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda(bw.params.fwd, "attention backward");
    cuda::attention_bwd(bw.params, c10::cuda::getCurrentCUDAStream().stream());
    unfold_dq(bw.dq, folded);
    return {bw.dq, bw.dk, bw.dv};
  }
#endif
  cpu::attention_bwd(bw.params);
  return {bw.dq, bw.dk, bw.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_kv", &attention_varlen_kv);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_kv", &attention_varlen_kv);
}
#endif

}  // namespace attnkit::binding
