"""Decode: a few new queries per sequence against a long contiguous or paged KV cache."""
from . import _checks
from ._ops import ops


def decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, softcap=0.0, window=-1,
           return_lse=False):
    """Attention of q (batch, seqlen_q <= 16, heads, head_dim) against a KV cache.

    cache_seqlens (int32, batch): valid tokens per sequence, counting the seqlen_q new ones
    already written to the cache; the queries are the last seqlen_q positions, causal among
    themselves. Caches: contiguous (batch, max_seqlen, kv_heads, head_dim), or paged
    (num_pages, page_size, kv_heads, head_dim) with block_table (int32, batch x
    max_pages_per_seq) mapping a sequence's logical pages to physical ones.
    window: keys more than `window` positions before a query are masked (-1 = none).
    Inference only: no backward. Returns out, or (out, lse) with lse (batch, heads, seqlen_q).
    """
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (cache_seqlens, "cache_seqlens")):
        _checks.check_tensor(t, name)
    if block_table is not None:
        _checks.check_tensor(block_table, "block_table")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = unbounded), got {window!r}")
    _checks.require_kernel("decode", q)
    out, lse = ops.decode(q, k_cache, v_cache, cache_seqlens, block_table, _checks.resolve_scale(scale, q),
                          _checks.resolve_softcap(softcap), window)
    return (out, lse) if return_lse else out
