"""Sink tokens and ALiBi on the prefill paths (attention, attention_varlen, paged
attention_varlen, decode routed to it) and the flash_attn drop-in, forward and backward,
against the float64 reference, whose rules are restated independently here:
- sinks (FA3's sink_token_length, StreamingLLM): with a left window, keys j < n stay visible
  to a row when j is left of its window and not past its right bound;
- ALiBi (FlashAttention's alibi_slopes): logit(i, j) += -slope * |i + Sk - Sq - j|, after the
  softcap, slopes (heads,) or (batch, heads)."""
import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.compat import flash_attn as fa
from conftest import (FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cu_seqlens, devices_for, paged, randn,
                      skip_unsupported)

DEVICES = devices_for("attention")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = float("-inf")


def slopes_for(gen, heads, batch=None, device="cpu"):
    """ALiBi slopes: the geometric series of the ALiBi paper for `heads`, scaled by a random
    factor per (sequence,) head so that per-sequence slopes differ."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)
    shape = (heads,) if batch is None else (batch, heads)
    factor = 0.5 + torch.rand(*shape, generator=gen, dtype=torch.float64)
    return (base * factor).float().to(device)


def test_reference_restates_fa_definitions():
    """reference.mask with sinks and reference.alibi_bias equal element-by-element loops of
    the rules in the module docstring (an independent restatement of FA3 / FA2)."""
    for sq, sk, causal, window, sinks in [(7, 19, True, (4, 0), 3), (19, 7, False, (2, 3), 2), (10, 10, True, (0, 0), 20),
                                          (5, 30, False, (-1, 4), 6), (9, 25, True, (6, -1), 0)]:
        got = reference.mask(sq, sk, causal, window, sink_tokens=sinks)
        left, right = window[0], 0 if causal else window[1]
        for i in range(sq):
            d = i + sk - sq
            for j in range(sk):
                right_ok = right == -1 or j <= d + right
                left_ok = left == -1 or j >= d - left or j < sinks
                assert bool(got[i, j]) == (right_ok and left_ok), (sq, sk, causal, window, sinks, i, j)
    slopes = torch.tensor([0.5, 0.125])
    bias = reference.alibi_bias(3, 5, slopes)
    for h in range(2):
        for i in range(3):
            for j in range(5):
                assert bias[h, i, j].item() == -slopes[h].item() * abs(i + 5 - 3 - j)


def run_dense(gen, dtype, device, b, sq, sk, h, hkv, d, causal, window, softcap, sinks, alibi, grads=True):
    q = randn(gen, b, sq, h, d, dtype=dtype, device=device).requires_grad_(grads)
    k = randn(gen, b, sk, hkv, d, dtype=dtype, device=device).requires_grad_(grads)
    v = randn(gen, b, sk, hkv, d, dtype=dtype, device=device).requires_grad_(grads)
    slopes = None
    if alibi:
        slopes = slopes_for(gen, h, b if alibi == "batch" else None, device)
    opts = dict(causal=causal, window=window, softcap=softcap, sink_tokens=sinks)
    out, lse = attnkit.attention(q, k, v, alibi_slopes=slopes, return_lse=True, **opts)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = reference.attention(qr, kr, vr, alibi_slopes=None if slopes is None else slopes.cpu(), **opts)
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    if not grads:
        return
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, GRAD_TOL[dtype], name)


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap, sinks, alibi)
CASES = [
    (2, 150, 150, 4, 2, 64, True, (40, 0), 0.0, 4, None),       # StreamingLLM: sinks + causal left window
    (1, 70, 200, 2, 1, 64, True, (17, 0), 0.0, 70, None),       # sinks span several key tiles; MQA
    (2, 200, 90, 4, 4, 32, True, (10, 0), 0.0, 1, None),        # seqlen_q > seqlen_k: rows that see nothing
    (1, 130, 130, 2, 2, 64, False, (20, 15), 5.0, 9, None),     # two-sided window, softcap
    (1, 100, 100, 2, 1, 64, True, (-1, -1), 0.0, 7, None),      # no left window: sinks change nothing
    (1, 129, 129, 4, 2, 64, True, (-1, -1), 0.0, 0, "heads"),   # ALiBi causal
    (2, 65, 140, 4, 1, 128, False, (-1, -1), 0.0, 0, "batch"),  # ALiBi per sequence, non-causal
    (1, 90, 90, 2, 2, 64, True, (30, 0), 8.0, 3, "heads"),      # everything: sinks, window, softcap, ALiBi
]


def case_id(c):
    return (f"b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-w{c[7][0]},{c[7][1]}"
            f"-cap{c[8]:g}-sink{c[9]}-alibi{c[10]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dense(case, dtype, device, gen):
    skip_unsupported("attention", device, dtype)
    run_dense(gen, dtype, device, *case)


@pytest.mark.parametrize("device", DEVICES)
def test_random_sweep(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(11)
    for _ in range(12):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
        hkv = r(1, 2)
        run_dense(gen, dtype, device, r(1, 2), r(1, 160), r(1, 160), hkv * r(1, 3), hkv, [32, 64, 128][r(0, 2)],
                  bool(r(0, 1)), (r(-1, 50), r(-1, 50)), [0.0, 4.0][r(0, 1)], r(0, 80),
                  [None, "heads", "batch"][r(0, 2)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged_keys", [False, True], ids=["packed", "paged"])
def test_varlen(paged_keys, device, gen):
    """Per-sequence masks, sinks and (batch, heads) slopes over packed and paged keys."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    len_q, len_k, heads, kv_heads, d = [40, 1, 130, 0], [300, 50, 130, 20], 4, 2, 64
    slopes = slopes_for(gen, heads, len(len_q), device)
    opts = dict(causal=True, window=(25, 0), sink_tokens=5, softcap=0.0)
    q = randn(gen, sum(len_q), heads, d, dtype=dtype, device=device)
    cu_q, cu_k = cu_seqlens(len_q, device), cu_seqlens(len_k, device)
    if paged_keys:
        k, v, table, _ = paged(gen, len_k, 16, kv_heads, d, dtype, device)
    else:
        k = randn(gen, sum(len_k), kv_heads, d, dtype=dtype, device=device)
        v = randn(gen, sum(len_k), kv_heads, d, dtype=dtype, device=device)
        table = None
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max(len_q), max(len_k), block_table=table,
                                        alibi_slopes=slopes, return_lse=True, **opts)
    ref, ref_lse = reference.attention_varlen(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu_q.cpu(),
                                              cu_k.cpu(), block_table=None if table is None else table.cpu(),
                                              alibi_slopes=slopes.cpu(), **opts)
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [1, 4, 40])
def test_decode_with_sinks_and_alibi(seqlen_q, device, gen):
    """decode() with sinks or ALiBi (any number of queries) runs on the paged prefill kernels
    and equals the reference decode."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [300, 41 + seqlen_q]
    k, v, table, seqlens = paged(gen, lens, 16, 2, 64, dtype, device)
    q = randn(gen, 2, seqlen_q, 8, 64, dtype=dtype, device=device)
    slopes = slopes_for(gen, 8, None, device)
    for opts in (dict(window=30, sink_tokens=4), dict(alibi_slopes=slopes), dict(window=20, sink_tokens=2,
                                                                               alibi_slopes=slopes)):
        out, lse = attnkit.decode(q, k, v, seqlens, block_table=table, return_lse=True, **opts)
        ref_opts = dict(opts, alibi_slopes=slopes.cpu()) if "alibi_slopes" in opts else opts
        ref, ref_lse = reference.decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), seqlens.cpu(),
                                        block_table=table.cpu(), **ref_opts)
        assert_close(out, ref, FWD_TOL[dtype], f"out {sorted(opts)}")
        assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


def test_decode_quantized_with_sinks_and_alibi(gen):
    """decode on a quantized cache with sinks and ALiBi (routed to the paged prefill) equals
    the reference over the dequantized cache."""
    k = attnkit.quantize_kv(torch.randn(4, 16, 2, 64, generator=gen), "int8")
    v = attnkit.quantize_kv(torch.randn(4, 16, 2, 64, generator=gen), "int8")
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    q = torch.randn(1, 2, 4, 64, generator=gen)
    lens = torch.tensor([60], dtype=torch.int32)
    slopes = torch.rand(4, generator=gen)
    out = attnkit.decode(q, k, v, lens, block_table=table, window=8, sink_tokens=2, alibi_slopes=slopes)
    ref, _ = reference.decode(q.double(), attnkit.dequantize_kv(k).double(), attnkit.dequantize_kv(v).double(), lens,
                              block_table=table, window=8, sink_tokens=2, alibi_slopes=slopes)
    assert_close(out, ref, FWD_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_alibi(device, gen):
    """flash_attn_func / varlen / with_kvcache take alibi_slopes (FA's (heads,) or (batch,
    heads) float32); out equals the reference, and the gradient flows to q, k, v."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s, h, d = 2, 77, 4, 64
    q = randn(gen, b, s, h, d, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, b, s, 2, d, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, b, s, 2, d, dtype=dtype, device=device).requires_grad_()
    slopes = slopes_for(gen, h, b, device)
    out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qr, kr, vr, causal=True, alibi_slopes=slopes.cpu())
    assert_close(out, ref, FWD_TOL[dtype], "flash_attn_func out")
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    for name, g, w in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())):
        assert_close(g, w, GRAD_TOL[dtype], name)

    # with_kvcache: 1 query (decode), 20 queries (paged prefill) and cache_leftpad (rows path).
    cache_k = randn(gen, b, 128, 2, d, dtype=dtype, device=device)
    cache_v = randn(gen, b, 128, 2, d, dtype=dtype, device=device)
    seqlens = torch.tensor([90, 37], dtype=torch.int32, device=device)
    for seqlen_q, leftpad in ((1, None), (20, None), (5, torch.tensor([3, 0], dtype=torch.int32, device=device))):
        qn = randn(gen, b, seqlen_q, h, d, dtype=dtype, device=device)
        got = fa.flash_attn_with_kvcache(qn, cache_k, cache_v, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                         causal=True, alibi_slopes=slopes)
        for i in range(b):
            first = 0 if leftpad is None else int(leftpad[i])
            end = int(seqlens[i])
            want, _ = reference.attention(qn[i:i + 1].cpu().double(), cache_k[i:i + 1, first:end].cpu().double(),
                                          cache_v[i:i + 1, first:end].cpu().double(), causal=True,
                                          alibi_slopes=slopes[i].cpu())
            assert_close(got[i:i + 1], want, FWD_TOL[dtype], f"with_kvcache q{seqlen_q} leftpad {leftpad} seq {i}")


