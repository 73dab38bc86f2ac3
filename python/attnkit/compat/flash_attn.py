"""FlashAttention 2.8's Python API on attnkit's ops, with flash-attn 2.8.3's parameter names,
defaults and return values: flash_attn_func and its packed and varlen variants (forward and
backward, on attnkit.attention / attention_varlen), flash_attn_with_kvcache (cache append,
rotary, cache_batch_idx, cache_leftpad, paged caches; on attnkit.decode or attention_varlen)
and FA3's flash_attn_combine (on attnkit.merge_attention_states).

Not supported (NotImplementedError): dropout_p > 0. docs/compat_flash_attn.md
has the mapping, which kernel each flash_attn_with_kvcache call runs, and the choices made
where FlashAttention leaves the behaviour open.
"""
import math

import torch

from .._checks import check_tensor
from ..decode import decode
from ..merge import merge_attention_states
from ..prefill import attention, attention_varlen

DECODE_MAX_QUERIES = 16  # attnkit.decode takes at most this many queries per sequence


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _tensor(t, name, dim, layout):
    check_tensor(t, name)
    _require(t.dim() == dim, f"{name} must have {dim} dimensions {layout}, got shape {tuple(t.shape)}")


def _packed(t, name, dim, count, layout):
    _tensor(t, name, dim, layout)
    _require(t.shape[-3] == count, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _index(t, name, dim, rows, device):
    """An int32 / int64 tensor of `dim` dimensions with `rows` rows on `device`."""
    check_tensor(t, name)
    _require(t.dtype in (torch.int32, torch.int64) and t.dim() == dim and t.shape[0] == rows and t.device == device,
             f"{name} must be an int32 (or int64) tensor with {dim} dimension(s) and {rows} rows (batch) on "
             f"{device}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


def _int(value, name):
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"{name} must be an int >= 0, got {value!r}")
    return value


def _no_dropout(dropout_p):
    _require(isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and 0 <= dropout_p <= 1,
             f"dropout_p must be a probability in [0, 1], got {dropout_p!r}")
    if dropout_p > 0:
        raise NotImplementedError(f"dropout_p > 0 is not supported: attnkit has no attention dropout (got "
                                  f"dropout_p={dropout_p}); pass dropout_p=0.0")


def _softcap(softcap):
    _require(isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and not math.isnan(softcap),
             f"softcap must be a number (<= 0 = off), got {softcap!r}")
    return max(float(softcap), 0.0)


def _scale(softmax_scale):
    _require(softmax_scale is None or (isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
                                       and math.isfinite(softmax_scale)),
             f"softmax_scale must be a finite number or None (1 / sqrt(head_dim)), got {softmax_scale!r}")
    return softmax_scale


def _fa_mask(causal, window_size, seqlen_k):
    """FlashAttention's reading of (causal, window_size) as attnkit's (causal, window): a
    bound < 0 or >= seqlen_k (the key length, or the bound max_seqlen_k) is unbounded, and
    causal sets the right bound to 0."""
    _require(isinstance(window_size, (tuple, list)) and len(window_size) == 2 and
             all(isinstance(w, int) and not isinstance(w, bool) for w in window_size),
             f"window_size must be a (left, right) pair of ints, -1 = unbounded; got {window_size!r}")
    left, right = (-1 if w < 0 or w >= seqlen_k else w for w in window_size)
    causal = bool(causal)
    return causal, (left, 0 if causal else right)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func on attnkit.attention: q (batch, seqlen_q, heads, head_dim),
    k, v (batch, seqlen_k, kv_heads, head_dim); causal aligned bottom-right; window_size
    (left, right) keys around the diagonal, -1 = unbounded. Differentiable. Returns out, or
    (out, softmax_lse (batch, heads, seqlen_q) float32, None) with return_attn_probs.
    deterministic is accepted and ignored."""
    _no_dropout(dropout_p)
    _tensor(k, "k", 4, "(batch, seqlen_k, kv_heads, head_dim)")
    causal, window = _fa_mask(causal, window_size, k.shape[1])
    out, lse = attention(q, k, v, causal=causal, scale=_scale(softmax_scale), window=window,
                         softcap=_softcap(softcap), alibi_slopes=alibi_slopes, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func of qkv (batch, seqlen, 3, heads, head_dim)."""
    _packed(qkv, "qkv", 5, 3, "(batch, seqlen, 3, heads, head_dim)")
    return flash_attn_func(*qkv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func of q and kv (batch, seqlen_k, 2, kv_heads, head_dim)."""
    _packed(kv, "kv", 5, 2, "(batch, seqlen_k, 2, kv_heads, head_dim)")
    return flash_attn_func(q, *kv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func on attnkit.attention_varlen: q (total_q, heads,
    head_dim), k, v (total_k, kv_heads, head_dim), int32 cu_seqlens_* (batch + 1); masks per
    sequence. With block_table (batch, max_pages) k, v are pages (num_blocks, page_size,
    kv_heads, head_dim) and sequence b reads its cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys
    from pages block_table[b] (gathered first). Differentiable. Returns out, or (out,
    softmax_lse (heads, total_q), None) with return_attn_probs."""
    _no_dropout(dropout_p)
    causal, window = _fa_mask(causal, window_size, _int(max_seqlen_k, "max_seqlen_k"))
    options = dict(causal=causal, scale=_scale(softmax_scale), window=window, softcap=_softcap(softcap),
                   alibi_slopes=alibi_slopes, return_lse=True)
    if block_table is None:
        out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    else:
        for t, name in ((k, "k"), (v, "v")):
            _tensor(t, name, 4, "(num_blocks, page_size, kv_heads, head_dim) with block_table")
        for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
            _tensor(t, name, 1, "(batch + 1,)")
        _require(cu_seqlens_q.shape == cu_seqlens_k.shape, f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 "
                 f"entries, got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        _index(block_table, "block_table", 2, cu_seqlens_k.shape[0] - 1, k.device)
        lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        if k.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_cache_values(lengths, 0, block_table.shape[1] * k.shape[1], k.shape[0], None, None, block_table,
                                k.shape[1], lengths_name="cu_seqlens_k[{b} + 1] - cu_seqlens_k[{b}]")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):  # differentiable: a copy
            out, lse = _attention_over_rows(q, cu_seqlens_q, _int(max_seqlen_q, "max_seqlen_q"),
                                            _cache_rows(k, block_table=block_table),
                                            _cache_rows(v, block_table=block_table), torch.zeros_like(lengths),
                                            lengths, options)
        else:  # inference: attnkit's paged prefill reads the pages in place
            out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        block_table=block_table.int(), **options)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func of qkv (total, 3, heads, head_dim), one cu_seqlens for q and k."""
    _packed(qkv, "qkv", 4, 3, "(total, 3, heads, head_dim)")
    return flash_attn_varlen_func(*qkv.unbind(1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func of q and kv (total_k, 2, kv_heads, head_dim)."""
    _packed(kv, "kv", 4, 2, "(total_k, 2, kv_heads, head_dim)")
    return flash_attn_varlen_func(q, *kv.unbind(1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _cache_rows(cache, batch=None, cache_batch_idx=None, block_table=None):
    """(batch, capacity, kv_heads, head_dim): each sequence's cache slots in position order.
    Paged: its table's pages end to end (a copy); contiguous: its cache row (a view, or a copy
    with cache_batch_idx). Ids are clamped into the cache: entries past a sequence's end may
    hold anything."""
    if block_table is not None:
        return cache[block_table.long().clamp(0, cache.shape[0] - 1)].flatten(1, 2)
    if cache_batch_idx is not None:
        return cache[cache_batch_idx.long().clamp(0, cache.shape[0] - 1)]
    return cache[:batch]


def _attention_over_rows(q, cu_seqlens_q, max_seqlen_q, keys, values, first, end, options):
    """attention_varlen of packed q (sequence b in rows cu_seqlens_q[b]:cu_seqlens_q[b + 1])
    over keys[b, first[b]:end[b]] and values alike, keys and values (batch, capacity,
    kv_heads, head_dim). The rows between two sequences' keys become sequences with keys and
    no queries, so nothing is compacted and no length is read on the host."""
    batch, capacity = keys.shape[:2]
    end = end.clamp(0, capacity)
    first = torch.minimum(first.clamp(min=0), end)
    base = torch.arange(batch, dtype=end.dtype, device=end.device) * capacity
    bounds = torch.stack([base + first, base + end], 1).flatten()
    cu_k = torch.cat([bounds.new_zeros(1), bounds, bounds.new_full((1,), batch * capacity)]).int()
    # A gap spans the end of one row and the start of the next: at most 2 * capacity keys.
    return attention_varlen(q, keys.flatten(0, 1), values.flatten(0, 1), cu_seqlens_q.repeat_interleave(2), cu_k,
                            max_seqlen_q, 2 * capacity, **options)


def _rotate(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, heads, head_dim) with its first rotary_dim = 2 * cos.shape[1]
    channels rotated by the angles of rows `positions` (batch, seqlen) of cos / sin, in float32:
    pairs (2i, 2i + 1) when interleaved (GPT-J), (i, i + rotary_dim / 2) otherwise (GPT-NeoX)."""
    rows = positions.clamp(0, cos.shape[0] - 1)
    c, s = cos[rows].float().unsqueeze(2), sin[rows].float().unsqueeze(2)
    half = cos.shape[1]
    x_rot = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half:]], dim=-1)


def _append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table):
    """Writes k, v (batch, seqlen_new, kv_heads, head_dim) at positions cache_seqlens[b] + i
    of each sequence: one index_put_ per cache, destinations computed by tensor ops and
    clamped into the cache (an unchecked length never writes out of bounds)."""
    batch, seqlen_new = k.shape[:2]
    positions = seqlens.long()[:, None] + torch.arange(seqlen_new, device=k.device)
    if block_table is None:
        rows = torch.arange(batch, device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        rows = rows[:, None].expand(batch, seqlen_new).clamp(0, k_cache.shape[0] - 1)
        slots = positions.clamp(0, k_cache.shape[1] - 1)
    else:
        page_size = k_cache.shape[1]
        positions = positions.clamp(0, block_table.shape[1] * page_size - 1)
        rows = block_table.long().gather(1, positions // page_size).clamp(0, k_cache.shape[0] - 1)
        slots = positions % page_size
    where = (rows.flatten(), slots.flatten())
    k_cache.index_put_(where, k.flatten(0, 1))
    v_cache.index_put_(where, v.flatten(0, 1))


def _fail_at(bad, message):
    """ValueError(message with {b} the first batch index where `bad` holds), if any."""
    hits = bad.nonzero()
    if hits.numel():
        raise ValueError(message.format(b=int(hits[0, 0])))


def _check_cache_values(seqlens, seqlen_new, capacity, num_rows, cache_batch_idx, cache_leftpad, block_table,
                        page_size, lengths_name="cache_seqlens[{b}] + seqlen_new"):
    """The value checks FlashAttention leaves to the caller; made where reading values costs
    no device sync (CPU tensors outside torch.compile). Elsewhere indices are clamped."""
    seqlens = seqlens.long()
    _fail_at((seqlens < 0) | (seqlens + seqlen_new > capacity),
             f"{lengths_name} must lie in [0, {capacity}] (the cache capacity), with seqlen_new = {seqlen_new}")
    if cache_batch_idx is not None:
        _fail_at((cache_batch_idx < 0) | (cache_batch_idx >= num_rows),
                 f"cache_batch_idx[{{b}}] must be a k_cache row in [0, {num_rows})")
    if cache_leftpad is not None:
        _fail_at((cache_leftpad < 0) | (cache_leftpad > seqlens),
                 "cache_leftpad[{b}] must lie in [0, cache_seqlens[{b}]]")
    if block_table is not None:
        pages = (seqlens + seqlen_new + page_size - 1) // page_size
        used = torch.arange(block_table.shape[1]) < pages[:, None]
        _fail_at((used & ((block_table < 0) | (block_table >= num_rows))).any(1),
                 f"block_table[{{b}}] must hold page ids in [0, {num_rows}) for the pages the sequence uses")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, *, page_table=None):
    """flash_attn.flash_attn_with_kvcache: attention of q (batch, seqlen_q, heads, head_dim)
    over a KV cache, after writing the new k, v (batch, seqlen_new, kv_heads, head_dim) into it
    in place at positions cache_seqlens[b] + i.

    Caches: contiguous (batch_cache, seqlen_cache, kv_heads, head_dim), sequence b in row
    cache_batch_idx[b] (default b); or paged (num_blocks, page_size, kv_heads, head_dim) with
    block_table (FA3 name: page_table) (batch, max_pages), any page_size. cache_seqlens (int or
    (batch,)): tokens in the cache before the append (default: the whole capacity). Sequence b
    attends to cache positions [cache_leftpad[b] (default 0), cache_seqlens[b] + seqlen_new),
    with causal / window_size aligned bottom-right. rotary_cos / rotary_sin (seqlen_ro,
    rotary_dim / 2): k rotated at positions cache_seqlens[b] + i before the write, q at
    cache_seqlens[b] + i when causal or windowed, else all of q at cache_seqlens[b].
    num_splits is ignored. Returns out, or (out, softmax_lse (batch, heads, seqlen_q)) with
    return_softmax_lse. Runs attnkit.decode or attention_varlen: docs/compat_flash_attn.md.
    """
    if page_table is not None:
        _require(block_table is None, "pass block_table or page_table (its FA3 name), not both")
        block_table = page_table
    _tensor(q, "q", 4, "(batch, seqlen_q, heads, head_dim)")
    paged = block_table is not None
    layout = ("(num_blocks, page_size, kv_heads, head_dim) with block_table" if paged
              else "(batch_cache, seqlen_cache, kv_heads, head_dim)")
    _tensor(k_cache, "k_cache", 4, layout)
    _tensor(v_cache, "v_cache", 4, layout)
    _require(v_cache.shape == k_cache.shape, f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got "
             f"{tuple(v_cache.shape)}")
    batch, seqlen_q = q.shape[:2]
    device = q.device
    if paged:
        _index(block_table, "block_table", 2, batch, device)
        _require(cache_batch_idx is None, "cache_batch_idx does not apply to a paged cache: pass block_table's rows "
                 "in batch order (block_table[cache_batch_idx])")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None:
            _require(k_cache.shape[0] >= batch, f"k_cache must have at least batch = {batch} rows without "
                     f"cache_batch_idx, got {k_cache.shape[0]}")
        else:
            _index(cache_batch_idx, "cache_batch_idx", 1, batch, device)
    if cache_leftpad is not None:
        _index(cache_leftpad, "cache_leftpad", 1, batch, device)
    seqlen_new = 0
    if k is not None or v is not None:
        _require(k is not None and v is not None, "k and v must be given together")
        for t, name in ((k, "k"), (v, "v")):
            _tensor(t, name, 4, "(batch, seqlen_new, kv_heads, head_dim)")
            _require(t.shape[0] == batch and t.shape[2:] == k_cache.shape[2:] and t.shape == k.shape,
                     f"{name} must have shape (batch = {batch}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}) "
                     f"like the cache, got {tuple(t.shape)}")
            _require(t.dtype == k_cache.dtype and t.device == k_cache.device,
                     f"{name} must have k_cache's dtype and device ({k_cache.dtype}, {k_cache.device}), got "
                     f"{t.dtype} on {t.device}")
        seqlen_new = k.shape[1]
    if cache_seqlens is None:
        _require(seqlen_new == 0, "cache_seqlens is required with k and v (it says where they are written)")
        seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    else:
        _index(cache_seqlens, "cache_seqlens", 1, batch, device)
        seqlens = cache_seqlens.int()
    causal, (left, right) = _fa_mask(causal, window_size, capacity)
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        _require(rotary_cos is not None and rotary_sin is not None, "rotary_cos and rotary_sin must be given together")
        _require(seqlen_new > 0, "rotary_cos / rotary_sin rotate the appended keys: pass k and v too")
        _tensor(rotary_cos, "rotary_cos", 2, "(seqlen_ro, rotary_dim / 2)")
        _require(rotary_sin.shape == rotary_cos.shape and rotary_cos.is_floating_point() and
                 rotary_sin.is_floating_point() and rotary_cos.device == device == rotary_sin.device,
                 f"rotary_sin must be a floating tensor of rotary_cos's shape {tuple(rotary_cos.shape)} on {device}")
        _require(0 < 2 * rotary_cos.shape[1] <= q.shape[3] and rotary_cos.shape[0] >= capacity,
                 f"rotary_cos must be (seqlen_ro >= cache capacity {capacity}, rotary_dim / 2) with rotary_dim <= "
                 f"head_dim = {q.shape[3]}, got shape {tuple(rotary_cos.shape)}")
    if device.type == "cpu" and not torch.compiler.is_compiling():
        _check_cache_values(seqlens, seqlen_new, capacity, k_cache.shape[0], cache_batch_idx, cache_leftpad,
                            block_table, k_cache.shape[1])

    if rotary:
        steps = torch.arange(seqlen_q, device=device)
        q_positions = seqlens[:, None] + (steps if left >= 0 or right >= 0 else torch.zeros_like(steps))
        q = _rotate(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
        k = _rotate(k, rotary_cos, rotary_sin, seqlens[:, None] + torch.arange(seqlen_new, device=device),
                    rotary_interleaved)
    if seqlen_new:
        _append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table)
    ends = seqlens + seqlen_new
    options = dict(scale=_scale(softmax_scale), softcap=_softcap(softcap), alibi_slopes=alibi_slopes, return_lse=True)
    if 1 <= seqlen_q <= DECODE_MAX_QUERIES and cache_leftpad is None and (right == 0 or seqlen_q == 1):
        if paged:
            table, keys, values = block_table.int(), k_cache, v_cache
        elif cache_batch_idx is not None:  # each cache row read as one page of seqlen_cache slots
            table, keys, values = cache_batch_idx.int().view(batch, 1), k_cache, v_cache
        else:
            table, keys, values = None, k_cache[:batch], v_cache[:batch]
        out, lse = decode(q, keys, values, ends, block_table=table, window=left, **options)
    else:
        cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen_q
        flat_q = q.reshape(batch * seqlen_q, *q.shape[2:])
        mask = dict(causal=causal, window=(left, right), **options)
        if cache_leftpad is None:  # paged prefill over the cache in place (a cache row is one page)
            if paged:
                table = block_table.int()
            else:
                rows = torch.arange(batch, device=device) if cache_batch_idx is None else cache_batch_idx
                table = rows.int().view(batch, 1)
            cu_seqlens_k = torch.nn.functional.pad(ends.cumsum(0, dtype=torch.int32), (1, 0))
            out, lse = attention_varlen(flat_q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, seqlen_q, capacity,
                                        block_table=table, **mask)
        else:
            if alibi_slopes is not None and alibi_slopes.dim() == 2:  # real sequence b is varlen sequence 2b + 1
                mask["alibi_slopes"] = torch.cat([alibi_slopes.repeat_interleave(2, 0), alibi_slopes[:1]])
            out, lse = _attention_over_rows(flat_q, cu_seqlens_q, seqlen_q,
                                            _cache_rows(k_cache, batch, cache_batch_idx, block_table),
                                            _cache_rows(v_cache, batch, cache_batch_idx, block_table),
                                            cache_leftpad.int(), ends, mask)
        out = out.view(q.shape)
        lse = lse.view(-1, batch, seqlen_q).transpose(0, 1).contiguous()
    return (out, lse) if return_softmax_lse else out


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """FA3's flash_attn_combine: merges num_splits attentions of the same queries over disjoint
    key sets (split-KV) by their log-sum-exp, with attnkit.merge_attention_states.

    out_partial (num_splits, batch, seqlen, heads, head_dim), lse_partial float32 (num_splits,
    batch, seqlen, heads), natural log. Returns (out (batch, seqlen, heads, head_dim) in
    out_dtype (default: out's dtype when given, else out_partial's), written into `out` when
    given; lse float32 (batch, seqlen, heads)). A row whose splits are all -inf gets 0, -inf.
    """
    _tensor(out_partial, "out_partial", 5, "(num_splits, batch, seqlen, heads, head_dim)")
    _tensor(lse_partial, "lse_partial", 4, "(num_splits, batch, seqlen, heads)")
    _require(out_partial.shape[0] >= 1 and out_partial.is_floating_point(),
             f"out_partial must be a floating tensor with num_splits >= 1, got {out_partial.dtype} of shape "
             f"{tuple(out_partial.shape)}")
    _require(lse_partial.dtype == torch.float32 and lse_partial.shape == out_partial.shape[:4],
             f"lse_partial must be float32 of shape {tuple(out_partial.shape[:4])}, got {lse_partial.dtype} of "
             f"shape {tuple(lse_partial.shape)}")
    merged, lse = out_partial[0], lse_partial[0].transpose(1, 2).contiguous()
    for split_out, split_lse in zip(out_partial[1:], lse_partial[1:]):
        merged, lse = merge_attention_states(merged, lse, split_out, split_lse.transpose(1, 2))
    if out is None:
        out = torch.empty(merged.shape, dtype=out_dtype or out_partial.dtype, device=merged.device)
    else:
        check_tensor(out, "out")
        _require(out.shape == merged.shape and out.dtype == (out_dtype or out.dtype) and out.device == merged.device,
                 f"out must have shape {tuple(merged.shape)}, dtype out_dtype ({out_dtype or out.dtype}) and device "
                 f"{merged.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out.copy_(merged), lse.transpose(1, 2)
