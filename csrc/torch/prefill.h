// The pieces of the prefill bindings (prefill.cpp) that the block-sparse bindings share:
// q / k / v checks into AttentionParams, the device view of a tensor, and the backward's
// checks and allocations.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "attnkit/params.h"

namespace attnkit::binding {

using OptTensor = std::optional<at::Tensor>;

// Validates q, k, v and the options; fills the params except the output pointers. paged: k
// and v are pages (num_pages, page_size, kv_heads, head_dim) of varlen sequences. quantized:
// k and v hold the codes of a quantized cache (uint8, checked by the caller), not q's dtype.
AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, bool causal, double scale, int64_t window_left,
                                      int64_t window_right, double softcap, bool paged = false,
                                      bool quantized = false);

// A tensor as the kernels of its device take it (CUDA: 16-byte aligned rows).
at::Tensor for_device(const at::Tensor& t);

// The backward's params and the tensors they point into (kept alive here).
struct AttentionBwdBuffers {
  AttentionBwdParams params{};
  at::Tensor dq, dk, dv;
  at::Tensor lse, out, dout, grad_lse;  // contiguous / device views of the inputs
  at::Tensor dq_accum, delta;           // CUDA scratch
  bool nothing_to_do = false;           // no query or no key: dq, dk, dv are zero already
};

// Checks dout, out, lse and grad_lse against q and the forward params `fwd` (of the device
// views of q, k, v), allocates dq, dk, dv (and on CUDA the fp32 scratch) and fills the params.
AttentionBwdBuffers prepare_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                          const OptTensor& grad_lse, const AttentionParams& fwd);

}  // namespace attnkit::binding
