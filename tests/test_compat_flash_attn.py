"""attnkit.compat.flash_attn against FlashAttention 2.8.3's semantics, restated here on the
float64 oracle (attnkit.reference): the parameter lists of flash-attn 2.8.3 (hard-coded from
its sdist); flash_attn_func and the packed / varlen / paged-varlen variants (bottom-right
causal, windows, softcap, GQA, odd and empty lengths; forward, lse and gradients);
flash_attn_with_kvcache (append into contiguous and paged caches with shuffled tables and
page sizes 1 / 3 / 16, cache_batch_idx, cache_leftpad, rotary in both layouts, 1 to 20
queries, poisoned unused cache entries, the cache written at exactly the right slots and
nothing else, the kernel each case runs, torch.compile); flash_attn_combine; unsupported
and bad arguments; the example examples/flash_attn_training_step.py."""
import inspect
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from attnkit import reference
from attnkit.compat import flash_attn as fa
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cu_seqlens, devices_for, randn, skip_unsupported

DEVICES = devices_for("attention")
ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAD_DIM = 64  # a head_dim every backend takes

# flash-attn 2.8.3, flash_attn/flash_attn_interface.py: (name, default) of each parameter;
# REQUIRED marks one without a default.
REQUIRED = object()
_OPTIONS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
            ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_VARLEN = [("cu_seqlens_q", REQUIRED), ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED),
           ("max_seqlen_k", REQUIRED)]
FA_SIGNATURES = {
    "flash_attn_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED)] + _OPTIONS,
    "flash_attn_qkvpacked_func": [("qkv", REQUIRED)] + _OPTIONS,
    "flash_attn_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED)] + _OPTIONS,
    "flash_attn_varlen_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED)] + _VARLEN + _OPTIONS
    + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", REQUIRED), ("cu_seqlens", REQUIRED), ("max_seqlen", REQUIRED)]
    + _OPTIONS,
    "flash_attn_varlen_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED)] + _VARLEN + _OPTIONS,
    "flash_attn_with_kvcache": [
        ("q", REQUIRED), ("k_cache", REQUIRED), ("v_cache", REQUIRED), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False)],
}
# Ours beyond FA 2.8's list: keyword-only FA3 names.
EXTRA_KEYWORDS = {"flash_attn_with_kvcache": ["page_table"]}


