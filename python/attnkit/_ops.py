"""Loads the compiled ops (torch.ops.attnkit.*) and registers their fake kernels (for
torch.compile and meta tensors) and autograd formulas. Schemas live in csrc/torch/ops.cpp."""
import torch

from ._capability import check_torch_version

check_torch_version()  # before loading _C: a torch mismatch is named, not an undefined symbol
try:
    from . import _C  # noqa: F401  (registers torch.ops.attnkit.*)
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "attnkit's compiled extension is missing: build it with `make build` "
        "(or `pip install --no-build-isolation -e .`) from the repository root"
    ) from err

ops = torch.ops.attnkit

_OP_NAMES = {
    "attention": "attnkit::attention_fwd",
    "decode": "attnkit::decode",
    "sparse_decode": "attnkit::sparse_decode",
    "merge_attention_states": "attnkit::merge_attention_states",
    "paged_cache_append": "attnkit::paged_cache_append",
    "paged_cache_append_quantized": "attnkit::paged_cache_append_quantized",
    "page_scores": "attnkit::page_scores",
    "select_pages": "attnkit::select_pages",
    "quantize_kv": "attnkit::quantize_kv",
    "dequantize_kv": "attnkit::dequantize_kv",
    "neighborhood_attention": "attnkit::neighborhood_fwd",
    "block_sparse_attention": "attnkit::block_sparse_fwd",
}
# Which ops have a CUDA kernel in this build (fixed at build time, so read once).
CUDA_KERNELS = {
    name: torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for name, op in _OP_NAMES.items()
}


def lse_shape(q, varlen):
    """LSE is (batch, heads, seqlen_q) for dense q and (heads, total_q) for varlen q."""
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.register_fake("attnkit::attention_fwd")
def _attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                        window_left, window_right, softcap, sink_tokens=0, alibi_slopes=None):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.register_fake("attnkit::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("attnkit::attention_varlen_kv")
def _attention_varlen_kv_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqused_k, max_seqlen_q, max_seqlen_k,
                              causal, scale, window_left, window_right, softcap, sink_tokens=0, alibi_slopes=None,
                              kv_format=None, group_size=0, k_scale=None, k_zero=None, v_scale=None, v_zero=None,
                              rotated_keys=False):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(lse_shape(q, True), dtype=torch.float32)


@torch.library.register_fake("attnkit::decode")
def _decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, window_left, kv_format=None,
                 group_size=0, k_scale=None, k_zero=None, v_scale=None, v_zero=None, rotated_keys=False):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("attnkit::sparse_decode")
def _sparse_decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, indices, tokens_per_index, scale, softcap,
                        kv_format=None, group_size=0, k_scale=None, k_zero=None, v_scale=None, v_zero=None,
                        rotated_keys=False):
    return _decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, -1)


@torch.library.register_fake("attnkit::merge_attention_states")
def _merge_fake(out_a, lse_a, out_b, lse_b):
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), torch.empty_like(lse_a)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left, window_right, softcap, *mods = inputs
    sink_tokens, alibi_slopes = tuple(mods) + (0, None)[len(mods):]  # schema defaults when not passed
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.options = (max_q, max_k, causal, scale, window_left, window_right, softcap)
    ctx.sink_tokens = sink_tokens
    ctx.num_inputs = len(inputs)


def _attention_backward(ctx, grad_out, grad_lse):
    """Both outputs are differentiable: lse's gradient enters the kernel's delta
    (AttentionGrads::grad_lse), so partial attentions merged by merge_attention_states (split
    KV, ring attention) get exact gradients. ALiBi slopes get no gradient."""
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = ops.attention_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.options, grad_lse,
                                   ctx.sink_tokens, alibi_slopes)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


torch.library.register_autograd("attnkit::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


def _decode_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])


def _decode_backward(ctx, grad_out, grad_lse):
    raise RuntimeError("attnkit.decode, attnkit.sparse_decode and attention_varlen over paged keys (block_table), "
                       "capped keys (seqused_k) or a quantized cache are inference-only: they have no backward; use "
                       "attnkit.attention / attention_varlen on contiguous K/V for training")


torch.library.register_autograd("attnkit::decode", _decode_backward, setup_context=_decode_setup_context)
torch.library.register_autograd("attnkit::attention_varlen_kv", _decode_backward, setup_context=_decode_setup_context)
torch.library.register_autograd("attnkit::sparse_decode", _decode_backward, setup_context=_decode_setup_context)


def _lse_as_rows(lse, out):
    """lse (batch, heads, seqlen) or (heads, tokens) viewed in out's row layout with a
    trailing 1: (batch, seqlen, heads, 1) or (tokens, heads, 1)."""
    return (lse.transpose(1, 2) if out.dim() == 4 else lse.transpose(0, 1)).unsqueeze(-1)


def _rows_as_lse(rows, out):
    rows = rows.squeeze(-1)
    return rows.transpose(1, 2) if out.dim() == 4 else rows.transpose(0, 1)


def _merge_setup_context(ctx, inputs, output):
    out_a, lse_a, out_b, lse_b = inputs
    out, lse = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out, lse)


def _merge_backward(ctx, grad_out, grad_lse):
    """out = w_a out_a + w_b out_b and lse = log(exp(lse_a) + exp(lse_b)), with
    w_x = exp(lse_x - lse) (0 where both sides saw no key): d out_x = w_x g and
    d lse_x = w_x (g . (out_x - out) + g_lse), in float32."""
    out_a, lse_a, out_b, lse_b, out, lse = ctx.saved_tensors
    lse_rows = _lse_as_rows(lse, out)
    empty = lse_rows == float("-inf")
    g = grad_out.float() if grad_out is not None else torch.zeros_like(out, dtype=torch.float32)
    g_lse = _lse_as_rows(grad_lse, out) if grad_lse is not None else 0.0
    grads = []
    for out_x, lse_x in ((out_a, lse_a), (out_b, lse_b)):
        w = torch.where(empty, 0.0, torch.exp(_lse_as_rows(lse_x, out) - lse_rows))
        d_out = (w * g).to(out_x.dtype)
        d_lse = w * ((g * (out_x.float() - out.float())).sum(-1, keepdim=True) + g_lse)
        grads += [d_out, _rows_as_lse(d_lse, out).contiguous()]
    return tuple(grads)


torch.library.register_autograd("attnkit::merge_attention_states", _merge_backward,
                                setup_context=_merge_setup_context)
