// Binding of merge_attention_states: out (B, S, H, D) with lse (B, H, S), or out (T, H, D)
// with lse (H, T). CPU kernel always; CUDA kernel when the extension is built with CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "checks.h"

#ifdef ATTNKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace attnkit::binding {
namespace {

LseStrides lse_strides_of(const at::Tensor& lse) {
  if (lse.dim() == 3) return {lse.stride(0), lse.stride(1), lse.stride(2)};
  return {0, lse.stride(0), lse.stride(1)};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                          const at::Tensor& out_b, const at::Tensor& lse_b) {
  TORCH_CHECK_VALUE(out_a.dim() == 4 || out_a.dim() == 3,
                    "out_a must be (batch, seqlen, heads, head_dim) or (tokens, heads, head_dim), got shape ",
                    out_a.sizes());
  TORCH_CHECK_VALUE(out_b.sizes() == out_a.sizes(), "out_b must have the shape of out_a ", out_a.sizes(), ", got ",
                    out_b.sizes());
  MergeParams p{};
  p.dtype = dtype_of(out_a, "out_a");
  check_like(out_b, "out_b", out_a, "out_a");
  check_head_dim_contiguous(out_a, "out_a");
  check_head_dim_contiguous(out_b, "out_b");
  const bool batched = out_a.dim() == 4;
  const std::vector<int64_t> lse_shape = batched ? std::vector<int64_t>{out_a.size(0), out_a.size(2), out_a.size(1)}
                                                 : std::vector<int64_t>{out_a.size(1), out_a.size(0)};
  for (auto [lse, name] : {std::pair{&lse_a, "lse_a"}, std::pair{&lse_b, "lse_b"}}) {
    TORCH_CHECK_VALUE(lse->scalar_type() == at::kFloat, name, " must be float32, got ", lse->scalar_type());
    TORCH_CHECK_VALUE(lse->device() == out_a.device(), name, " must be on the device of out_a");
    TORCH_CHECK_VALUE(lse->sizes() == at::IntArrayRef(lse_shape), name, " must have shape ",
                      at::IntArrayRef(lse_shape), batched ? " (batch, heads, seqlen)" : " (heads, tokens)", ", got ",
                      lse->sizes());
  }
  at::Tensor out = at::empty_like(out_a, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty(lse_shape, lse_a.options());
  p.out_a = out_a.data_ptr();
  p.out_b = out_b.data_ptr();
  p.out = out.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.out_a_strides = strides_of(out_a);
  p.out_b_strides = strides_of(out_b);
  p.out_strides = strides_of(out);
  p.lse_a_strides = lse_strides_of(lse_a);
  p.lse_b_strides = lse_strides_of(lse_b);
  p.lse_strides = lse_strides_of(lse);
  p.batch = batched ? int(out_a.size(0)) : 1;
  p.seqlen = int(out_a.size(-3));
  p.heads = int(out_a.size(-2));
  p.head_dim = int(out_a.size(-1));
  if (out.numel() == 0) return {out, lse};
#ifdef ATTNKIT_WITH_CUDA
  if (out_a.is_cuda()) {
    const c10::cuda::CUDAGuard guard(out_a.device());
    cuda::merge_attention_states(p, c10::cuda::getCurrentCUDAStream().stream());
    return {out, lse};
  }
#endif
  cpu::merge_attention_states(p);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) { m.impl("merge_attention_states", &merge_attention_states); }

#ifdef ATTNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(attnkit, CUDA, m) { m.impl("merge_attention_states", &merge_attention_states); }
#endif

}  // namespace attnkit::binding
