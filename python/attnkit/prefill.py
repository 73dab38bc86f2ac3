"""Prefill attention: exact, flash-style, forward and backward (dense and varlen)."""
from . import _checks
from ._ops import ops


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, return_lse=False):
    """Exact attention of q (batch, seqlen_q, heads, head_dim) over k, v (batch, seqlen_k,
    kv_heads, head_dim), like FlashAttention's flash_attn_func.

    causal: bottom-right aligned (query i sees keys <= i + seqlen_k - seqlen_q).
    window: (left, right) sliding window around that diagonal, -1 = unbounded.
    softcap: > 0 applies softcap * tanh(s / softcap) to the scaled logits.
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
                                 left, right, _checks.resolve_softcap(softcap))
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     scale=None, window=(-1, -1), softcap=0.0, return_lse=False):
    """attention() over a batch of variable-length sequences packed along the token axis:
    q (total_q, heads, head_dim), k, v (total_k, kv_heads, head_dim), int32 cu_seqlens_*
    (batch + 1) with sequence b in rows cu_seqlens[b]:cu_seqlens[b + 1]; max_seqlen_* bound
    the lengths. Masks apply per sequence. lse is (heads, total_q). Differentiable.
    """
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        _checks.check_tensor(t, name)
    _checks.require_kernel("attention", q)
    left, right = _checks.resolve_window(window)
    out, lse = ops.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                 bool(causal), _checks.resolve_scale(scale, q), left, right,
                                 _checks.resolve_softcap(softcap))
    return (out, lse) if return_lse else out
