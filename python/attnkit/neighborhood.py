"""Fused neighborhood attention in 1-D, 2-D and 3-D (NATTEN semantics), forward and backward.
Schemas and bindings: csrc/torch/neighborhood.cpp; CPU kernels: csrc/cpu/neighborhood.cpp; the
window rule: csrc/include/attnkit/neighborhood.h and docs/neighborhood.md."""
import torch

from . import _checks
from ._ops import ops


def _lse_shape(q):
    return (q.shape[0], q.shape[-2], *q.shape[1:-2])


@torch.library.register_fake("attnkit::neighborhood_fwd")
def _neighborhood_fwd_fake(q, k, v, kernel_size, dilation, stride, is_causal, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(_lse_shape(q), dtype=torch.float32)


@torch.library.register_fake("attnkit::neighborhood_bwd")
def _neighborhood_bwd_fake(dout, q, k, v, out, lse, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ops.neighborhood_bwd(grad_out, q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * len(ctx.options)


torch.library.register_autograd("attnkit::neighborhood_fwd", _backward, setup_context=_setup_context)


def _per_axis(value, rank, name, kind):
    """An int (bool for is_causal) or a tuple / list with one per spatial axis -> list of ints."""
    values = list(value) if isinstance(value, (tuple, list)) else [value] * rank
    ok = len(values) == rank and all(
        isinstance(x, bool) if kind is bool else isinstance(x, int) and not isinstance(x, bool) for x in values)
    if not ok:
        raise ValueError(f"{name} must be a{'' if kind is bool else 'n'} {kind.__name__} or a tuple of {rank} "
                         f"(one per spatial axis of q), got {value!r}")
    return [int(x) for x in values]


def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, stride=1, is_causal=False, scale=None,
                           return_lse=False):
    """Neighborhood attention of q (batch, *spatial, heads, head_dim) over k, v (batch, *spatial,
    kv_heads, head_dim), with 1, 2 or 3 spatial axes (NATTEN's na1d / na2d / na3d).

    kernel_size, dilation, stride (ints) and is_causal (bool): one value for every axis or a
    tuple with one per axis. On each axis a query sees exactly kernel_size keys of its own
    dilation group (positions congruent modulo dilation), the window centred on it and shifted
    inward at the borders; the queries of one stride group (stride consecutive queries of a
    dilation group) share the window of the group's centre query; causal: the kernel_size keys
    ending at the query's stride-group leader, and none after the query itself. The
    neighbourhood is the product of the per-axis windows. Needs 1 <= kernel_size,
    kernel_size * dilation <= axis length and 1 <= stride <= kernel_size.
    kernel_size equal to the axis length (dilation 1, non-causal) is full attention.
    GQA/MQA: heads a multiple of kv_heads. scale defaults to 1/sqrt(head_dim). Differentiable
    in q, k and v. Returns out (like q), or (out, lse) with lse float32 (batch, heads, *spatial).
    Exact rule: docs/neighborhood.md and attnkit.reference.neighborhood_mask.
    """
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.check_tensor(t, name)
    rank = q.dim() - 3
    if not 1 <= rank <= 3:
        raise ValueError(f"q must have 4 to 6 dimensions (batch, *spatial, heads, head_dim) with 1 to 3 "
                         f"spatial axes, got shape {tuple(q.shape)}")
    _checks.require_kernel("neighborhood_attention", q)
    out, lse = ops.neighborhood_fwd(q, k, v, _per_axis(kernel_size, rank, "kernel_size", int),
                                    _per_axis(dilation, rank, "dilation", int),
                                    _per_axis(stride, rank, "stride", int),
                                    _per_axis(is_causal, rank, "is_causal", bool),
                                    _checks.resolve_scale(scale, q))
    return (out, lse) if return_lse else out
