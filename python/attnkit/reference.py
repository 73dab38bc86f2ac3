"""The float64 oracle of every attnkit op: plain, slow PyTorch written for clarity.

Every kernel, CPU and CUDA, is tested against these functions; when semantics are in
doubt, this file and docs/semantics.md decide. All functions compute in float64 and
return float64 tensors; they are differentiable with torch.autograd (fully masked rows
included), so tests take reference gradients by backward through them.

Conventions (docs/semantics.md):
- q (batch, seqlen_q, heads, head_dim); k, v (batch, seqlen_k, kv_heads, head_dim);
  heads % kv_heads == 0 and q head h reads kv head h // (heads // kv_heads).
- logit s = scale * q.k with scale = 1/sqrt(head_dim) by default; softcap > 0 maps
  s -> softcap * tanh(s / softcap).
- Masks, with the bottom-right diagonal d = i + seqlen_k - seqlen_q of query i: key j is
  visible iff j >= d - window_left (if window_left >= 0) and j <= d + window_right (if
  window_right >= 0); causal=True means window_right = 0.
- lse = log(sum over visible keys of exp(s)), shape (batch, heads, seqlen_q). A query that
  sees no key gets output 0 and lse -inf.
"""
import math

import torch


def mask(seqlen_q, seqlen_k, causal=False, window=(-1, -1), device=None):
    """Bool (seqlen_q, seqlen_k): True where query i may attend to key j."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0):
    """Exact attention -> (out (batch, seqlen_q, heads, head_dim), lse (batch, heads, seqlen_q)),
    both float64."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    visible = mask(q.shape[1], k.shape[1], causal, window, device=q.device)
    s = s.masked_fill(~visible, float("-inf"))
    # Fully masked rows: shift by 0 instead of -inf so exp gives 0, not NaN (also in backward).
    row_max = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    total = p.sum(dim=-1, keepdim=True)
    probs = p / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    lse = torch.where(total > 0, torch.log(torch.where(total > 0, total, torch.ones_like(total))) + row_max,
                      torch.full_like(total, float("-inf"))).squeeze(-1)
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, window=(-1, -1),
                     softcap=0.0):
    """attention() per sequence of a packed batch: q (total_q, heads, head_dim), k, v
    (total_k, kv_heads, head_dim); sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1].
    Returns out (total_q, heads, head_dim) and lse (heads, total_q), float64."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        kb, vb = k[cu_k[b]:cu_k[b + 1]].unsqueeze(0), v[cu_k[b]:cu_k[b + 1]].unsqueeze(0)
        out, lse = attention(qb, kb, vb, causal=causal, scale=scale, window=window, softcap=softcap)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def gather_cache(cache, b, length, block_table=None):
    """The first `length` tokens of sequence b of a contiguous (batch, max_seqlen, kv_heads,
    head_dim) or paged (num_pages, page_size, kv_heads, head_dim) cache."""
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    pages = block_table[b, :(length + page_size - 1) // page_size].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, softcap=0.0, window=-1):
    """Decode: the seqlen_q queries of q (batch, seqlen_q, heads, head_dim) are the last
    positions of each sequence, whose cache holds cache_seqlens[b] tokens (the new ones
    included); query s sits at position cache_seqlens[b] - seqlen_q + s. This is
    attention(causal=True, window=(window, 0)) against the sequence's tokens.
    Returns out (batch, seqlen_q, heads, head_dim) and lse (batch, heads, seqlen_q), float64."""
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        kb = gather_cache(k_cache, b, length, block_table).unsqueeze(0)
        vb = gather_cache(v_cache, b, length, block_table).unsqueeze(0)
        out, lse = attention(q[b:b + 1], kb, vb, causal=True, scale=scale, window=(window, 0), softcap=softcap)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial results:
    lse = log(exp(lse_a) + exp(lse_b)), out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse).
    out (batch, seqlen, heads, head_dim) with lse (batch, heads, seqlen), or out (tokens,
    heads, head_dim) with lse (heads, tokens). Both -inf gives 0 and -inf."""
    lse_a, lse_b = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.where(torch.isfinite(lse), torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(torch.isfinite(lse), torch.exp(lse_b - safe), torch.zeros_like(lse))
    # lse is (..., heads, seqlen); out is (..., seqlen, heads, head_dim).
    w_a, w_b = w_a.transpose(-1, -2).unsqueeze(-1), w_b.transpose(-1, -2).unsqueeze(-1)
    return out_a.double() * w_a + out_b.double() * w_b, lse
