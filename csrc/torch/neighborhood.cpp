// Schemas and bindings of neighborhood_fwd / neighborhood_bwd: checks, the flattened token
// view of q, k, v, allocation, params, dispatch to csrc/cpu/neighborhood.cpp or the CUDA
// kernels. The schemas are a fragment of the attnkit library declared in ops.cpp.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "checks.h"
#include "cpu/neighborhood.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

constexpr const char* kLayout = "(batch, *spatial, heads, head_dim) with 1 to 3 spatial axes";

// The window rule from the per-axis options, checked against the spatial shape of q.
Neighborhood make_neighborhood(const at::Tensor& q, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                               at::IntArrayRef stride, at::IntArrayRef is_causal) {
  const int64_t rank = q.dim() - 3;
  TORCH_CHECK_VALUE(rank >= 1 && rank <= kMaxSpatialRank, "q must have 4 to 6 dimensions ", kLayout,
                    ", got shape ", q.sizes());
  for (auto [list, name] : {std::pair{kernel_size, "kernel_size"}, std::pair{dilation, "dilation"},
                            std::pair{stride, "stride"}, std::pair{is_causal, "is_causal"}})
    TORCH_CHECK_VALUE(int64_t(list.size()) == rank, name, " must have one entry per spatial axis (", rank,
                      "), got ", list);
  Neighborhood nb;
  nb.rank = int(rank);
  for (int64_t a = 0; a < rank; ++a) {
    const int64_t length = q.size(1 + a), k = kernel_size[a], d = dilation[a], s = stride[a];
    TORCH_CHECK_VALUE(length >= 1 && length <= INT32_MAX, "q must have spatial axes of length >= 1, got shape ",
                      q.sizes());
    TORCH_CHECK_VALUE(d >= 1, "dilation must be >= 1 on every axis, got ", dilation);
    TORCH_CHECK_VALUE(k >= 1 && k * d <= length, "kernel_size must be >= 1 and kernel_size * dilation <= the axis ",
                      "length on every axis; axis ", a, " has length ", length, ", kernel_size ", k,
                      ", dilation ", d);
    TORCH_CHECK_VALUE(s >= 1 && s <= k, "stride must be in [1, kernel_size] on every axis; axis ", a,
                      " has stride ", s, " and kernel_size ", k);
    TORCH_CHECK_VALUE(is_causal[a] == 0 || is_causal[a] == 1, "is_causal must be 0 or 1 per axis, got ",
                      is_causal);
    nb.axis[a] = AxisWindow{int(length), int(k), int(d), int(s), is_causal[a] == 1};
  }
  return nb;
}

// t (batch, *spatial, heads, head_dim) as (batch, tokens, heads, head_dim), head_dim contiguous;
// on CUDA contiguous and 16-byte aligned (the kernels move 16-byte vectors).
at::Tensor tokens_view(const at::Tensor& t) {
  at::Tensor flat = t.reshape({t.size(0), -1, t.size(-2), t.size(-1)});
  if (t.is_cuda()) {
    flat = flat.contiguous();
    return reinterpret_cast<uintptr_t>(flat.data_ptr()) % 16 == 0 ? flat : flat.clone();
  }
  return flat.size(-1) <= 1 || flat.stride(-1) == 1 ? flat : flat.contiguous();
}

