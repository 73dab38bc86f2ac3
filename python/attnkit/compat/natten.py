"""NATTEN 0.21's API on attnkit's kernels: na1d / na2d / na3d, attention, merge_attentions and the
NeighborhoodAttention1D / 2D / 3D modules, with NATTEN's signatures, defaults and "heads last"
layout: query, key, value (batch, *token_layout, heads, head_dim), lse (batch, *token_layout,
heads). NATTEN itself is not needed. Mapping, choices, unsupported arguments: docs/compat_natten.md.
"""
from collections.abc import Sequence

import torch
from torch import nn

from .. import _checks
from .._ops import ops
from ..merge import merge_attention_states
from ..neighborhood import neighborhood_attention
from ..prefill import attention as _attention, attention_varlen

# The kernel-tuning arguments of NATTEN's attention(): the keys attention_kwargs may hold. Like
# every tuning argument here (backend, tile shapes, torch_compile, ...) they are accepted and ignored.
_ATTENTION_TUNING = frozenset({
    "backend", "q_tile_size", "kv_tile_size", "backward_q_tile_size", "backward_kv_tile_size",
    "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule", "torch_compile"})

# Arguments of older NATTEN releases that 0.21 no longer takes, and why attnkit cannot honour them.
_LEGACY = {
    "rpb": "relative positional biases are not in NATTEN 0.21, and attnkit's kernels have none",
    "rel_pos_bias": "relative positional biases are not in NATTEN 0.21, and attnkit's kernels have none",
    "xformers_kwargs": "NATTEN 0.21 replaced it with attention_kwargs",
    "attn_drop": "attention dropout is not in NATTEN 0.21, and attnkit's fused kernels have none",
    "use_experimental_ops": "NATTEN 0.21 has no such switch; attnkit always runs its fused kernels",
}


def _reject(where, kwargs):
    """ValueError for a legacy argument (saying why), TypeError for any other unknown one."""
    for name in kwargs:
        if name in _LEGACY:
            raise ValueError(f"{where}: argument {name!r} is not supported: {_LEGACY[name]}")
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")


def _per_axis(value, rank, name, default=None):
    """NATTEN's forms of kernel_size, stride, dilation, is_causal: one value for every axis or a
    sequence with one per axis; None means `default`. Returns a list of `rank` values."""
    if value is None:
        value = default
    values = list(value) if isinstance(value, Sequence) else [value] * rank
    least = 2 if name == "kernel_size" else 1  # NATTEN needs kernel_size >= 2, attnkit >= 1
    if name == "is_causal":
        ok, what = all(isinstance(x, bool) for x in values), "a bool"
    else:
        ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= least for x in values)
        what = f"an int >= {least}"
    if len(values) != rank or not ok:
        raise ValueError(f"{name} must be {what} or a sequence of {rank} (one per axis of the token layout), "
                         f"got {value!r}")
    return values


def _describe(t):
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _scale(scale, query):
    # NATTEN takes `scale or head_dim ** -0.5`, so scale=0 also means the default.
    return _checks.resolve_scale(scale or None, query)


def _check_attention_kwargs(attention_kwargs):
    if attention_kwargs is None:
        return
    unknown = set(attention_kwargs) - _ATTENTION_TUNING if isinstance(attention_kwargs, dict) else None
    if unknown is None or unknown:
        raise ValueError(f"attention_kwargs must be None or a dict of attention()'s tuning arguments "
                         f"{sorted(_ATTENTION_TUNING)}, got {attention_kwargs!r}")


def _check_additional(query, key, additional_keys, additional_values):
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be both tensors or both None")
    if additional_keys is None:
        return
    batch, kv_heads, head_dim = query.shape[0], key.shape[-2], key.shape[-1]
    for t, name in ((additional_keys, "additional_keys"), (additional_values, "additional_values")):
        if not (isinstance(t, torch.Tensor) and t.dim() == 4 and (t.shape[0], t.shape[2], t.shape[3]) ==
                (batch, kv_heads, head_dim) and t.dtype == query.dtype and t.device == query.device):
            raise ValueError(f"{name} must be a {query.dtype} tensor on {query.device} of shape (batch={batch}, "
                             f"seqlen, kv_heads={kv_heads}, head_dim={head_dim}) (key's heads and head_dim), got "
                             f"{_describe(t)}")
    if additional_values.shape != additional_keys.shape:
        raise ValueError(f"additional_values must have the shape of additional_keys {tuple(additional_keys.shape)}, "
                         f"got {tuple(additional_values.shape)}")


