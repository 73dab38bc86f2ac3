"""The float64 oracle of every attnkit op: plain, slow PyTorch written for clarity.

Every kernel, CPU and CUDA, is tested against these functions. This file is the
executable form of docs/semantics.md; when the two disagree, fix whichever is wrong and
keep them equal. All functions cast their inputs to float64 and return float64 tensors
(lse included), on the device of their inputs. They are differentiable with
torch.autograd, fully masked rows included (no NaN forward or backward), so tests take
reference gradients by backward through them.

Semantics (docs/semantics.md):

- Layout (batch, seqlen, heads, head_dim). q has `Hq` heads, k and v have `Hkv` heads,
  Hq % Hkv == 0, and q head h reads kv head h // (Hq // Hkv) (GQA / MQA). k and v share
  their head_dim.
- Logits: s = scale * q.k, with scale = 1/sqrt(head_dim) by default. With softcap > 0,
  s = softcap * tanh(s / softcap).
- Masks: for query row i of a sequence with seqlen_q queries and seqlen_k keys, the
  diagonal is d = i + seqlen_k - seqlen_q (bottom-right alignment). Key j is visible iff
    window_left  == -1 or j >= d - window_left, and
    window_right == -1 or j <= d + window_right, and
    0 <= j < seqlen_k.
  causal=True is the same as window_right = 0 (as in FlashAttention). Window values are
  >= -1 (-1 = unbounded). Sink tokens n (with window_left != -1): keys j < n that pass the
  right bound are visible too, whatever the left bound (StreamingLLM, FA3).
- ALiBi: with slopes, s_ij += -slope * |d - j| after the softcap (FlashAttention's ALiBi).
- out_i = sum_j softmax_j(s_ij) v_j over the visible keys j;
  lse_i = log(sum_j exp(s_ij)) over the visible keys (natural log), shape
  (batch, heads, seqlen_q) dense or (heads, total_q) varlen.
  A row with no visible key gives out 0 and lse -inf, never NaN.
- Non-finite inputs: a NaN in q, or in a key or value the row sees, makes the row's output
  NaN (lse too, for q and keys), as in torch SDPA; a key or value the row does not see
  (masked, past the sequence, not selected) never reaches it, not even as 0 * NaN.
"""
import math

import torch


def mask(seqlen_q, seqlen_k, causal=False, window=(-1, -1), device=None, sink_tokens=0):
    """The visibility matrix: bool (seqlen_q, seqlen_k), True where query i may attend to key j.

    With the bottom-right diagonal d = i + seqlen_k - seqlen_q of query i, key j is visible iff
    (window_left == -1 or j >= d - window_left) and (window_right == -1 or j <= d + window_right)
    and 0 <= j < seqlen_k. causal=True sets window_right = 0. window = (window_left,
    window_right), each >= -1 (-1 = unbounded). sink_tokens = n: with window_left != -1, keys
    j < n are visible whatever the left bound (the right bound still applies).
    """
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) with each >= -1, got {tuple(window)}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    right_ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    # Written as distances from the diagonal (small), so any Python int window fits int64.
    if right != -1:
        right_ok &= j - diag <= right
    if left == -1:
        return right_ok
    return right_ok & ((diag - j <= left) | (j < sink_tokens))


