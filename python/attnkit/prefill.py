"""Prefill attention: exact, flash-style, forward and backward (dense and varlen)."""
from . import _checks
from ._ops import ops
from .quant import QuantizedKV, cache_args


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, sink_tokens=0,
              alibi_slopes=None, return_lse=False):
    """Exact attention of q (batch, seqlen_q, heads, head_dim) over k, v (batch, seqlen_k,
    kv_heads, head_dim), like FlashAttention's flash_attn_func.

    causal: bottom-right aligned (query i sees keys <= i + seqlen_k - seqlen_q).
    window: (left, right) sliding window around that diagonal, -1 = unbounded.
    softcap: > 0 applies softcap * tanh(s / softcap) to the scaled logits.
    sink_tokens: with a left window, keys 0 .. sink_tokens - 1 stay visible to every row
    whose window reaches past them (StreamingLLM attention sinks, FA3's sink_token_length).
    alibi_slopes: float32 (heads,) or (batch, heads): the logit of query i and key j gains
    -slope * |i + seqlen_k - seqlen_q - j| after the softcap (FlashAttention's ALiBi);
    not differentiated.
    GQA/MQA: heads a multiple of kv_heads. Differentiable in q, k and v, through out and
    lse (so partial attentions merged with merge_attention_states train exactly).
    Returns out (like q), or (out, lse) with lse float32 (batch, heads, seqlen_q);
    a row that sees no key gets out 0 and lse -inf; a NaN in a key or value a row sees
    makes the row NaN, one it does not see never reaches it. See docs/semantics.md.
    """
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.check_tensor(t, name)
    _checks.require_kernel("attention", q)
    left, right = _checks.resolve_window(window)
    out, lse = ops.attention_fwd(q, k, v, None, None, 0, 0, bool(causal), _checks.resolve_scale(scale, q),
                                 left, right, _checks.resolve_softcap(softcap),
                                 _checks.resolve_sink_tokens(sink_tokens),
                                 _checks.check_alibi_slopes(alibi_slopes, q, q.shape[0]))
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     scale=None, window=(-1, -1), softcap=0.0, sink_tokens=0, alibi_slopes=None, return_lse=False,
                     block_table=None, seqused_k=None):
    """attention() over a batch of variable-length sequences packed along the token axis:
    q (total_q, heads, head_dim), k, v (total_k, kv_heads, head_dim), int32 cu_seqlens_*
    (batch + 1) with sequence b in rows cu_seqlens[b]:cu_seqlens[b + 1]; max_seqlen_* bound
    the lengths. Masks (windows, sinks, ALiBi) apply per sequence. lse is (heads, total_q).
    Differentiable.

    Paged keys (chunked prefill, prefix caching, speculative verification over a paged KV
    cache; FlashAttention's convention): with block_table (int32, (batch, max_pages)), k and v
    are pages (num_pages, page_size, kv_heads, head_dim), any page_size >= 1; sequence b has
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys, key t in page block_table[b, t // page_size],
    slot t % page_size, and its queries are its last positions (bottom-right causal).
    seqused_k (int32, (batch,)): sequence b uses only its first seqused_k[b] keys.
    Quantized keys and values: k and v as attnkit.QuantizedKV (pages of PagedKVCache(kv_format=
    ...) or quantize_kv of packed or paged rows; docs/quantization.md), read and dequantized
    by the kernel; rotated keys rotate q. With block_table, seqused_k or a quantized cache the
    call is inference-only (no backward). docs/semantics.md, "Paged keys".
    """
    k, v, quant = cache_args(k, v) if isinstance(k, QuantizedKV) or isinstance(v, QuantizedKV) else (k, v, {})
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        _checks.check_tensor(t, name)
    for t, name in ((block_table, "block_table"), (seqused_k, "seqused_k")):
        if t is not None:
            _checks.check_tensor(t, name)
    _checks.require_kernel("attention", q)
    left, right = _checks.resolve_window(window)
    options = (bool(causal), _checks.resolve_scale(scale, q), left, right, _checks.resolve_softcap(softcap),
               _checks.resolve_sink_tokens(sink_tokens),
               _checks.check_alibi_slopes(alibi_slopes, q, cu_seqlens_q.shape[0] - 1))
    if block_table is None and seqused_k is None and not quant:
        out, lse = ops.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                     *options)
    else:
        out, lse = ops.attention_varlen_kv(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqused_k,
                                           int(max_seqlen_q), int(max_seqlen_k), *options, **quant)
    return (out, lse) if return_lse else out