// Validates q, k, v and the options; fills the params except out and lse. Returns the
// flattened views the params point into (keep them alive).
std::vector<at::Tensor> make_params(NeighborhoodParams& p, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                    at::IntArrayRef stride, at::IntArrayRef is_causal, double scale) {
  p.dtype = dtype_of(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  p.nbhd = make_neighborhood(q, kernel_size, dilation, stride, is_causal);
  TORCH_CHECK_VALUE(k.dim() == q.dim() && k.sizes().slice(0, q.dim() - 2) == q.sizes().slice(0, q.dim() - 2),
                    "k must have the batch and spatial shape of q ", q.sizes().slice(0, q.dim() - 2), ", got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t head_dim = q.size(-1), heads_q = q.size(-2), heads_kv = k.size(-2);
  TORCH_CHECK_VALUE(head_dim > 0, "q must have head_dim > 0");
  TORCH_CHECK_VALUE(k.size(-1) == head_dim, "k must have the head_dim of q (", head_dim, "), got ", k.size(-1));
  TORCH_CHECK_VALUE(heads_kv > 0 && heads_q % heads_kv == 0, "q heads (", heads_q,
                    ") must be a multiple of k/v heads (", heads_kv, ")");
  std::vector<at::Tensor> views{tokens_view(q), tokens_view(k), tokens_view(v)};
  p.q = views[0].data_ptr();
  p.k = views[1].data_ptr();
  p.v = views[2].data_ptr();
  p.q_strides = strides_of(views[0]);
  p.k_strides = strides_of(views[1]);
  p.v_strides = strides_of(views[2]);
  p.batch = int(q.size(0));
  p.heads_q = int(heads_q);
  p.heads_kv = int(heads_kv);
  p.head_dim = int(head_dim);
  p.scale = float(scale);
  return views;
}

// lse is (batch, heads, *spatial).
std::vector<int64_t> lse_shape(const at::Tensor& q) {
  std::vector<int64_t> shape{q.size(0), q.size(-2)};
  for (int64_t a = 1; a + 2 < q.dim(); ++a) shape.push_back(q.size(a));
  return shape;
}

void require_cpu(const at::Tensor& q, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(q.is_cpu(), "attnkit.", op, " has no kernel for ", q.device());
}

#ifdef ATTNKIT_WITH_CUDA
// What the CUDA kernels take, checked before any launch.
void check_cuda_supported(const NeighborhoodParams& p) {
  TORCH_CHECK_VALUE(p.dtype != DType::kFloat32,
                    "attnkit.neighborhood_attention on CUDA takes float16 or bfloat16 q, k, v (dtype float32 runs "
                    "on the CPU only)");
  TORCH_CHECK_VALUE(cuda::neighborhood_supports(p.dtype, p.head_dim),
                    "attnkit.neighborhood_attention on CUDA needs head_dim a multiple of 8 and at most 128, got "
                    "head_dim ", p.head_dim);
  TORCH_CHECK_VALUE(p.batch <= 65535 && p.heads_q <= 65535,
                    "attnkit.neighborhood_attention on CUDA takes at most 65535 batch entries and heads, got batch ",
                    p.batch, " and ", p.heads_q, " heads");
}
#endif

std::tuple<at::Tensor, at::Tensor> neighborhood_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                                    at::IntArrayRef stride, at::IntArrayRef is_causal, double scale) {
  const c10::DeviceGuard guard(q.device());
  NeighborhoodParams p{};
  const FoldedScale folded = fold_scale_for_cuda(q, scale);
  const auto views = make_params(p, folded.q, k, v, kernel_size, dilation, stride, is_causal, folded.scale);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty(lse_shape(q), q.options().dtype(at::kFloat));
  const at::Tensor out_view = tokens_view(out);
  p.out = out_view.data_ptr();
  p.out_strides = strides_of(out_view);
  p.lse = lse.data_ptr<float>();
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda_supported(p);
    if (q.numel() > 0) cuda::neighborhood_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
    return {out, lse};
  }
#endif
  require_cpu(q, "neighborhood_attention");
  if (q.numel() > 0) cpu::neighborhood_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighborhood_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef stride,
    at::IntArrayRef is_causal, double scale) {
  const c10::DeviceGuard guard(q.device());
  NeighborhoodBwdParams bp{};
  const FoldedScale folded = fold_scale_for_cuda(q, scale);
  const auto views = make_params(bp.fwd, folded.q, k, v, kernel_size, dilation, stride, is_causal, folded.scale);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  check_like(dout, "dout", q, "q");
  check_like(out, "out", q, "q");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.device() == q.device(),
                    "lse must be float32 on the device of q");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape(q)), "lse must have shape ",
                    at::IntArrayRef(lse_shape(q)), ", got ", lse.sizes());
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) check_cuda_supported(bp.fwd);
#endif
  if (!q.is_cuda()) require_cpu(q, "neighborhood_attention backward");
  const at::Tensor out_view = tokens_view(out), dout_view = tokens_view(dout), lse_c = lse.contiguous();
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const at::Tensor dq_view = tokens_view(dq), dk_view = tokens_view(dk), dv_view = tokens_view(dv);
  bp.fwd.out = const_cast<void*>(out_view.data_ptr());
  bp.fwd.out_strides = strides_of(out_view);
  bp.fwd.lse = const_cast<float*>(lse_c.data_ptr<float>());
  bp.dout = dout_view.data_ptr();
  bp.dout_strides = strides_of(dout_view);
  bp.dq = dq_view.data_ptr();
  bp.dk = dk_view.data_ptr();
  bp.dv = dv_view.data_ptr();
  bp.dq_strides = strides_of(dq_view);
  bp.dk_strides = strides_of(dk_view);
  bp.dv_strides = strides_of(dv_view);
#ifdef ATTNKIT_WITH_CUDA
  if (q.is_cuda()) {
    const at::Tensor dq_accum = at::empty(dq_view.sizes(), q.options().dtype(at::kFloat));  // zeroed by the kernel
    const at::Tensor delta = at::empty_like(lse_c);
    bp.dq_accum = dq_accum.data_ptr<float>();
    bp.dq_accum_strides = strides_of(dq_accum);
    bp.delta = delta.data_ptr<float>();
    if (q.numel() > 0) cuda::neighborhood_bwd(bp, c10::cuda::getCurrentCUDAStream().stream());
    unfold_dq(dq, folded);
    return {dq, dk, dv};
  }
#endif
  if (q.numel() > 0) cpu::neighborhood_bwd(bp);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit, m) {
  m.def(
      "neighborhood_fwd(Tensor q, Tensor k, Tensor v, int[] kernel_size, int[] dilation, int[] stride, "
      "int[] is_causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "neighborhood_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[] kernel_size, "
      "int[] dilation, int[] stride, int[] is_causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("neighborhood_fwd", &neighborhood_fwd);
  m.impl("neighborhood_bwd", &neighborhood_bwd);
}

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("neighborhood_fwd", &neighborhood_fwd);
  m.impl("neighborhood_bwd", &neighborhood_bwd);
}
#endif

}  // namespace attnkit::binding
