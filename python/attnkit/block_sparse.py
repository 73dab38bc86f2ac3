"""Block-sparse prefill attention (MInference block-sparse heads, SeerAttention, S2-Attention)
and the builders of its block lists. Formats and each paper's pattern: docs/block_sparse.md.
Schemas: csrc/torch/ops.cpp; bindings: csrc/torch/block_sparse.cpp; index math:
csrc/include/attnkit/block_sparse.h; CPU kernels: csrc/cpu/block_sparse.cpp."""
import math

import torch

from . import _checks
from ._ops import lse_shape, ops


def _blocks(length, block_size):
    return -(-length // block_size)


# ---- the op: fake kernels and autograd ---------------------------------------------------------

@torch.library.register_fake("attnkit::block_sparse_fwd")
def _block_sparse_fwd_fake(q, k, v, kv_block_indices, kv_block_counts, block_size_q, block_size_k, causal, scale,
                           softcap, column_indices=None, column_counts=None, cu_seqlens_q=None, cu_seqlens_k=None,
                           max_seqlen_q=0, max_seqlen_k=0):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.register_fake("attnkit::block_sparse_bwd")
def _block_sparse_bwd_fake(dout, q, k, v, out, lse, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("attnkit::block_lists_canonical")
def _block_lists_canonical_fake(indices, counts, col_blocks):
    return torch.empty_like(indices, memory_format=torch.contiguous_format), \
        torch.empty_like(counts, memory_format=torch.contiguous_format)


@torch.library.register_fake("attnkit::block_lists_transpose")
def _block_lists_transpose_fake(indices, counts, col_blocks):
    batch, heads, row_blocks, _ = indices.shape
    return indices.new_empty((batch, heads, col_blocks, row_blocks)), counts.new_empty((batch, heads, col_blocks))


# The op's arguments after block_size_q ... softcap, with their schema defaults.
_OPTIONAL_ARGS = (None, None, None, None, 0, 0)  # columns, counts, cu_seqlens_q / _k, max_seqlen_q / _k


def _setup_context(ctx, inputs, output):
    q, k, v, kv_indices, kv_counts, *options = inputs
    options += list(_OPTIONAL_ARGS[len(options) - 5:])
    column_indices, column_counts, cu_q, cu_k, max_q, max_k = options[5:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts, column_indices, column_counts, cu_q, cu_k)
    ctx.options = options[:5]
    ctx.max_seqlens = (max_q, max_k)
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    """dQ walks the lists, dK and dV their transpose (query blocks per key block, built by
    the block_lists_transpose op on the device; the column tiles' transpose is built by the
    op itself), so every gradient row has one writer. Differentiable through out and lse,
    as attention()."""
    q, k, v, out, lse, kv_indices, kv_counts, column_indices, column_counts, cu_q, cu_k = ctx.saved_tensors
    block_size_q, block_size_k, causal, scale, softcap = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    seqlen_k = ctx.max_seqlens[1] if cu_k is not None else k.shape[1]
    q_indices, q_counts = ops.block_lists_transpose(kv_indices, kv_counts, _blocks(seqlen_k, block_size_k))
    dq, dk, dv = ops.block_sparse_bwd(grad_out, q, k, v, out, lse, kv_indices, kv_counts, q_indices, q_counts,
                                      block_size_q, block_size_k, causal, scale, softcap, grad_lse, column_indices,
                                      column_counts, cu_q, cu_k, *ctx.max_seqlens)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


torch.library.register_autograd("attnkit::block_sparse_fwd", _backward, setup_context=_setup_context)


# ---- lists ---------------------------------------------------------------------------------------

def canonical_block_lists(indices, counts, num_blocks):
    """Any block lists -> their canonical form, which the kernels take: per row the distinct
    entries of indices[..., :counts] (counts clamped to [0, list_len]) that lie in
    [0, num_blocks), ascending, then -1 padding; counts the number of them. indices int32
    (batch, heads, row_blocks, list_len), counts int32 (batch, heads, row_blocks). One op on the
    device (a bitmap per list, no sort), no host sync."""
    return ops.block_lists_canonical(indices.contiguous(), counts.contiguous(), int(num_blocks))


def canonical_column_lists(column_indices, column_counts, block_indices, block_counts, seqlen_k, block_size_k):
    """Any column lists -> their canonical form, which the kernels take: per row the distinct
    keys of column_indices[..., :column_counts] (counts clamped to [0, list_len]) that lie in
    [0, seqlen_k) and not in a key block of the row's canonical block list (block_indices,
    block_counts), so every key counts once; ascending, then -1 padding. Tensor ops (sort,
    searchsorted): no host sync."""
    list_len = column_indices.shape[-1]
    positions = torch.arange(list_len, device=column_indices.device, dtype=torch.int32)
    keys = column_indices
    kept = (positions < column_counts.clamp(0, list_len)[..., None]) & (keys >= 0) & (keys < seqlen_k)
    blocks_len = block_indices.shape[-1]
    if blocks_len > 0 and list_len > 0:
        big = torch.iinfo(torch.int32).max
        listed = torch.where(torch.arange(blocks_len, device=keys.device) < block_counts[..., None], block_indices, big)
        block = torch.where(kept, keys // block_size_k, 0).to(torch.int32)
        at = torch.searchsorted(listed.contiguous(), block.contiguous(), out_int32=True).clamp(max=blocks_len - 1)
        kept &= listed.gather(-1, at.long()) != block
    end = torch.iinfo(torch.int32).max
    keys = torch.where(kept, keys, end).sort(dim=-1).values
    repeat = torch.cat([torch.zeros_like(keys[..., :1], dtype=torch.bool), keys[..., 1:] == keys[..., :-1]], dim=-1)
    keys = torch.where(repeat, end, keys).sort(dim=-1).values
    kept = keys < end
    return torch.where(kept, keys, -1).to(torch.int32), kept.sum(dim=-1, dtype=torch.int32)


def lists_from_block_mask(block_mask, list_len=None):
    """A bool block mask (..., row_blocks, col_blocks), True = visited -> canonical lists
    (indices (..., row_blocks, list_len) int32, -1 padded; counts int32). list_len defaults to
    col_blocks; rows with more blocks keep their list_len lowest."""
    col_blocks = block_mask.shape[-1]
    list_len = col_blocks if list_len is None else min(int(list_len), col_blocks)
    cols = torch.arange(col_blocks, device=block_mask.device, dtype=torch.int32)
    entries = torch.where(block_mask, cols, col_blocks).sort(dim=-1).values[..., :list_len]
    kept = entries < col_blocks
    return torch.where(kept, entries, -1).int(), kept.sum(dim=-1, dtype=torch.int32)


def _check_block_size(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 64:
        raise ValueError(f"{name} must be a positive multiple of 64 (the kernels' tile), got {value!r}")
    return value


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size_q=64, block_size_k=64,
                           causal=False, scale=None, softcap=0.0, column_indices=None, column_counts=None,
                           return_lse=False):
    """Attention of q (batch, seqlen_q, heads, head_dim) over k, v (batch, seqlen_k, kv_heads,
    head_dim) restricted to listed blocks: query block m = rows [m * block_size_q, (m + 1) *
    block_size_q) of (batch b, q head h) sees the key blocks kv_block_indices[b, h, m, :
    kv_block_counts[b, h, m]] (key block n = keys [n * block_size_k, (n + 1) * block_size_k)).

    kv_block_indices: int32 (batch or 1, heads, ceil(seqlen_q / block_size_q), list_len);
    kv_block_counts: int32 (batch or 1, heads, ceil(seqlen_q / block_size_q)). A list is a set:
    any order, repeats count once, entries past the count or outside [0, ceil(seqlen_k /
    block_size_k)) select nothing (so -1 padding is fine), counts are clamped to [0, list_len].
    causal: bottom-right as attention(), applied on top of the blocks. Block sizes: positive
    multiples of 64. GQA, scale, softcap and the empty-row rule (out 0, lse -inf) as
    attention(). Differentiable in q, k, v through out and lse (deterministic dK, dV).
    column_indices: int32 (batch or 1, heads, ceil(seqlen_q / block_size_q), column_list_len),
    column_counts: int32 (batch or 1, heads, ceil(seqlen_q / block_size_q)): individual keys a
    query block sees besides its blocks (MInference's vertical lines), a set as the block lists
    (entries outside [0, seqlen_k) select nothing); a key in a listed block counts once.
    Returns out, or (out, lse) with lse float32 (batch, heads, seqlen_q). docs/block_sparse.md.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must have 4 dimensions (batch, seqlen, heads, head_dim), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    out, lse = _block_sparse(q, k, v, None, kv_block_indices, kv_block_counts, column_indices, column_counts,
                             block_size_q, block_size_k, causal, scale, softcap)
    return (out, lse) if return_lse else out


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_block_indices,
                                  kv_block_counts, *, block_size_q=64, block_size_k=64, causal=False, scale=None,
                                  softcap=0.0, column_indices=None, column_counts=None, return_lse=False):
    """block_sparse_attention over variable-length sequences packed along the token axis, as
    attention_varlen: q (total_q, heads, head_dim), k, v (total_k, kv_heads, head_dim), int32
    cu_seqlens_* (batch + 1), max_seqlen_* bounding the lengths. The lists are per sequence:
    kv_block_indices (batch or 1, heads, ceil(max_seqlen_q / block_size_q), list_len), query
    block m of sequence b = its rows [m * block_size_q, (m + 1) * block_size_q), key blocks and
    columns numbered within the sequence (entries past its own keys select nothing; lists of
    query blocks past its own rows are not read). The causal rule applies per sequence
    (bottom-right). lse is (heads, total_q). Differentiable. docs/block_sparse.md."""
    for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        _checks.check_tensor(t, name)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must have 3 dimensions (total_tokens, heads, head_dim), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must be 1-D of the same length (batch + 1), got shapes "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    sequences = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    out, lse = _block_sparse(q, k, v, sequences, kv_block_indices, kv_block_counts, column_indices, column_counts,
                             block_size_q, block_size_k, causal, scale, softcap)
    return (out, lse) if return_lse else out


def _block_sparse(q, k, v, sequences, kv_block_indices, kv_block_counts, column_indices, column_counts, block_size_q,
                  block_size_k, causal, scale, softcap):
    """The checks and list preparation both entry points share; sequences: None (a batch) or
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (kv_block_indices, "kv_block_indices"),
                    (kv_block_counts, "kv_block_counts")):
        _checks.check_tensor(t, name)
    if (column_indices is None) != (column_counts is None):
        raise ValueError("column_indices and column_counts must be given together")
    _checks.require_kernel("block_sparse_attention", q)
    block_size_q = _check_block_size(block_size_q, "block_size_q")
    block_size_k = _check_block_size(block_size_k, "block_size_k")
    if sequences is None:
        batch, heads, seqlen_q, seqlen_k = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
        sequences = (None, None, 0, 0)
    else:
        batch, heads, seqlen_q, seqlen_k = sequences[0].shape[0] - 1, q.shape[1], sequences[2], sequences[3]
    lists_shape = (batch, heads, _blocks(seqlen_q, block_size_q))
    kv_block_indices, kv_block_counts = _list_pair(kv_block_indices, kv_block_counts, "kv_block_indices",
                                                   "kv_block_counts", lists_shape)
    indices, counts = canonical_block_lists(kv_block_indices, kv_block_counts, _blocks(seqlen_k, block_size_k))
    if column_indices is not None:
        column_indices, column_counts = _list_pair(column_indices, column_counts, "column_indices", "column_counts",
                                                   lists_shape)
        column_indices, column_counts = canonical_column_lists(column_indices, column_counts, indices, counts,
                                                               seqlen_k, block_size_k)
    return ops.block_sparse_fwd(q, k, v, indices, counts, block_size_q, block_size_k, bool(causal),
                                _checks.resolve_scale(scale, q), _checks.resolve_softcap(softcap), column_indices,
                                column_counts, *sequences)


def _list_pair(indices, counts, indices_name, counts_name, lists_shape):
    """Checks lists (batch or 1, heads, row_blocks, list_len) and counts (batch or 1, heads,
    row_blocks), int32, against lists_shape = (batch, heads, row_blocks); batch 1 expanded."""
    for t, name, rank in ((indices, indices_name, 4), (counts, counts_name, 3)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != rank:
            raise ValueError(f"{name} must be an int32 tensor with {rank} dimensions, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    if indices.shape[0] == 1 and counts.shape[0] == 1:  # one pattern for the batch
        indices = indices.expand(lists_shape[0], *indices.shape[1:])
        counts = counts.expand(lists_shape[0], *counts.shape[1:])
    if tuple(indices.shape[:3]) != lists_shape or tuple(counts.shape) != lists_shape:
        raise ValueError(f"{indices_name} must have shape (batch, heads, ceil(seqlen_q / block_size_q), list_len) "
                         f"with the first three {lists_shape} (batch may be 1), and {counts_name} shape "
                         f"{lists_shape}; got {tuple(indices.shape)} and {tuple(counts.shape)}")
    return indices, counts


# ---- pattern builders ----------------------------------------------------------------------------

def _diagonal_blocks(q_blocks, k_blocks, device):
    """Block-level bottom-right diagonal: key block q_block + k_blocks - q_blocks, (q_blocks, 1)."""
    return torch.arange(q_blocks, device=device)[:, None] + (k_blocks - q_blocks)


def block_topk_indices(block_scores, top_k=None, *, threshold=None, causal=False, local_blocks=0, sink_blocks=0):
    """Block lists from block scores (batch, heads, q_blocks, k_blocks): SeerAttention's gate
    output, pooled_block_scores, or any score where higher means more important.

    Per query block m, with d = m + k_blocks - q_blocks its diagonal key block (bottom-right,
    as causal attention with equal block sizes): kept are the sink blocks n < sink_blocks, the
    local blocks d - local_blocks < n <= d, and of the others the top_k highest scores (ties:
    lower index first) among those >= threshold (either or both; neither: all). causal: only
    blocks n <= d are eligible, forced ones included. NaN and -inf scores are never chosen.
    Returns canonical (indices int32 (batch, heads, q_blocks, list_len), -1 padded; counts
    int32 (batch, heads, q_blocks)), list_len = min(k_blocks, top_k + sink_blocks +
    local_blocks) with top_k, else k_blocks. Tensor ops only: no host sync.
    """
    if not isinstance(block_scores, torch.Tensor) or block_scores.dim() != 4 or not block_scores.is_floating_point():
        raise ValueError("block_scores must be a floating-point tensor (batch, heads, q_blocks, k_blocks)")
    for value, name in ((top_k, "top_k"), (local_blocks, "local_blocks"), (sink_blocks, "sink_blocks")):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if threshold is not None and not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number or None, got {threshold!r}")
    q_blocks, k_blocks = block_scores.shape[-2:]
    n = torch.arange(k_blocks, device=block_scores.device)[None, :]
    diagonal = _diagonal_blocks(q_blocks, k_blocks, block_scores.device)
    eligible = n <= diagonal if causal else torch.ones_like(n, dtype=torch.bool)
    forced = ((n < sink_blocks) | ((n <= diagonal) & (n > diagonal - local_blocks))) & eligible
    scores = block_scores.float()
    candidate = eligible & ~forced & (scores > float("-inf"))  # NaN compares False
    if threshold is not None:
        candidate &= scores >= threshold
    keep = forced.expand_as(candidate).clone()
    if top_k is None:
        keep |= candidate
    elif top_k > 0:
        ranked = torch.where(candidate, scores, float("-inf"))
        values, chosen = ranked.topk(min(top_k, k_blocks), dim=-1, sorted=True)
        keep.scatter_(-1, chosen, (values > float("-inf")) | keep.gather(-1, chosen))
    list_len = k_blocks if top_k is None else min(k_blocks, top_k + sink_blocks + local_blocks)
    return lists_from_block_mask(keep, list_len)


def pooled_block_scores(q, k, block_size, *, scale=None):
    """Mean-pooled block scores (batch, heads, q_blocks, k_blocks), float32: scale * mean(q
    block) . mean(k block) (a partial last block averages its own rows; GQA: q head h reads kv
    head h // (heads // kv_heads)). The cheap estimate MInference and SeerAttention start from."""
    for t, name in ((q, "q"), (k, "k")):
        _checks.check_tensor(t, name)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    scale = _checks.resolve_scale(scale, q)

    def pooled(x):  # (batch, seqlen, heads, dim) -> (batch, heads, blocks, dim)
        length = x.shape[1]
        padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, (-length) % block_size))
        sums = padded.unflatten(1, (-1, block_size)).sum(dim=2)
        rows = torch.full((sums.shape[1],), float(block_size), device=x.device)
        if length % block_size:
            rows[-1] = length % block_size
        return (sums / rows[None, :, None, None]).transpose(1, 2)

    q_mean, k_mean = pooled(q), pooled(k).repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    return torch.matmul(q_mean, k_mean.transpose(-1, -2)) * scale


def strided_shard_indices(seqlen, heads, *, stride, local_window, block_size, device=None):
    """S2-Attention's heterogeneous context sharding (causal self-attention of seqlen tokens):
    head h sees the key blocks n with (n + h + 1) % stride == 0 (its strided shard; the
    shards of heads h and h + stride coincide, so with heads >= stride every key block is in
    some head's shard) plus the dense local window: the local_window // block_size blocks
    ending at the query block's own. Only blocks at or before the query block (use with
    causal=True). Returns canonical (indices int32 (1, heads, blocks, list_len), counts
    (1, heads, blocks)); batch 1 broadcasts in block_sparse_attention."""
    for value, name in ((seqlen, "seqlen"), (heads, "heads"), (stride, "stride"), (block_size, "block_size")):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(local_window, int) or local_window < 0 or local_window % block_size:
        raise ValueError(f"local_window must be a multiple of block_size ({block_size}) >= 0, got {local_window!r}")
    if stride > heads:
        raise ValueError(f"stride ({stride}) must be <= heads ({heads}) so that the heads' shards cover every key")
    blocks = _blocks(seqlen, block_size)
    m = torch.arange(blocks, device=device)[:, None]
    n = torch.arange(blocks, device=device)[None, :]
    h = torch.arange(heads, device=device)[:, None, None]
    shard = (n + h + 1) % stride == 0
    local = (n <= m) & (n > m - local_window // block_size)
    keep = (shard | local) & (n <= m)
    return lists_from_block_mask(keep[None])


def vertical_slash_indices(q_last, k, *, last_q=64, vertical=1000, slash=6096, block_size=64, scale=None,
                           exact_columns=False):
    """MInference's vertical-slash pattern as block lists, for causal self-attention of
    seqlen = k.shape[1] tokens whose last queries are q_last (batch, >= last_q, heads,
    head_dim; its last last_q rows are used).

    Estimation: the softmax attention p of those last_q queries over all keys (bottom-right
    causal); the vertical score of key j is sum_i p_ij, the slash score of offset o >= 0 (key
    = the query's diagonal - o) is sum_i p_i,diag(i)-o. The `vertical` best keys and the
    `slash` best offsets are kept (fewer if the sequence is shorter). As blocks of block_size:
    query block m keeps the key blocks n <= m holding a kept key, and for each kept offset
    o = a * block_size + r the blocks m - a and, if r > 0, m - a - 1 (the blocks its diagonal
    crosses): a superset of the lines. Returns canonical (indices int32 (batch, heads, blocks,
    blocks), counts); use with causal=True and block_size_q = block_size_k = block_size.
    exact_columns=True: the vertical lines as exact columns instead of their blocks; returns
    (indices, counts, column_indices, column_counts), the blocks those of the slash lines and
    column_indices int32 (batch, heads, blocks, vertical) the kept keys, ascending, each query
    block's own list holding those at or before its last key (block_sparse_attention's
    column_indices / column_counts)."""
    for t, name in ((q_last, "q_last"), (k, "k")):
        _checks.check_tensor(t, name)
    for value, name in ((last_q, "last_q"), (vertical, "vertical"), (slash, "slash"), (block_size, "block_size")):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name in ("vertical", "slash")
                                                                               else 1):
            raise ValueError(f"{name} must be a{' positive' if name in ('last_q', 'block_size') else 'n'} int"
                             f"{'' if name in ('last_q', 'block_size') else ' >= 0'}, got {value!r}")
    if q_last.shape[1] < last_q or k.shape[1] < last_q:
        raise ValueError(f"q_last and k must hold at least last_q = {last_q} rows, got {q_last.shape[1]} and "
                         f"{k.shape[1]}")
    scale = _checks.resolve_scale(scale, q_last)
    seqlen, heads = k.shape[1], q_last.shape[2]
    q = q_last[:, -last_q:].float().transpose(1, 2)                                        # (b, h, last_q, d)
    keys = k.float().repeat_interleave(heads // k.shape[2], dim=2).transpose(1, 2)        # (b, h, seqlen, d)
    cols = torch.arange(seqlen, device=k.device)
    diagonal = torch.arange(seqlen - last_q, seqlen, device=k.device)[:, None]            # each query's own key
    p = torch.softmax(torch.matmul(q, keys.transpose(-1, -2) * scale).masked_fill(cols > diagonal, float("-inf")),
                      dim=-1)
    vertical_scores = p.sum(dim=-2)                                                        # (b, h, seqlen)
    offsets = (diagonal - cols).clamp(min=0)  # offset of each (query, key); masked keys have p = 0
    slash_scores = torch.zeros_like(vertical_scores).scatter_add_(-1, offsets.expand_as(p).flatten(-2),
                                                                  p.flatten(-2))
    columns = vertical_scores.topk(min(vertical, seqlen), dim=-1).indices
    chosen_offsets = slash_scores.topk(min(slash, seqlen), dim=-1).indices
    blocks = _blocks(seqlen, block_size)
    column_blocks = torch.zeros(*columns.shape[:2], blocks + 1, dtype=torch.bool, device=k.device)
    column_blocks.scatter_(-1, columns // block_size, True)
    block_offsets = torch.zeros_like(column_blocks)                                        # crossed block diagonals
    block_offsets.scatter_(-1, chosen_offsets // block_size, True)
    block_offsets.scatter_(-1, torch.where(chosen_offsets % block_size > 0, chosen_offsets // block_size + 1, blocks),
                           True)
    m = torch.arange(blocks, device=k.device)[:, None]
    n = torch.arange(blocks, device=k.device)[None, :]
    causal = n <= m
    keep = block_offsets[:, :, (m - n).clamp(0, blocks)] & causal
    if exact_columns:
        columns = columns.sort(dim=-1).values.to(torch.int32)                              # (b, h, vertical)
        block_ends = torch.arange(1, blocks + 1, device=k.device) * block_size           # each block's key end
        column_counts = (columns[:, :, None, :] < block_ends[:, None]).sum(dim=-1, dtype=torch.int32)
        column_indices = columns[:, :, None, :].expand(-1, -1, blocks, -1)
        return (*lists_from_block_mask(keep), column_indices, column_counts)
    keep |= column_blocks[:, :, None, :blocks] & causal
    return lists_from_block_mask(keep)


def block_attention_map(q, k, *, block_size, causal=False, scale=None, chunk_rows=1024):
    """SeerAttention's gate target: the softmax probabilities of full attention (causal:
    bottom-right) max-pooled over blocks of block_size queries x block_size keys -> float32
    (batch, heads, ceil(seqlen_q / block_size), ceil(seqlen_k / block_size)); 0 where no
    query of the block sees a key of it. Flash-style: the rows' LSE from attnkit's kernel,
    then probabilities tile by tile (chunk_rows queries against all keys at a time), never
    the whole seqlen_q x seqlen_k map."""
    for t, name in ((q, "q"), (k, "k")):
        _checks.check_tensor(t, name)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    scale = _checks.resolve_scale(scale, q)
    from .prefill import attention  # the LSE of every row (its output is not used)
    _, lse = attention(q, k, k, causal=causal, scale=scale, return_lse=True)
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k = k.shape[1]
    q_blocks, k_blocks = _blocks(seqlen_q, block_size), _blocks(seqlen_k, block_size)
    keys = k.float().repeat_interleave(heads // k.shape[2], dim=2).transpose(1, 2)  # (batch, heads, seqlen_k, dim)
    rows = max(block_size, chunk_rows // block_size * block_size)
    result = q.new_zeros((batch, heads, q_blocks, k_blocks), dtype=torch.float32)
    cols = torch.arange(seqlen_k, device=q.device)
    for start in range(0, seqlen_q, rows):
        stop = min(seqlen_q, start + rows)
        s = torch.matmul(q[:, start:stop].float().transpose(1, 2), keys.transpose(-1, -2)) * scale
        p = torch.exp(s - lse[:, :, start:stop, None])
        if causal:
            diagonal = torch.arange(start, stop, device=q.device)[:, None] + seqlen_k - seqlen_q
            p = p.masked_fill(cols[None, :] > diagonal, 0.0)
        p = torch.nan_to_num(p, nan=0.0, posinf=0.0)  # rows that see no key (lse -inf)
        p = torch.nn.functional.pad(p, (0, (-seqlen_k) % block_size, 0, (-(stop - start)) % block_size))
        pooled = p.unflatten(-1, (k_blocks, block_size)).amax(-1).unflatten(-2, (-1, block_size)).amax(-2)
        result[:, :, start // block_size:start // block_size + pooled.shape[2]] = pooled
    return result