@pytest.mark.parametrize("name", sorted(FA_SIGNATURES))
def test_signature_is_flash_attn_2_8_3(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    got = [(p.name, REQUIRED if p.default is p.empty else p.default) for p in positional]
    assert got == FA_SIGNATURES[name]
    assert [p.name for p in params if p.kind == p.KEYWORD_ONLY] == EXTRA_KEYWORDS.get(name, [])
    assert len(positional) + len(EXTRA_KEYWORDS.get(name, [])) == len(params)


# ---------------------------------------------------------------- FA's semantics, restated

def fa_window(causal, window_size, seqlen_k):
    """FlashAttention's mask arguments as reference.attention's (flash_api.cpp): a bound < 0
    or >= seqlen_k is unbounded, and causal sets the right bound to 0."""
    left, right = (-1 if w < 0 or w >= seqlen_k else w for w in window_size)
    return dict(causal=causal, window=(left, 0 if causal else right))


def reference_grads(fn, inputs, grad_out):
    """Gradients of sum(fn(inputs) * grad_out) by autograd through the float64 reference."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    (fn(*leaves) * grad_out.double()).sum().backward()
    return [t.grad for t in leaves]


def rotate_reference(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, heads, head_dim) rotated in float64 at rows `positions` (batch, seqlen)
    of cos / sin: pairs of channels (2i, 2i + 1) as complex numbers times e^(i theta)
    (interleaved, GPT-J), or x * cos + rotate_half(x) * sin on the first rotary_dim channels
    (GPT-NeoX)."""
    x = x.double()
    rd = 2 * cos.shape[1]
    c, s = cos.double()[positions].unsqueeze(2), sin.double()[positions].unsqueeze(2)
    head = x[..., :rd]
    if interleaved:
        pairs = torch.view_as_complex(head.unflatten(-1, (-1, 2)).contiguous())
        head = torch.view_as_real(pairs * torch.complex(c, s)).flatten(-2)
    else:
        half = rd // 2
        rotate_half = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
        head = head * torch.cat([c, c], -1) + rotate_half * torch.cat([s, s], -1)
    return torch.cat([head, x[..., rd:]], dim=-1)


# ---------------------------------------------------------------- dense and varlen functions

DENSE_CASES = {  # (batch, seqlen_q, seqlen_k, heads, kv_heads, causal, window_size, softcap, softmax_scale)
    "full": (2, 7, 11, 4, 2, False, (-1, -1), 0.0, None),
    "causal-q>k": (2, 13, 5, 4, 1, True, (-1, -1), 0.0, 0.3),
    "causal-window": (1, 9, 17, 2, 2, True, (4, 3), 0.0, None),
    "window-both": (2, 10, 10, 4, 2, False, (3, 2), 5.0, None),
    "window-clamped": (1, 12, 6, 2, 1, False, (-1, 7), 0.0, None),  # right >= seqlen_k: unbounded
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_func_forward_and_backward(gen, device, dtype, case):
    skip_unsupported("attention", device, dtype)
    batch, sq, sk, h, hk, causal, window_size, softcap, scale = DENSE_CASES[case]
    q = randn(gen, batch, sq, h, HEAD_DIM, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, batch, sk, hk, HEAD_DIM, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, batch, sk, hk, HEAD_DIM, dtype=dtype, device=device).requires_grad_()
    out, lse, probs = fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window_size,
                                         softcap=softcap, return_attn_probs=True)
    opts = dict(fa_window(causal, window_size, sk), scale=scale, softcap=softcap)
    ref, ref_lse = reference.attention(q.detach(), k.detach(), v.detach(), **opts)
    assert probs is None and lse.shape == (batch, h, sq)
    assert_close(out, ref, FWD_TOL[dtype])
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    out.backward(dout)
    want = reference_grads(lambda *t: reference.attention(*t, **opts)[0], (q, k, v), dout)
    for got, ref_grad, name in zip((q.grad, k.grad, v.grad), want, "qkv"):
        assert_close(got, ref_grad, GRAD_TOL[dtype], f"d{name}")


def test_packed_funcs_equal_unpacked(gen):
    qkv = randn(gen, 2, 9, 3, 4, HEAD_DIM).requires_grad_()
    q, k, v = qkv.unbind(2)
    opts = dict(causal=True, window_size=(3, -1), softcap=2.0)
    want = fa.flash_attn_func(q, k, v, **opts)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(qkv, **opts), want, rtol=0, atol=0)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, qkv[:, :, 1:], **opts), want, rtol=0, atol=0)
    fa.flash_attn_qkvpacked_func(qkv, **opts).sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad[:, :, 2].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (2, 1)), (True, (5, 9))])
def test_varlen_forward_and_backward(gen, device, dtype, causal, window_size):
    skip_unsupported("attention", device, dtype)
    lens_q, lens_k = [3, 0, 7, 1], [5, 4, 7, 0]
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    q = randn(gen, sum(lens_q), 4, HEAD_DIM, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, sum(lens_k), 2, HEAD_DIM, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, sum(lens_k), 2, HEAD_DIM, dtype=dtype, device=device).requires_grad_()
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                            window_size=window_size, return_attn_probs=True)
    opts = fa_window(causal, window_size, max(lens_k))
    ref, ref_lse = reference.attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k, **opts)
    assert lse.shape == (4, sum(lens_q))
    assert_close(out, ref, FWD_TOL[dtype])
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    out.backward(dout)
    want = reference_grads(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, **opts)[0], (q, k, v), dout)
    for got, ref_grad, name in zip((q.grad, k.grad, v.grad), want, "qkv"):
        assert_close(got, ref_grad, GRAD_TOL[dtype], f"d{name}")