def alibi_bias(seqlen_q, seqlen_k, slopes, device=None):
    """FlashAttention's ALiBi bias, float64 (..., seqlen_q, seqlen_k) for slopes (...,):
    -slope * |i + seqlen_k - seqlen_q - j|."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    distance = (i + seqlen_k - seqlen_q - j).abs().double()
    return -slopes.double().to(device)[..., None, None] * distance


def _visible_values(p, v, visible):
    """einsum("bhij,bjhd->bihd", p, v) in which key j contributes to row i only where
    visible[i, j] (broadcast to p's shape): a masked key's NaN or inf value never meets its
    zero probability, while a visible one makes the row's channel NaN."""
    finite = torch.isfinite(v)
    out = torch.einsum("bhij,bjhd->bihd", p, torch.where(finite, v, torch.zeros_like(v)))
    sees = visible.expand(p.shape).to(p.dtype)
    poisoned = torch.einsum("bhij,bjhd->bihd", sees, (~finite).to(p.dtype)) > 0
    return torch.where(poisoned, torch.full_like(out, float("nan")), out)


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, sink_tokens=0, alibi_slopes=None):
    """Exact attention in float64 -> (out, lse).

    q (batch, seqlen_q, Hq, head_dim); k, v (batch, seqlen_k, Hkv, head_dim), Hq % Hkv == 0;
    q head h reads kv head h // (Hq // Hkv).
    s = scale * q.k (scale defaults to 1/sqrt(head_dim)); softcap > 0 maps s to
    softcap * tanh(s / softcap); alibi_slopes ((Hq,) or (batch, Hq)) add alibi_bias.
    Visible keys as in mask(seqlen_q, seqlen_k, causal, window, sink_tokens=sink_tokens)
    (bottom-right diagonal, causal == window_right 0).
    Returns out (batch, seqlen_q, Hq, head_dim) = softmax(s over visible keys) @ v and
    lse (batch, Hq, seqlen_q) = log(sum over visible keys of exp(s)), both float64.
    A row with no visible key gets out 0 and lse -inf; its gradients are 0, not NaN.
    """
    visible = mask(q.shape[1], k.shape[1], causal, window, device=q.device, sink_tokens=sink_tokens)
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(q.shape[0], -1)
        bias = alibi_bias(q.shape[1], k.shape[1], slopes, device=q.device)
    return masked_attention(q, k, v, visible, scale=scale, softcap=softcap, bias=bias)