class _NeighborhoodAttention(torch.autograd.Function):
    """attnkit's neighbourhood op -> (out, lse (batch, heads, *spatial)), differentiable in lse too
    (attnkit.neighborhood_attention treats its lse as a constant), so that merges train exactly."""

    @staticmethod
    def forward(ctx, q, k, v, options):
        kernel_size, dilation, stride, is_causal, scale = options
        out, lse = neighborhood_attention(q, k, v, kernel_size, dilation=dilation, stride=stride,
                                          is_causal=is_causal, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = ops.neighborhood_bwd(grad_out, q, k, v, out, lse, *ctx.options)
        if grad_lse is not None:
            # d lse_i / d s_ij = p_ij, so ds_ij gains p_ij g_i: dq_i += scale g_i sum_j p_ij k_j (the
            # attention with k as values) and dk_j += scale sum_i p_ij g_i q_i (the dv of a backward
            # with dout = g q).
            scale, g = ctx.options[-1], grad_lse.movedim(1, -1).unsqueeze(-1)
            k_mean = ops.neighborhood_fwd(q, k, k, *ctx.options)[0]
            dq = (dq + scale * g * k_mean).to(q.dtype)
            dk_lse = ops.neighborhood_bwd((g * q).to(q.dtype), q, k, v, out, lse, *ctx.options)[2]
            dk = (dk + scale * dk_lse).to(k.dtype)
        return dq, dk, dv, None


def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, attention_kwargs, return_lse):
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _checks.check_tensor(t, name)
    if query.dim() != rank + 3:
        raise ValueError(f"query must be a {rank + 3}-D tensor (batch, {rank} token layout axes, heads, head_dim) "
                         f"for na{rank}d, got shape {tuple(query.shape)}")
    options = (_per_axis(kernel_size, rank, "kernel_size"), _per_axis(dilation, rank, "dilation", 1),
               _per_axis(stride, rank, "stride", 1), _per_axis(is_causal, rank, "is_causal", False),
               _scale(scale, query))
    _check_attention_kwargs(attention_kwargs)
    _check_additional(query, key, additional_keys, additional_values)
    out, lse = _NeighborhoodAttention.apply(query, key, value, options)
    if additional_keys is not None:
        # NATTEN's neighbourhood cross-attention: attention over the extra tokens, merged by LSE.
        extra_out, extra_lse = _attention(query.flatten(1, rank), additional_keys, additional_values,
                                          scale=options[-1], return_lse=True)
        out, lse = merge_attention_states(out.flatten(1, rank), lse.flatten(2), extra_out, extra_lse)
        out, lse = out.reshape(query.shape), lse.unflatten(2, query.shape[1:-2])
    return (out, lse.movedim(1, -1).contiguous()) if return_lse else out


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
         additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
         backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
         backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
         return_lse=False, **legacy):
    """NATTEN's na1d on attnkit.neighborhood_attention (NATTEN's window rule, the same in both).

    query (batch, seqlen, heads, head_dim), key, value (batch, seqlen, kv_heads, head_dim), heads a
    multiple of kv_heads. kernel_size (>= 2), stride, dilation (ints) and is_causal (bool): one value
    or one per axis. scale defaults to head_dim ** -0.5 (also for 0, as in NATTEN).
    additional_keys / additional_values (batch, seqlen_extra, kv_heads, head_dim): tokens every query
    also attends to (attention over them merged by LSE). Differentiable in every tensor, through the
    output and the lse. Returns output like query, or (output, lse) with lse float32 (batch, seqlen,
    heads). attention_kwargs (tuning keys only) and backend ... torch_compile: accepted, ignored.
    """
    _reject("na1d", legacy)
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, attention_kwargs, return_lse)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
         additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
         backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
         backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
         return_lse=False, **legacy):
    """NATTEN's na2d: na1d on a 2-D token layout, query (batch, X, Y, heads, head_dim), lse
    (batch, X, Y, heads); additional_keys / values stay (batch, seqlen_extra, kv_heads, head_dim)."""
    _reject("na2d", legacy)
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, attention_kwargs, return_lse)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
         additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
         backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
         backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
         return_lse=False, **legacy):
    """NATTEN's na3d: na1d on a 3-D token layout, query (batch, X, Y, Z, heads, head_dim), lse
    (batch, X, Y, Z, heads); additional_keys / values stay (batch, seqlen_extra, kv_heads, head_dim)."""
    _reject("na3d", legacy)
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, attention_kwargs, return_lse)