def test_varlen_packed_funcs_equal_unpacked(gen):
    lens = [4, 1, 6]
    cu = cu_seqlens(lens)
    qkv = randn(gen, sum(lens), 3, 2, HEAD_DIM)
    q, k, v = qkv.unbind(1)
    want = fa.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, causal=True), want, rtol=0, atol=0)
    got = fa.flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu, cu, 6, 6, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def pages_of(gen, keys, values, lens, page_size, spare_pages=4):
    """keys, values (batch, >= max(lens), kv_heads, head_dim) laid into NaN-filled pages
    through a shuffled table whose entries past a sequence's pages are -1:
    (k_pages, v_pages, table)."""
    batch, width = keys.shape[0], max(-(-n // page_size) for n in lens)
    num_pages = batch * width + spare_pages
    table = torch.randperm(num_pages, generator=gen)[:batch * width].view(batch, width).int()
    k_pages = torch.full((num_pages, page_size, *keys.shape[2:]), float("nan"), dtype=keys.dtype)
    v_pages = k_pages.clone()
    for b, n in enumerate(lens):
        for t in range(n):
            k_pages[table[b, t // page_size], t % page_size] = keys[b, t]
            v_pages[table[b, t // page_size], t % page_size] = values[b, t]
        table[b, -(-n // page_size):] = -1
    return k_pages, v_pages, table


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_varlen_paged_forward_and_backward(gen, page_size):
    lens_q, lens_k = [2, 5, 1], [7, 20, 0]
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    dense_k, dense_v = randn(gen, 3, 20, 2, HEAD_DIM), randn(gen, 3, 20, 2, HEAD_DIM)
    k_pages, v_pages, table = pages_of(gen, dense_k, dense_v, lens_k, page_size)
    q = randn(gen, sum(lens_q), 4, HEAD_DIM).requires_grad_()
    k_pages.requires_grad_()
    out, lse, _ = fa.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 5, 20, causal=True, block_table=table,
                                            return_attn_probs=True)
    packed_k = torch.cat([dense_k[b, :n] for b, n in enumerate(lens_k)])
    packed_v = torch.cat([dense_v[b, :n] for b, n in enumerate(lens_k)])
    ref, ref_lse = reference.attention_varlen(q.detach(), packed_k, packed_v, cu_q, cu_k, causal=True)
    assert_close(out, ref, FWD_TOL[torch.float32])
    assert_lse_close(lse, ref_lse, FWD_TOL[torch.float32])
    dout = randn(gen, *out.shape)
    out.backward(dout)
    dq, dk, _ = reference_grads(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, causal=True)[0],
                                (q, packed_k, packed_v), dout)
    assert_close(q.grad, dq, GRAD_TOL[torch.float32], "dq")
    want = torch.zeros(k_pages.shape, dtype=torch.float64)  # slots no sequence holds get 0
    rows = [(b, t) for b, n in enumerate(lens_k) for t in range(n)]
    for i, (b, t) in enumerate(rows):
        want[table[b, t // page_size], t % page_size] = dk[i]
    assert_close(k_pages.grad, want, GRAD_TOL[torch.float32], "dk pages")


# ---------------------------------------------------------------- flash_attn_with_kvcache

KV_CASES = {
    # name: (options, the attnkit op it runs)
    "decode-1q": (dict(sq=1, new=1, causal=True), "decode"),
    "decode-4q-window": (dict(sq=4, new=4, causal=True, window=(5, -1)), "decode"),
    "decode-noncausal-1q-window": (dict(sq=1, new=1, window=(3, 2)), "decode"),
    "decode-window-right0": (dict(sq=3, new=2, window=(-1, 0)), "decode"),
    "decode-no-append": (dict(sq=2, new=0, causal=True), "decode"),
    "decode-batch-idx": (dict(sq=2, new=2, causal=True, batch_idx=True), "decode"),
    "decode-rotary-gptj": (dict(sq=2, new=2, causal=True, rotary=(32, True)), "decode"),
    "decode-paged-1": (dict(sq=3, new=3, causal=True, page_size=1), "decode"),
    "decode-paged-3-rotary-neox": (dict(sq=1, new=2, causal=True, page_size=3, rotary=(64, False)), "decode"),
    "decode-paged-16-softcap": (dict(sq=16, new=5, causal=True, page_size=16, softcap=3.0), "decode"),
    "decode-seqlens-int": (dict(sq=1, new=1, causal=True, seqlens="int"), "decode"),
    "varlen-noncausal": (dict(sq=5, new=2), "varlen"),
    "varlen-noncausal-rotary": (dict(sq=3, new=3, rotary=(32, False)), "varlen"),
    "varlen-right-window": (dict(sq=3, new=3, window=(4, 2), rotary=(64, True)), "varlen"),
    "varlen-20q": (dict(sq=20, new=20, causal=True), "varlen"),
    "varlen-leftpad": (dict(sq=2, new=1, causal=True, leftpad=True), "varlen"),
    "varlen-leftpad-batch-idx": (dict(sq=1, new=1, causal=True, leftpad=True, batch_idx=True), "varlen"),
    "varlen-paged-3-leftpad-window": (dict(sq=4, new=2, causal=True, page_size=3, leftpad=True, window=(6, -1)),
                                      "varlen"),
    "varlen-paged-16-noncausal": (dict(sq=2, new=0, page_size=16, seqlens="none"), "varlen"),
}
SEQLEN_CACHE = 41  # contiguous caches; paged ones round it up to whole pages


def kvcache_reference(q, k_cache, v_cache, k, v, lens, batch_idx, leftpad, table, rotary, causal, window_size,
                      softcap, capacity):
    """FlashAttention's flash_attn_with_kvcache in float64 -> (out, lse, k_cache and v_cache
    after, the slots written): the new keys (rotated at cache_seqlens + i) and values written
    at positions cache_seqlens + i of each sequence's cache row (cache_batch_idx) or pages
    (block_table); q rotated at those positions when causal or windowed, else all at
    cache_seqlens; then attention of q over positions [cache_leftpad, cache_seqlens +
    seqlen_new) with FA's bottom-right masks (bounds >= the capacity are unbounded)."""
    batch, sq = q.shape[:2]
    new = 0 if k is None else k.shape[1]
    mask_opts = fa_window(causal, window_size, capacity)
    kc, vc, q = k_cache.double().clone(), v_cache.double().clone(), q.double()
    written = torch.zeros(kc.shape[:2], dtype=torch.bool)
    if rotary is not None:
        cos, sin, interleaved = rotary
        steps = torch.arange(sq) if max(mask_opts["window"]) >= 0 else torch.zeros(sq, dtype=torch.long)
        q = rotate_reference(q, cos, sin, lens.long()[:, None] + steps, interleaved)
        k = rotate_reference(k, cos, sin, lens.long()[:, None] + torch.arange(new), interleaved)

    def slot(b, t):
        if table is not None:
            return int(table[b, t // kc.shape[1]]), t % kc.shape[1]
        return (b if batch_idx is None else int(batch_idx[b])), t

    outs, lses = [], []
    for b in range(batch):
        length = int(lens[b])
        for i in range(new):
            kc[slot(b, length + i)], vc[slot(b, length + i)] = k[b, i].double(), v[b, i].double()
            written[slot(b, length + i)] = True
        visible = [slot(b, t) for t in range(0 if leftpad is None else int(leftpad[b]), length + new)]
        keys = torch.stack([kc[s] for s in visible]) if visible else kc.new_zeros(0, *kc.shape[2:])
        vals = torch.stack([vc[s] for s in visible]) if visible else vc.new_zeros(0, *vc.shape[2:])
        out, lse = reference.attention(q[b:b + 1], keys[None], vals[None], softcap=softcap, **mask_opts)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), kc, vc, written


def make_kvcache_inputs(gen, case, dtype, device):
    """Random inputs of a KV_CASES case: batch 3, GQA 4:2; the caches hold NaN wherever no
    sequence holds a visible token (rows past the batch, slots before cache_leftpad or past a
    length, spare pages); table entries past a sequence's pages (after the append) are -1."""
    batch, heads, kv_heads, page_size = 3, 4, 2, case.get("page_size")
    sq, new = case["sq"], case["new"]
    capacity = SEQLEN_CACHE if page_size is None else -(-SEQLEN_CACHE // page_size) * page_size
    lens = torch.randint(0, capacity - new + 1, (batch,), generator=gen, dtype=torch.int32)
    lens[0] = capacity - new  # one sequence fills its cache exactly
    lens[:] = {"int": lens[1], "none": capacity}.get(case.get("seqlens"), lens)
    leftpad = (torch.rand(batch, generator=gen) * (lens + 1)).int().clamp(max=lens) if case.get("leftpad") else None
    rows = batch + 2 if case.get("batch_idx") else batch
    batch_idx = torch.randperm(rows, generator=gen)[:batch].int() if case.get("batch_idx") else None
    dense_k = randn(gen, rows, capacity, kv_heads, HEAD_DIM, dtype=dtype)
    dense_v = randn(gen, rows, capacity, kv_heads, HEAD_DIM, dtype=dtype)
    owner = list(range(batch)) if batch_idx is None else batch_idx.tolist()
    for r in range(rows):  # poison what no sequence sees
        b = owner.index(r) if r in owner else None
        start, end = (0, 0) if b is None else (0 if leftpad is None else int(leftpad[b]), int(lens[b]))
        dense_k[r, :start] = dense_v[r, :start] = dense_k[r, end:] = dense_v[r, end:] = float("nan")
    table = None
    if page_size is None:
        k_cache, v_cache = dense_k, dense_v
    else:
        k_cache, v_cache, table = pages_of(gen, dense_k, dense_v, [capacity] * batch, page_size)
        for b in range(batch):
            table[b, -(-(int(lens[b]) + new) // page_size):] = -1
    rotary = None
    if "rotary" in case:
        rotary_dim, interleaved = case["rotary"]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        angles = torch.arange(capacity + 8, dtype=torch.float64)[:, None] * inv_freq
        rotary = (angles.cos().to(dtype), angles.sin().to(dtype), interleaved)
    new_rows = [randn(gen, batch, new, kv_heads, HEAD_DIM, dtype=dtype) if new else None for _ in "kv"]
    return dict(q=randn(gen, batch, sq, heads, HEAD_DIM, dtype=dtype), k_cache=k_cache, v_cache=v_cache,
                k=new_rows[0], v=new_rows[1], lens=lens, batch_idx=batch_idx, leftpad=leftpad, table=table,
                rotary=rotary, capacity=capacity)


def spy(monkeypatch):
    """Records which attnkit op ("decode" / "varlen") flash_attn_with_kvcache calls."""
    calls = []
    for name, tag in (("decode", "decode"), ("attention_varlen", "varlen")):
        real = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _real=real, _tag=tag, **kw: calls.append(_tag) or _real(*a, **kw))
    return calls


def bits(t):
    """t's bit patterns (NaN-safe exact comparison)."""
    return t.cpu().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(KV_CASES))
def test_with_kvcache(gen, monkeypatch, device, dtype, name):
    skip_unsupported("attention", device, dtype)
    case, path = KV_CASES[name]
    x = make_kvcache_inputs(gen, case, dtype, device)
    lens, rotary = x["lens"], x["rotary"]

    def to(t):
        return None if t is None else t.to(device)

    causal, window_size, softcap = case.get("causal", False), case.get("window", (-1, -1)), case.get("softcap", 0.0)
    seqlens = {"int": int(lens[0]), "none": None}.get(case.get("seqlens"), to(lens))
    k_cache, v_cache = to(x["k_cache"]), to(x["v_cache"])
    calls = spy(monkeypatch)
    out, lse = fa.flash_attn_with_kvcache(
        to(x["q"]), k_cache, v_cache, to(x["k"]), to(x["v"]), rotary_cos=to(rotary and rotary[0]),
        rotary_sin=to(rotary and rotary[1]), cache_seqlens=seqlens, cache_batch_idx=to(x["batch_idx"]),
        cache_leftpad=to(x["leftpad"]), block_table=to(x["table"]), causal=causal, window_size=window_size,
        softcap=softcap, rotary_interleaved=bool(rotary and rotary[2]), return_softmax_lse=True)
    assert calls == [path]
    ref, ref_lse, ref_k, ref_v, written = kvcache_reference(
        x["q"], x["k_cache"], x["v_cache"], x["k"], x["v"], lens, x["batch_idx"], x["leftpad"], x["table"], rotary,
        causal, window_size, softcap, x["capacity"])
    assert out.shape == x["q"].shape and out.dtype == dtype and lse.shape == (3, 4, case["sq"])
    assert_close(out, ref, FWD_TOL[dtype])
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    for got, before, want, what in ((k_cache, x["k_cache"], ref_k, "k_cache"),
                                    (v_cache, x["v_cache"], ref_v, "v_cache")):
        assert torch.equal(bits(got[~written]), bits(before[~written])), f"{what}: a slot outside the append changed"
        if rotary and what == "k_cache":
            assert_close(got[written], want[written], FWD_TOL[dtype], "rotated keys written")
        else:
            assert torch.equal(got[written].cpu(), want[written].to(dtype)), f"{what}: appended rows differ"


def test_with_kvcache_defaults_to_full_cache_and_output_only(gen):
    k_cache, v_cache = randn(gen, 2, 9, 1, HEAD_DIM), randn(gen, 2, 9, 1, HEAD_DIM)
    q = randn(gen, 2, 3, 2, HEAD_DIM)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache)
    assert_close(out, reference.attention(q, k_cache, v_cache)[0], FWD_TOL[torch.float32])


def test_with_kvcache_page_table_alias(gen):
    x = make_kvcache_inputs(gen, dict(sq=1, new=1, page_size=3), torch.float32, "cpu")
    args = (x["q"], x["k_cache"].clone(), x["v_cache"].clone(), x["k"], x["v"])
    want = fa.flash_attn_with_kvcache(*args, cache_seqlens=x["lens"], block_table=x["table"])
    args = (x["q"], x["k_cache"].clone(), x["v_cache"].clone(), x["k"], x["v"])
    torch.testing.assert_close(fa.flash_attn_with_kvcache(*args, cache_seqlens=x["lens"], page_table=x["table"]),
                               want, rtol=0, atol=0)


@pytest.mark.parametrize("case", [dict(sq=1, new=1, causal=True, page_size=3), dict(sq=3, new=2, leftpad=True)])
def test_with_kvcache_compiles(gen, case):
    """fullgraph: no graph break, the cache writes kept as input mutations (aot_eager: dynamo,
    fake kernels and functionalization without inductor's C++ build)."""
    x = make_kvcache_inputs(gen, case, torch.float32, "cpu")

    def step(q, k_cache, v_cache, k, v, lens, leftpad, table):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, cache_leftpad=leftpad,
                                          block_table=table, causal=True, return_softmax_lse=True)

    inputs = [x[n] for n in ("q", "k_cache", "v_cache", "k", "v", "lens", "leftpad", "table")]
    eager_caches = [t.clone() for t in inputs[1:3]]
    want = step(inputs[0], *eager_caches, *inputs[3:])
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    for g, w in zip(got + tuple(inputs[1:3]), want + tuple(eager_caches)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- flash_attn_combine

def test_combine_matches_float64_logsumexp(gen):
    splits, batch, seqlen, heads = 5, 2, 3, 4
    out_partial = randn(gen, splits, batch, seqlen, heads, HEAD_DIM)
    lse_partial = randn(gen, splits, batch, seqlen, heads) * 3
    lse_partial[2:, 0] = float("-inf")  # splits with no key for batch 0
    lse_partial[:, 1, 0] = float("-inf")  # a row no split saw
    lse64 = torch.logsumexp(lse_partial.double(), dim=0)
    weights = torch.nan_to_num(torch.exp(lse_partial.double() - lse64), nan=0.0)
    want = (weights.unsqueeze(-1) * out_partial.double()).sum(0)
    out, lse = fa.flash_attn_combine(out_partial, lse_partial, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and lse.shape == (batch, seqlen, heads)
    assert_close(out, want, FWD_TOL[torch.bfloat16])
    assert_lse_close(lse, lse64, FWD_TOL[torch.float32])
    into = torch.empty(batch, seqlen, heads, HEAD_DIM)
    got, _ = fa.flash_attn_combine(out_partial, lse_partial, out=into)
    assert got is into
    assert_close(into, want, FWD_TOL[torch.float32])
    single, single_lse = fa.flash_attn_combine(out_partial[:1], lse_partial[:1])
    assert torch.equal(single, out_partial[0]) and torch.equal(single_lse, lse_partial[0])


# ---------------------------------------------------------------- unsupported and bad input

def test_unsupported_arguments_raise_not_implemented(gen):
    q = randn(gen, 1, 4, 2, HEAD_DIM)
    cu = cu_seqlens([4])
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, 0.5)
    # alibi_slopes is supported (tests/test_sinks_alibi.py); a wrong shape is a ValueError.
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        fa.flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        fa.flash_attn_with_kvcache(q, q, q, alibi_slopes=torch.ones(2, dtype=torch.float64))


BAD = {
    "dropout_p": lambda q, c: fa.flash_attn_func(q, q, q, dropout_p=-0.1),
    "window_size": lambda q, c: fa.flash_attn_func(q, q, q, window_size=(2,)),
    "softcap": lambda q, c: fa.flash_attn_func(q, q, q, softcap="big"),
    "softmax_scale": lambda q, c: fa.flash_attn_func(q, q, q, softmax_scale=float("nan")),
    "cu_seqlens_k\\[0 \\+ 1\\]": lambda q, c: fa.flash_attn_varlen_func(q[0], q, q, c, torch.tensor([0, 9]).int(), 4, 9,
                                                                       block_table=torch.zeros(1, 1).int()),
    "qkv": lambda q, c: fa.flash_attn_qkvpacked_func(torch.stack([q, q], 2)),
    "max_seqlen_k": lambda q, c: fa.flash_attn_varlen_func(q[0], q[0], q[0], c, c, 4, -1),
    "block_table": lambda q, c: fa.flash_attn_varlen_func(q[0], q, q, c, c, 4, 4, block_table=torch.zeros(2, 1)),
    "cache_batch_idx": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, cache_batch_idx=torch.zeros(1).int(),
                                                               block_table=torch.zeros(1, 1).int()),
    "cache_seqlens": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, q[:, :1, :2], q[:, :1, :2]),
    "k and v": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, k=q),
    "rotary_sin": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, q[:, :1], q[:, :1], torch.ones(8, 4),
                                                          cache_seqlens=1),
    "rotary_cos": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, q[:, :1], q[:, :1], torch.ones(2, 4),
                                                          torch.ones(2, 4), cache_seqlens=1),
    "cache_seqlens\\[0\\] \\+ seqlen_new": lambda q, c: fa.flash_attn_with_kvcache(q, q.clone(), q.clone(), q[:, :1],
                                                                                  q[:, :1], cache_seqlens=4),
    "cache_leftpad\\[0\\]": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, cache_seqlens=2,
                                                                   cache_leftpad=torch.tensor([3], dtype=torch.int32)),
    "page_table": lambda q, c: fa.flash_attn_with_kvcache(q, q, q, block_table=torch.zeros(1, 1, dtype=torch.int32),
                                                          page_table=torch.zeros(1, 1, dtype=torch.int32)),
    "block_table\\[0\\]": lambda q, c: fa.flash_attn_with_kvcache(q[:, :1], q, q, cache_seqlens=6,
                                                                 block_table=torch.tensor([[0, 7]], dtype=torch.int32)),
    "lse_partial": lambda q, c: fa.flash_attn_combine(q[None], q[None, ..., 0].double()),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_input_raises_value_error_naming_it(gen, what):
    q = randn(gen, 1, 4, 2, HEAD_DIM)
    with pytest.raises(ValueError, match=what):
        BAD[what](q, cu_seqlens([4]))


# ---------------------------------------------------------------- the example

def test_training_step_example_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "flash_attn_training_step.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flash_attn training step:"), run.stdout
    before, after = (float(x) for x in lines[0].split("loss ")[1].split(" -> "))
    assert math.isfinite(before) and after < before