def test_bad_input(gen):
    q = torch.randn(1, 8, 4, 32, generator=gen)
    k = torch.randn(1, 8, 2, 32, generator=gen)
    with pytest.raises(ValueError, match="sink_tokens"):
        attnkit.attention(q, k, k, window=(4, 0), sink_tokens=-1)
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        attnkit.attention(q, k, k, alibi_slopes=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(heads,\)"):
        attnkit.attention(q, k, k, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        torch.ops.attnkit.attention_fwd(q, k, k, None, None, 0, 0, False, 0.1, -1, -1, 0.0, 0, torch.ones(3, 4))
    with pytest.raises(ValueError, match="sink_tokens must be >= 0"):
        torch.ops.attnkit.attention_fwd(q, k, k, None, None, 0, 0, False, 0.1, 4, 0, 0.0, -2, None)


def test_opcheck_and_compile(gen):
    q = torch.randn(2, 20, 4, 32, generator=gen)
    k = torch.randn(2, 33, 2, 32, generator=gen)
    v = torch.randn(2, 33, 2, 32, generator=gen)
    slopes = torch.rand(2, 4, generator=gen)
    args = (q, k, v, None, None, 0, 0, True, 0.2, 6, 0, 0.0, 3, slopes)
    torch.library.opcheck(torch.ops.attnkit.attention_fwd.default, args)
    out, lse = torch.ops.attnkit.attention_fwd(*args)
    bwd = (torch.randn_like(out), q, k, v, out, lse, None, None, 0, 0, True, 0.2, 6, 0, 0.0, None, 3, slopes)
    torch.library.opcheck(torch.ops.attnkit.attention_bwd.default, bwd)

    def f(q, k, v, slopes):
        return attnkit.attention(q, k, v, causal=True, window=(6, 0), sink_tokens=3, alibi_slopes=slopes)

    qg = q.clone().requires_grad_()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(qg, k, v, slopes)
    want = f(q, k, v, slopes)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
