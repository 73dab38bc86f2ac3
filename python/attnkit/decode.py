"""Decode: a few new queries per sequence against a long contiguous or paged KV cache."""
from . import _checks
from ._ops import ops
from .quant import cache_args


def decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, softcap=0.0, window=-1,
           return_lse=False):
    """Attention of q (batch, seqlen_q <= 16, heads, head_dim) against a KV cache.

    cache_seqlens (int32, batch): valid tokens per sequence, counting the seqlen_q new ones
    already written to the cache; the queries are the last seqlen_q positions, causal among
    themselves. Caches: contiguous (batch, max_seqlen, kv_heads, head_dim), or paged
    (num_pages, page_size, kv_heads, head_dim) with block_table (int32, batch x
    max_pages_per_seq) mapping a sequence's logical pages to physical ones.
    Quantized caches (docs/quantization.md): k_cache and v_cache as attnkit.QuantizedKV of one
    kv_format and group_size, e.g. PagedKVCache(kv_format=...).k_cache / .v_cache, or
    quantize_kv of a (num_pages, page_size, kv_heads, head_dim) tensor; the kernel reads the
    codes and scales and dequantizes in registers (head_dim a multiple of 32).
    window: keys more than `window` positions before a query are masked (-1 = none).
    Inference only: no backward. Returns out, or (out, lse) with lse (batch, heads, seqlen_q).
    """
    _checks.check_tensor(q, "q")
    _checks.check_tensor(cache_seqlens, "cache_seqlens")
    k_cache, v_cache, quant = cache_args(k_cache, v_cache)
    if block_table is not None:
        _checks.check_tensor(block_table, "block_table")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = unbounded), got {window!r}")
    _checks.require_kernel("decode", q)
    out, lse = ops.decode(q, k_cache, v_cache, cache_seqlens, block_table, _checks.resolve_scale(scale, q),
                          _checks.resolve_softcap(softcap), window, **quant)
    return (out, lse) if return_lse else out
