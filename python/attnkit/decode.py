"""Decode: new queries per sequence against a long contiguous or paged KV cache."""
import torch
import torch.nn.functional as F

from . import _checks
from ._ops import ops
from .quant import cache_args

MAX_DECODE_QUERIES = 16  # the decode kernels' limit; more queries run on the paged prefill kernels


def decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, softcap=0.0, window=-1,
           sink_tokens=0, alibi_slopes=None, return_lse=False):
    """Attention of q (batch, seqlen_q, heads, head_dim) against a KV cache.

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
    sink_tokens, alibi_slopes: as in attention() (StreamingLLM sinks with a window; ALiBi
    slopes float32 (heads,) or (batch, heads)).
    Up to 16 queries run on the decode kernels (lean split-KV schedule); more (chunked
    prefill, long speculative drafts), and calls with sinks or ALiBi, on the paged prefill
    kernels (attention_varlen with block_table; a contiguous cache is one page per
    sequence), with the same result.
    Inference only: no backward. Returns out, or (out, lse) with lse (batch, heads, seqlen_q).
    """
    _checks.check_tensor(q, "q")
    _checks.check_tensor(cache_seqlens, "cache_seqlens")
    k_cache, v_cache, quant = cache_args(k_cache, v_cache)
    if block_table is not None:
        _checks.check_tensor(block_table, "block_table")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = unbounded), got {window!r}")
    sink_tokens = _checks.resolve_sink_tokens(sink_tokens)
    mods = (sink_tokens if window != -1 else 0) or alibi_slopes is not None  # only the prefill kernels have them
    if q.dim() == 4 and (q.shape[1] > MAX_DECODE_QUERIES or mods):
        slopes = _checks.check_alibi_slopes(alibi_slopes, q, q.shape[0])
        out, lse = _decode_on_prefill(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, window,
                                      sink_tokens, slopes, quant)
        return (out, lse) if return_lse else out
    _checks.require_kernel("decode", q)
    out, lse = ops.decode(q, k_cache, v_cache, cache_seqlens, block_table, _checks.resolve_scale(scale, q),
                          _checks.resolve_softcap(softcap), _checks.saturate_window(window), **quant)
    return (out, lse) if return_lse else out


def _decode_on_prefill(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap, window, sink_tokens=0,
                       alibi_slopes=None, quant=None):
    """decode() of many queries as paged varlen prefill: query s of sequence b at position
    cache_seqlens[b] - seqlen_q + s, causal, over the sequence's cache_seqlens[b] keys. No host
    sync: cu_seqlens come from tensor ops, max_seqlen_k from the table's shape."""
    _checks.require_kernel("attention", q)
    batch, seqlen_q, heads, head_dim = q.shape
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have 4 dimensions, got shape {tuple(k_cache.shape)}")
    if block_table is None:  # a contiguous cache (batch, max_seqlen, ...) is one page per sequence
        block_table = torch.arange(batch, dtype=torch.int32, device=q.device).view(batch, 1)
    if cache_seqlens.dim() != 1 or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32 of shape (batch,), got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    cu_k = F.pad(cache_seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    out, lse = ops.attention_varlen_kv(q.reshape(batch * seqlen_q, heads, head_dim), k_cache, v_cache, cu_q, cu_k,
                                       block_table, None, seqlen_q, block_table.shape[1] * k_cache.shape[1], True,
                                       _checks.resolve_scale(scale, q), _checks.saturate_window(window), -1,
                                       _checks.resolve_softcap(softcap), sink_tokens, alibi_slopes, **(quant or {}))
    return out.view(q.shape), lse.view(heads, batch, seqlen_q).permute(1, 0, 2)