def masked_attention(q, k, v, visible, *, scale=None, softcap=0.0, bias=None):
    """attention() with an explicit visibility matrix: bool, broadcastable to
    (batch, Hq, seqlen_q, seqlen_k), True where query i may attend to key j, and an optional
    bias (broadcastable alike) added to the logits after the softcap. Same logits, GQA,
    softcap, empty-row and NaN rules; returns (out, lse) in float64."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    # GQA: q head h reads kv head h // (heads // kv_heads).
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)

    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale            # (batch, heads, seqlen_q, seqlen_k)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    visible = visible.expand(s.shape)
    s = s.masked_fill(~visible, float("-inf"))

    # Softmax that stays finite on rows with no visible key (forward and backward): shift by
    # the row max, or by 0 where the row max is -inf, and zero the masked probabilities.
    if seqlen_k > 0:
        row_max = s.detach().amax(dim=-1, keepdim=True)
    else:
        row_max = s.new_zeros(batch, heads, seqlen_q, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.where(visible, torch.exp(s - row_max), torch.zeros_like(s))
    total = p.sum(dim=-1, keepdim=True)                           # 0 exactly on empty rows, NaN on NaN rows
    seen = total != 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    out = _visible_values(p / safe_total, v, visible)
    lse = torch.where(seen, torch.log(safe_total) + row_max, torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, window=(-1, -1),
                     softcap=0.0, block_table=None, seqused_k=None, sink_tokens=0, alibi_slopes=None):
    """attention() per sequence of a packed batch -> (out, lse), float64.

    q (total_q, Hq, head_dim); k, v (total_k, Hkv, head_dim); cu_seqlens_q / cu_seqlens_k
    (batch + 1,) non-decreasing, starting at 0, last entry = total tokens. Sequence b is rows
    cu_seqlens[b]:cu_seqlens[b + 1] and the masks apply per sequence (bottom-right diagonal of
    that sequence's own lengths; a sequence may have 0 queries or 0 keys).
    Paged keys (FlashAttention's convention): with block_table (batch, max_pages), k and v are
    pages (num_pages, page_size, Hkv, head_dim), sequence b has cu_seqlens_k[b + 1] -
    cu_seqlens_k[b] keys, key t in page block_table[b, t // page_size], slot t % page_size
    (gather_cache). seqused_k (batch,): sequence b uses only its first seqused_k[b] keys.
    sink_tokens and alibi_slopes ((Hq,) or (batch, Hq)) as in attention(), per sequence.
    Returns out (total_q, Hq, head_dim) and lse (Hq, total_q).
    """
    cu_q, cu_k = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
    if len(cu_q) != len(cu_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1)")
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        len_k = cu_k[b + 1] - cu_k[b]
        if seqused_k is not None:
            len_k = min(len_k, int(seqused_k[b]))
        if block_table is None:
            kb, vb = k[cu_k[b]:cu_k[b] + len_k].unsqueeze(0), v[cu_k[b]:cu_k[b] + len_k].unsqueeze(0)
        else:
            kb = gather_cache(k, b, len_k, block_table).unsqueeze(0)
            vb = gather_cache(v, b, len_k, block_table).unsqueeze(0)
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        out, lse = attention(qb, kb, vb, causal=causal, scale=scale, window=window, softcap=softcap,
                             sink_tokens=sink_tokens, alibi_slopes=slopes)
        outs.append(out[0])
        lses.append(lse[0])
    if not outs:
        return q.double()[:0], q.new_zeros(q.shape[1], 0, dtype=torch.float64)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def gather_cache(cache, b, length, block_table=None):
    """The first `length` tokens (length, Hkv, head_dim) of sequence b of a KV cache.

    Contiguous cache (batch, max_seqlen, Hkv, head_dim): cache[b, :length].
    Paged cache (num_pages, page_size, Hkv, head_dim) with block_table (batch,
    max_pages_per_seq): token t lives in page block_table[b, t // page_size], slot
    t % page_size. Entries of block_table beyond the sequence's used pages are not read.
    """
    if block_table is None:
        if length > cache.shape[1]:
            raise ValueError(f"cache_seqlens[{b}] = {length} exceeds the cache capacity {cache.shape[1]}")
        return cache[b, :length]
    page_size = cache.shape[1]
    used = (length + page_size - 1) // page_size
    if used > block_table.shape[1]:
        raise ValueError(f"cache_seqlens[{b}] = {length} exceeds block_table capacity "
                         f"{block_table.shape[1]} x {page_size}")
    pages = block_table[b, :used].long().to(cache.device)
    return cache[pages].reshape(used * page_size, *cache.shape[2:])[:length]


def decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, softcap=0.0, window=-1, sink_tokens=0,
           alibi_slopes=None):
    """Decode of a few new queries against a KV cache -> (out, lse), float64.

    q (batch, seqlen_q, Hq, head_dim), 1 <= seqlen_q <= 16. cache_seqlens (batch,): the number
    of valid tokens of sequence b, *including* the seqlen_q new ones, whose keys / values are
    already in the cache. The queries are the last seqlen_q positions: query s sits at position
    cache_seqlens[b] - seqlen_q + s and is causal (bottom-right) among them, i.e. this is
    attention(causal=True, window=(window, 0)) against the sequence's cache_seqlens[b] tokens
    (a query with no visible key, e.g. when cache_seqlens[b] < seqlen_q, gets 0 and lse -inf).
    Caches: contiguous (batch, S_max, Hkv, head_dim) with cache_seqlens[b] <= S_max, or paged
    (num_pages, page_size, Hkv, head_dim) with block_table (batch, max_pages_per_seq): token t
    of sequence b lives in page block_table[b, t // page_size], slot t % page_size (see
    gather_cache). window: keys more than `window` positions before a query are masked
    (-1 = unbounded); sink_tokens and alibi_slopes ((Hq,) or (batch, Hq)) as in attention().
    Returns out (batch, seqlen_q, Hq, head_dim) and lse (batch, Hq, seqlen_q).
    """
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        kb = gather_cache(k_cache, b, int(length), block_table).unsqueeze(0)
        vb = gather_cache(v_cache, b, int(length), block_table).unsqueeze(0)
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        out, lse = attention(q[b:b + 1], kb, vb, causal=True, scale=scale, window=(window, 0), softcap=softcap,
                             sink_tokens=sink_tokens, alibi_slopes=slopes)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def selected_tokens(indices, tokens_per_index, length):
    """Token positions named by one row of a sparse decode selection, in selection order.

    Entry e names tokens e * tokens_per_index ... (e + 1) * tokens_per_index - 1 (a logical
    page of that many tokens, or one token when tokens_per_index is 1); entries < 0 name
    nothing, and tokens >= length are dropped (a partial last page, or past the end).
    """
    tokens = []
    for entry in indices.tolist():
        if entry >= 0:
            tokens.extend(t for t in range(entry * tokens_per_index, (entry + 1) * tokens_per_index) if t < length)
    return tokens


def sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, indices, *, tokens_per_index, scale=None,
                  softcap=0.0):
    """Decode over selected keys of a paged KV cache -> (out, lse), float64.

    As decode() (paged cache, queries the last seqlen_q positions, causal among themselves),
    but q head h of kv head g = h // (Hq // Hkv) of sequence b sees only the tokens
    selected_tokens(indices[b, g], tokens_per_index, cache_seqlens[b]), masked causally by
    their positions: query s (at position cache_seqlens[b] - seqlen_q + s) sees a selected
    token t iff t <= its position. The selection's order does not matter; a token selected
    twice counts twice. attnkit.sparse_decode passes page indices with tokens_per_index =
    page_size, attnkit.sparse_decode_tokens token indices with tokens_per_index = 1.
    A query row with no visible selected key gets out 0 and lse -inf.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=torch.float64, device=q.device)
    for b, length in enumerate(cache_seqlens.tolist()):
        keys = gather_cache(k_cache, b, length, block_table).double()
        values = gather_cache(v_cache, b, length, block_table).double()
        query_pos = torch.arange(seqlen_q, device=q.device) + (length - seqlen_q)
        for g in range(kv_heads):
            tokens = torch.tensor(selected_tokens(indices[b, g], tokens_per_index, length), dtype=torch.long,
                                  device=q.device)
            if tokens.numel() == 0:
                continue
            qg = q[b, :, g * group:(g + 1) * group].double()               # (seqlen_q, group, D)
            s = torch.einsum("sgd,td->gst", qg, keys[tokens, g]) * scale     # (group, seqlen_q, n)
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            visible = tokens[None, :] <= query_pos[:, None]                # (seqlen_q, n)
            s = s.masked_fill(~visible, float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)                           # (group, seqlen_q)
            seen = row_lse != float("-inf")
            prob = torch.where(seen[..., None], torch.exp(s - row_lse[..., None]), torch.zeros_like(s))
            v_rows = values[tokens, g][None, :, None].expand(1, len(tokens), group, head_dim)
            out[b, :, g * group:(g + 1) * group] = _visible_values(prob[None], v_rows, visible)[0]
            lse[b, g * group:(g + 1) * group] = row_lse
    return out, lse


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial results -> (out, lse).

    lse = log(exp(lse_a) + exp(lse_b)), out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
    Layouts: out (batch, seqlen, heads, head_dim) with lse (batch, heads, seqlen), or
    out (tokens, heads, head_dim) with lse (heads, tokens). A side with lse -inf contributes
    nothing; both -inf gives out 0 and lse -inf. Returned in float64.
    """
    lse_a, lse_b = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    # lse is (..., heads, seqlen); out is (..., seqlen, heads, head_dim).
    w_a, w_b = w_a.transpose(-1, -2).unsqueeze(-1), w_b.transpose(-1, -2).unsqueeze(-1)
    return out_a.double() * w_a + out_b.double() * w_b, lse


def page_scores(q, key_min, key_max, block_table, cache_seqlens, *, page_size, scale=None):
    """Quest page scores in float64 -> (batch, kv_heads, max_pages); see attnkit.page_scores.

    Score of logical page j of (b, kv head g): max over queries and the group's q heads of
    sum_d max(scale*q_d*key_min[p, g, d], scale*q_d*key_max[p, g, d]), p = block_table[b, j];
    -inf for j >= ceil(cache_seqlens[b] / page_size).
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv, max_pages = key_min.shape[1], block_table.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.full((batch, heads_kv, max_pages), float("-inf"), dtype=torch.float64)
    qs = q.double().cpu() * scale
    for b, length in enumerate(cache_seqlens.tolist()):
        n = -(-int(length) // page_size)
        if n == 0:
            continue
        phys = block_table[b, :n].long().cpu()
        lo = key_min[phys].double().cpu().permute(1, 0, 2)[None, :, None]  # (1, Hkv, 1, n, D)
        hi = key_max[phys].double().cpu().permute(1, 0, 2)[None, :, None]
        qg = qs[b].view(seqlen_q, heads_kv, heads_q // heads_kv, 1, head_dim)
        bound = torch.maximum(qg * lo, qg * hi).sum(-1)  # (seqlen_q, Hkv, group, n)
        out[b, :, :n] = bound.amax(dim=(0, 2))
    return out


def select_pages(scores, top_k, *, sink_pages=1, recent_pages=1):
    """The pages attnkit.select_pages keeps, by plain Python sorting -> int32 (batch, kv_heads, width).

    Valid pages: the leading scores that are not -inf. Keeps the first sink_pages and the last
    recent_pages of them and the top_k best of the rest (ties to the lower index), ascending,
    -1 padded to width = top_k + sink_pages + recent_pages.
    """
    batch, heads_kv, max_pages = scores.shape
    width = top_k + sink_pages + recent_pages
    out = torch.full((batch, heads_kv, width), -1, dtype=torch.int32)
    for b in range(batch):
        for g in range(heads_kv):
            row = scores[b, g].tolist()
            n = next((j for j, s in enumerate(row) if s == float("-inf")), max_pages)
            keep = set(range(min(sink_pages, n))) | set(range(max(n - recent_pages, 0), n))
            rest = [j for j in range(n) if j not in keep]
            rest.sort(key=lambda j: (math.isnan(row[j]), -row[j] if not math.isnan(row[j]) else 0.0, j))
            chosen = sorted(keep | set(rest[:top_k]))
            out[b, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


# ---- quantized KV formats (docs/quantization.md) -------------------------------------------

_INT_LEVELS = {"int8": 255, "int4": 15}
_FP8_MAX = 448.0


def quantize_kv(x, kv_format, *, group_size=None):
    """Codes of x (..., kv_heads, head_dim) in `kv_format`, computed in float64 ->
    (data uint8, scale float64, zero float64 or None), laid out as attnkit.quantize_kv lays
    them out (scale and zero (..., kv_heads, groups)).

    Per group of `group_size` channels (None: the whole row):
    int8 / int4 with L = 255 / 15 levels: zero = min (+0 for -0), scale = (max - min) / L,
    code = clamp(round_half_even((x - zero) / scale), 0, L); a constant group has scale 0 and
    codes 0. int4 packs channel 2j in the low nibble of byte j and 2j + 1 in the high one.
    fp8_e4m3 (one group per row): scale = max|x| / 448, code = the e4m3fn byte of x / scale
    (torch.float8_e4m3fn conversion, round half to even) after clamping to [-448, 448]; a row
    of zeros has scale 0 and keeps the signs of its zeros. A group with a NaN or +-inf gets
    scale (and zero) NaN and codes 0. The kernels compute in float32, so a code may differ
    by one where (x - zero) / scale is within float32 rounding of a half-way point.
    """
    xd = x.detach().double()
    head_dim = xd.shape[-1]
    group = group_size or head_dim
    xg = xd.unflatten(-1, (head_dim // group, group))
    finite = torch.isfinite(xg).all(-1)
    nan = torch.full_like(finite, float("nan"), dtype=torch.float64)
    if kv_format == "fp8_e4m3":
        scale = xg.abs().amax(-1) / _FP8_MAX
        ratio = torch.where(scale[..., None] > 0, xg / scale[..., None], xg).clamp(-_FP8_MAX, _FP8_MAX)
        codes = ratio.to(torch.float8_e4m3fn).view(torch.uint8)
        codes = torch.where(finite[..., None], codes, torch.zeros_like(codes))
        return codes.flatten(-2), torch.where(finite, scale, nan), None
    levels = _INT_LEVELS[kv_format]
    lo, hi = xg.amin(-1), xg.amax(-1)
    lo = lo + 0.0  # -0 -> +0
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    codes = torch.round((xg - lo[..., None]) / safe).clamp(0, levels)
    codes = torch.where((scale > 0)[..., None] & finite[..., None], codes, torch.zeros_like(codes))
    codes = codes.flatten(-2).to(torch.uint8)
    if kv_format == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.where(finite, scale, nan), torch.where(finite, lo, nan)


def dequantize_kv(data, scale, zero, kv_format, *, group_size=None):
    """The float64 values of codes in `kv_format` -> (..., kv_heads, head_dim):
    int: code * scale + zero per group; fp8_e4m3: e4m3(code) * scale (torch.float8_e4m3fn)."""
    if kv_format == "fp8_e4m3":
        return data.view(torch.float8_e4m3fn).double() * scale.double()  # scale (..., 1)
    codes = data.long()
    if kv_format == "int4":
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    head_dim = codes.shape[-1]
    group = group_size or head_dim
    codes = codes.double().unflatten(-1, (head_dim // group, group))
    return (codes * scale.double()[..., None] + zero.double()[..., None]).flatten(-2)


def neighborhood_axis_mask(length, kernel_size, dilation=1, stride=1, is_causal=False):
    """Which keys each query sees along one spatial axis: bool (length, length), [query, key].

    NATTEN's rule (docs/neighborhood.md). Position x is in dilation group x % dilation at index
    x // dilation of that group, which holds n = ceil((length - group) / dilation) positions;
    a query only sees keys of its own group. Indices i (query) and j (key) inside the group:
    - stride groups: the queries i with the same i // stride share the window of their leader,
      the stride group's centre index (i // stride) * stride + stride // 2 (the right one of
      two for even stride; causal: its last index, + stride - 1), capped at n - 1.
    - non-causal: the window has kernel_size // 2 keys before its centre and
      kernel_size - 1 - kernel_size // 2 after it, where the centre is the leader clamped
      into [kernel_size // 2, n - 1 - (kernel_size - 1 - kernel_size // 2)] (windows shift
      inward at the borders): exactly kernel_size keys.
    - causal: key j is seen iff j <= i and leader - j < kernel_size.
    """
    x = torch.arange(length)
    q, k = x[:, None], x[None, :]
    same_group = (q % dilation) == (k % dilation)
    i, j = q // dilation, k // dilation
    n = (length - q % dilation + dilation - 1) // dilation
    if is_causal:
        leader = torch.minimum(i // stride * stride + stride - 1, n - 1)
        return same_group & (j <= i) & (leader - j < kernel_size)
    leader = torch.minimum(i // stride * stride + stride // 2, n - 1)
    before, after = kernel_size // 2, kernel_size - 1 - kernel_size // 2
    centre = torch.maximum(torch.minimum(leader, n - 1 - after), torch.full_like(leader, before))
    return same_group & (j >= centre - before) & (j <= centre + after)


def neighborhood_mask(spatial, kernel_size, dilation, stride, is_causal):
    """The visibility matrix of neighborhood attention on a grid: bool (tokens, tokens) over
    the row-major flattened grid (last axis fastest). spatial, kernel_size, dilation, stride
    and is_causal are per-axis tuples; query x sees key y iff it does on every axis
    (neighborhood_axis_mask): the neighbourhood is the product of the per-axis windows."""
    full = torch.ones(1, 1, dtype=torch.bool)
    for axis in zip(spatial, kernel_size, dilation, stride, is_causal):
        m = neighborhood_axis_mask(*axis)
        # Outer combination: (a, a) x (b, b) -> (a * b, a * b), the new axis fastest.
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(full.shape[0] * m.shape[0], -1)
    return full


def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, stride=1, is_causal=False, scale=None):
    """Neighborhood attention in float64 -> (out, lse).

    q (batch, *spatial, Hq, head_dim), k, v (batch, *spatial, Hkv, head_dim) with 1 to 3
    spatial axes; kernel_size, dilation, stride, is_causal: an int / bool for every axis or a
    tuple with one per axis. Every query attends to the keys neighborhood_mask gives (NATTEN
    semantics: kernel_size neighbours per axis, windows shifting inward at the borders,
    dilation groups, stride groups sharing their leader's window, per-axis causal), with
    s = scale * q.k (scale defaults to 1/sqrt(head_dim)) and GQA as in attention().
    Returns out like q and lse (batch, Hq, *spatial), both float64.
    """
    spatial = tuple(q.shape[1:-2])
    rank = len(spatial)

    def per_axis(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank

    visible = neighborhood_mask(spatial, per_axis(kernel_size), per_axis(dilation), per_axis(stride),
                                per_axis(is_causal)).to(q.device)
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    tokens = visible.shape[0]
    qf = q.double().reshape(batch, tokens, heads, head_dim)
    kf = k.double().reshape(batch, tokens, k.shape[-2], head_dim).repeat_interleave(heads // k.shape[-2], dim=2)
    vf = v.double().reshape(batch, tokens, v.shape[-2], head_dim).repeat_interleave(heads // v.shape[-2], dim=2)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # finite (for finite inputs): every query sees at least one key
    out = _visible_values(torch.exp(s - lse[..., None]), vf, visible)
    return out.reshape(q.shape[:-1] + (head_dim,)), lse.reshape(batch, heads, *spatial)


def _listed(indices, counts, num):
    """bool (batch, heads, row_blocks, num): entry n of row (b, h, m) set iff n is among the
    first counts[b, h, m] (clamped to [0, list length]) of indices[b, h, m]; entries outside
    [0, num) select nothing. Entry by entry, in Python."""
    batch, heads, row_blocks, length = indices.shape
    listed = torch.zeros(batch, heads, row_blocks, num, dtype=torch.bool)
    entries, numbers = indices.cpu().tolist(), counts.cpu().tolist()
    for b in range(batch):
        for h in range(heads):
            for m in range(row_blocks):
                for entry in entries[b][h][m][:max(0, min(length, numbers[b][h][m]))]:
                    if 0 <= entry < num:
                        listed[b, h, m, entry] = True
    return listed


def block_sparse_mask(kv_block_indices, kv_block_counts, seqlen_q, seqlen_k, *, block_size_q, block_size_k,
                      causal=False, column_indices=None, column_counts=None):
    """The visibility matrix of block-sparse attention: bool (batch, heads, seqlen_q, seqlen_k).

    Query i of (batch b, head h) sees key j iff key block j // block_size_k is among the first
    kv_block_counts[b, h, i // block_size_q] entries of kv_block_indices[b, h, i // block_size_q]
    (a set: order and repeats do not matter; entries outside [0, ceil(seqlen_k / block_size_k))
    select nothing; counts are clamped to [0, list length]) and, with causal, j <= i + seqlen_k -
    seqlen_q (bottom-right, as attention()). With column lists (same shapes), query i also
    sees key j if j is among the first column_counts[b, h, i // block_size_q] entries of
    column_indices[b, h, i // block_size_q] (causal on top). Built entry by entry from the
    lists, in Python."""
    k_blocks = -(-seqlen_k // block_size_k)
    rows = torch.arange(seqlen_q) // block_size_q
    cols = torch.arange(seqlen_k) // block_size_k
    visible = _listed(kv_block_indices, kv_block_counts, k_blocks)[:, :, rows][:, :, :, cols]
    if column_indices is not None:
        visible = visible | _listed(column_indices, column_counts, seqlen_k)[:, :, rows]
    if causal:
        visible = visible & mask(seqlen_q, seqlen_k, causal=True)
    return visible.to(kv_block_indices.device)


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size_q=64, block_size_k=64,
                           causal=False, scale=None, softcap=0.0, column_indices=None, column_counts=None):
    """Block-sparse attention in float64 -> (out, lse): attention() restricted to
    block_sparse_mask(...) (see there); GQA, scale, softcap and the empty-row rule as in
    attention(). q (batch, seqlen_q, Hq, head_dim), lists (batch, Hq, ceil(seqlen_q /
    block_size_q), list_len), counts (batch, Hq, ceil(seqlen_q / block_size_q))."""
    visible = block_sparse_mask(kv_block_indices, kv_block_counts, q.shape[1], k.shape[1],
                                block_size_q=block_size_q, block_size_k=block_size_k, causal=causal,
                                column_indices=column_indices, column_counts=column_counts)
    return masked_attention(q, k, v, visible, scale=scale, softcap=softcap)


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_block_indices, kv_block_counts, **opts):
    """block_sparse_attention per packed sequence in float64 -> (out (total_q, Hq, head_dim),
    lse (Hq, total_q)): sequence b's rows against its keys with its lists (batch entry b, or
    0 when the lists have batch 1), the query blocks its rows span, key blocks and columns
    numbered within it; options (block sizes, causal, scale, softcap, column lists) as there."""
    cu_q, cu_k = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
    block_size_q = opts.get("block_size_q", 64)
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        q_blocks = -(-(cu_q[b + 1] - cu_q[b]) // block_size_q)
        mine = lambda t: t[min(b, t.shape[0] - 1)][None, :, :q_blocks]  # noqa: E731
        seq_opts = {name: mine(t) if name.startswith("column") and t is not None else t for name, t in opts.items()}
        out, lse = block_sparse_attention(q[None, rows], k[None, keys], v[None, keys], mine(kv_block_indices),
                                          mine(kv_block_counts), **seq_opts)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def block_attention_map(q, k, *, block_size, causal=False, scale=None):
    """SeerAttention's gate target in float64: the softmax probabilities of full attention
    (causal: bottom-right), max-pooled over blocks of block_size queries x block_size keys ->
    (batch, Hq, ceil(seqlen_q / block_size), ceil(seqlen_k / block_size)); a block no query
    sees holds 0."""
    visible = mask(q.shape[1], k.shape[1], causal=causal, device=q.device)
    _, lse = masked_attention(q, k, k, visible, scale=scale)
    q64, k64 = q.double(), k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q64, k64) * scale
    p = torch.where(visible, torch.exp(s - lse[..., None]), torch.zeros_like(s))
    pad_q, pad_k = (-q.shape[1]) % block_size, (-k.shape[1]) % block_size
    p = torch.nn.functional.pad(p, (0, pad_k, 0, pad_q))
    b, h, sq, sk = p.shape
    return p.reshape(b, h, sq // block_size, block_size, sk // block_size, block_size).amax(dim=(3, 5))