def _varlen(query, is_causal, seqlens_Q, seqlens_KV, cumulative_seqlen_Q, cumulative_seqlen_KV, max_seqlen_Q,
            max_seqlen_KV):
    """NATTEN's two ways of packing sequences -> (cu_seqlens_q, cu_seqlens_k, max_q, max_k), or None."""
    given = (seqlens_Q, seqlens_KV, cumulative_seqlen_Q, cumulative_seqlen_KV)
    if all(x is None for x in given) and not max_seqlen_Q and not max_seqlen_KV:
        return None
    if query.shape[0] != 1:
        raise ValueError(f"query must have batch 1 (sequences packed along seqlen) for varlen attention, got "
                         f"shape {tuple(query.shape)}")
    if seqlens_Q is not None or seqlens_KV is not None:
        for t, name in ((seqlens_Q, "seqlens_Q"), (seqlens_KV, "seqlens_KV")):
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1 and len(t) > 0):
                raise ValueError(f"{name} must be a non-empty 1-D int32 tensor (one length per sequence), got {t!r}")
        zero = seqlens_Q.new_zeros(1)
        cumulative_seqlen_Q = torch.cat([zero, seqlens_Q.cumsum(0, dtype=torch.int32)])
        cumulative_seqlen_KV = torch.cat([zero, seqlens_KV.cumsum(0, dtype=torch.int32)])
        max_seqlen_Q, max_seqlen_KV = int(seqlens_Q.max()), int(seqlens_KV.max())
    elif any(x is None for x in (cumulative_seqlen_Q, cumulative_seqlen_KV, max_seqlen_Q, max_seqlen_KV)):
        raise ValueError("varlen attention needs seqlens_Q and seqlens_KV, or all of cumulative_seqlen_Q, "
                         "cumulative_seqlen_KV, max_seqlen_Q and max_seqlen_KV")
    if is_causal and not torch.equal(cumulative_seqlen_Q, cumulative_seqlen_KV):
        raise ValueError("is_causal with varlen needs as many keys as queries in every sequence "
                         "(cumulative_seqlen_Q == cumulative_seqlen_KV): NATTEN's causal mask is top-left, "
                         "attnkit's bottom-right, and they agree only then")
    return cumulative_seqlen_Q, cumulative_seqlen_KV, max_seqlen_Q, max_seqlen_KV


def attention(query, key, value, is_causal=False, scale=None, seqlens_Q=None, seqlens_KV=None,
              cumulative_seqlen_Q=None, cumulative_seqlen_KV=None, max_seqlen_Q=None, max_seqlen_KV=None,
              backend=None, q_tile_size=None, kv_tile_size=None, backward_q_tile_size=None,
              backward_kv_tile_size=None, backward_kv_splits=None, backward_use_pt_reduction=False,
              run_persistent_kernel=True, kernel_schedule=None, torch_compile=False, return_lse=False):
    """NATTEN's attention on attnkit.attention / attention_varlen.

    query (batch, seqlen_q, heads, head_dim), key, value (batch, seqlen_kv, kv_heads, head_dim).
    is_causal: NATTEN's top-left mask (query i sees keys j <= i, whatever the lengths). Varlen:
    batch 1 with seqlens_Q and seqlens_KV (int32 lengths), or cumulative_seqlen_Q / _KV (int32,
    batch + 1) and max_seqlen_Q / _KV; causal varlen needs equal query and key lengths per sequence.
    Differentiable through output and lse. Returns output, or (output, lse) with lse float32
    (batch, seqlen_q, heads). backend ... torch_compile: accepted, ignored.
    """
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if not (isinstance(t, torch.Tensor) and t.dim() == 4):
            raise ValueError(f"{name} must be a 4-D tensor (batch, seqlen, heads, head_dim), got {_describe(t)}")
    scale = _scale(scale, query)
    packed = _varlen(query, is_causal, seqlens_Q, seqlens_KV, cumulative_seqlen_Q, cumulative_seqlen_KV,
                     max_seqlen_Q, max_seqlen_KV)
    if packed is not None:
        out, lse = attention_varlen(query[0], key[0], value[0], *packed, causal=bool(is_causal), scale=scale,
                                    return_lse=True)
        out, lse = out[None], lse.t()[None]
    else:
        window = (-1, -1)
        if is_causal:
            # Top-left: no query sees a key past seqlen_q, and with the keys cut there the
            # bottom-right window (-1, seqlen_q - seqlen_kv) lets query i see exactly j <= i.
            key, value = key[:, :query.shape[1]], value[:, :query.shape[1]]
            window = (-1, query.shape[1] - key.shape[1])
        out, lse = _attention(query, key, value, scale=scale, window=window, return_lse=True)
        lse = lse.transpose(1, 2)
    return (out, lse.contiguous()) if return_lse else out


def merge_attentions(outputs, lse_tensors, torch_compile=True, use_autograd_fix=True):
    """NATTEN's merge_attentions: the attention over the union of disjoint key sets from the
    attentions of the same queries over each, by LSE (attnkit.merge_attention_states, pairwise).

    outputs: >= 2 tensors (batch, seqlen, heads, head_dim); lse_tensors: one (batch, seqlen, heads)
    each. Returns (output in outputs[0]'s dtype, lse float32 (batch, seqlen, heads)). Differentiable
    in every output and lse; an output that requires grad needs an lse that does (those of this
    module do). torch_compile and use_autograd_fix: accepted, ignored (plain autograd is exact here).
    """
    if not isinstance(outputs, (list, tuple)) or len(outputs) < 2:
        raise ValueError("outputs must be a list of at least two tensors (batch, seqlen, heads, head_dim)")
    if not isinstance(lse_tensors, (list, tuple)) or len(lse_tensors) != len(outputs):
        raise ValueError(f"lse_tensors must be a list with one lse per output ({len(outputs)})")
    for i, (out, lse) in enumerate(zip(outputs, lse_tensors)):
        _checks.check_tensor(out, f"outputs[{i}]")
        _checks.check_tensor(lse, f"lse_tensors[{i}]")
        if out.dim() != 4 or out.shape != outputs[0].shape:
            raise ValueError(f"outputs[{i}] must be (batch, seqlen, heads, head_dim) like outputs[0] "
                             f"{tuple(outputs[0].shape)}, got {tuple(out.shape)}")
        if lse.shape != out.shape[:3]:
            raise ValueError(f"lse_tensors[{i}] must be (batch, seqlen, heads) {tuple(out.shape[:3])}, "
                             f"got {tuple(lse.shape)}")
        if out.requires_grad != outputs[0].requires_grad:
            raise ValueError(f"outputs must all require grad or none, outputs[{i}] differs from outputs[0]")
        if out.requires_grad and not lse.requires_grad:
            raise ValueError(f"lse_tensors[{i}] does not require grad but outputs[{i}] does: the merge's gradient "
                             f"through the lse would be lost; take both from attnkit.compat.natten (its lse is "
                             f"differentiable)")
    out, lse = outputs[0], lse_tensors[0].transpose(1, 2).float()
    for other, other_lse in zip(outputs[1:], lse_tensors[1:]):
        out, lse = merge_attention_states(out, lse, other, other_lse.transpose(1, 2).float())
    return out, lse.transpose(1, 2).contiguous()


class _NeighborhoodAttentionModule(nn.Module):
    """NATTEN's NeighborhoodAttentionGeneric: qkv projection, na{rank}d, output projection and
    dropout. Parameter names (qkv, proj) as NATTEN's, so state dicts load either way."""

    def __init__(self, rank, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                 proj_drop):
        super().__init__()
        if not (isinstance(embed_dim, int) and isinstance(num_heads, int) and num_heads > 0
                and embed_dim > 0 and embed_dim % num_heads == 0):
            raise ValueError(f"num_heads must be a positive int dividing embed_dim, got embed_dim={embed_dim!r}, "
                             f"num_heads={num_heads!r}")
        self.na_dim, self.embed_dim, self.num_heads = rank, embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = tuple(_per_axis(kernel_size, rank, "kernel_size"))
        self.stride = tuple(_per_axis(stride, rank, "stride", 1))
        self.dilation = tuple(_per_axis(dilation, rank, "dilation", 1))
        self.is_causal = tuple(_per_axis(is_causal, rank, "is_causal", False))
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != self.na_dim + 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, {self.na_dim} token layout axes, embed_dim={self.embed_dim}), got "
                             f"{_describe(x)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        out = _na(self.na_dim, q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale,
                  None, None, None, False)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def extra_repr(self):
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}")


class NeighborhoodAttention1D(_NeighborhoodAttentionModule):
    """NATTEN's NeighborhoodAttention1D: x (batch, seqlen, embed_dim) -> like x."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, **legacy):
        _reject("NeighborhoodAttention1D", legacy)
        super().__init__(1, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop)


class NeighborhoodAttention2D(_NeighborhoodAttentionModule):
    """NATTEN's NeighborhoodAttention2D: x (batch, X, Y, embed_dim) -> like x."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, **legacy):
        _reject("NeighborhoodAttention2D", legacy)
        super().__init__(2, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop)


class NeighborhoodAttention3D(_NeighborhoodAttentionModule):
    """NATTEN's NeighborhoodAttention3D: x (batch, X, Y, Z, embed_dim) -> like x."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, **legacy):
        _reject("NeighborhoodAttention3D", legacy)
        super().__init__(3, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop)


__all__ = ["na1d", "na2d", "na3d", "attention", "merge_attentions", "NeighborhoodAttention1D",
           "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
