"""attnkit.attention / attention_varlen against the float64 reference: forward out and LSE,
gradients dq, dk, dv, masks (bottom-right causal, windows), softcap, GQA, odd lengths and
head dims, fully masked rows, varlen with empty sequences, strided inputs, opcheck,
torch.compile and bad input."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import (FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cu_seqlens, devices_for, randn,
                      skip_unsupported)

DEVICES = devices_for("attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
CASES = [
    (1, 1, 1, 1, 1, 16, False, (-1, -1), 0.0),
    (2, 33, 33, 4, 4, 64, False, (-1, -1), 0.0),
    (2, 100, 100, 4, 1, 64, True, (-1, -1), 0.0),      # MQA 4:1
    (1, 65, 130, 6, 2, 40, True, (-1, -1), 0.0),       # seqlen_q < seqlen_k, bottom-right causal, head_dim 40
    (1, 130, 65, 4, 2, 32, True, (-1, -1), 0.0),       # seqlen_q > seqlen_k: 65 leading rows see nothing
    (3, 77, 91, 2, 2, 128, False, (20, -1), 0.0),      # left window only
    (1, 70, 70, 2, 1, 64, False, (-1, 5), 0.0),        # right window only
    (2, 129, 129, 4, 2, 64, True, (31, 0), 30.0),      # causal + window + softcap + GQA
    (1, 64, 200, 2, 2, 80, False, (9, 3), 2.0),        # both windows, strong softcap
    (2, 7, 1, 4, 2, 16, True, (-1, -1), 0.0),          # one key: 6 masked rows, dq exactly 0 elsewhere
    (1, 100, 33, 4, 1, 96, False, (4, 0), 5.0),        # Sq > Sk with window and softcap: masked leading rows
    (1, 33, 47, 2, 1, 256, True, (-1, -1), 0.0),       # head_dim 256
]


def case_id(c):
    b, sq, sk, h, hkv, d, causal, (wl, wr), cap = c
    return f"b{b}-q{sq}-k{sk}-h{h}:{hkv}-d{d}{'-causal' if causal else ''}-w{wl},{wr}-cap{cap:g}"


def run_case(case, dtype, device, gen, grads=True, scale=None):
    b, sq, sk, h, hkv, d, causal, window, softcap = case
    opts = dict(causal=causal, window=window, softcap=softcap, scale=scale)
    q = randn(gen, b, sq, h, d, dtype=dtype, device=device).requires_grad_(grads)
    k = randn(gen, b, sk, hkv, d, dtype=dtype, device=device).requires_grad_(grads)
    v = randn(gen, b, sk, hkv, d, dtype=dtype, device=device).requires_grad_(grads)
    out, lse = attnkit.attention(q, k, v, return_lse=True, **opts)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = reference.attention(qr, kr, vr, **opts)

    assert out.dtype == dtype and out.device == q.device and out.shape == q.shape
    assert lse.shape == (b, h, sq) and lse.device == q.device
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    empty_rows = (ref_lse == NEG_INF).transpose(1, 2)  # (b, sq, h)
    assert (out.detach().cpu()[empty_rows] == 0).all(), "rows that see no key must be exactly 0"
    if grads:
        dout = randn(gen, *out.shape, dtype=dtype, device=device)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())
        for name, got, want, t in (("dq", dq, rq, q), ("dk", dk, rk, k), ("dv", dv, rv, v)):
            assert got.dtype == t.dtype and got.shape == t.shape
            assert_close(got, want, GRAD_TOL[dtype], name)
        assert (dq.cpu()[empty_rows] == 0).all(), "dq of rows that see no key must be exactly 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention(case, dtype, device, gen):
    skip_unsupported("attention", device, dtype)
    run_case(case, dtype, device, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_explicit_scale(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run_case((2, 50, 61, 4, 2, 64, True, (-1, -1), 0.0), dtype, device, gen, scale=0.05)
    run_case((1, 40, 40, 2, 2, 32, False, (7, 7), 4.0), dtype, device, gen, scale=1.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [0.0, -0.2, -1.0], ids=lambda s: f"scale{s:g}")
def test_attention_nonpositive_scale(scale, device, gen):
    """scale <= 0 is legal arithmetic: 0 averages the visible values, a negative scale favours
    the least similar keys. Partial last key tiles (70, 130 keys) and masked rows included."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run_case((2, 50, 70, 4, 2, 64, True, (-1, -1), 0.0), dtype, device, gen, scale=scale)
    run_case((1, 130, 65, 2, 1, 128, True, (3, 0), 0.0), dtype, device, gen, scale=scale)  # masked rows
    run_case((1, 33, 130, 2, 2, 64, False, (9, 30), 5.0), dtype, device, gen, scale=scale)  # softcap


# Windows at and past int32: each is unbounded on these lengths (or hides the other side).
HUGE_WINDOWS = [(-1, 2**31 - 1), (2**31 - 1, -1), (2**31, 0), (2**32, 2**32), (2**40, 3), (5, 2**63 - 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", HUGE_WINDOWS, ids=str)
def test_attention_huge_windows(window, device, gen):
    """Windows near and past 2**31 saturate instead of wrapping (int32 index math)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run_case((2, 45, 70, 4, 2, 64, False, window, 0.0), dtype, device, gen)
    run_case((1, 70, 45, 2, 1, 64, True, window, 0.0), dtype, device, gen, grads=False)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_random_sweep(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(7)
    for _ in range(16):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
        hkv = r(1, 3)
        case = (r(1, 2), r(1, 150), r(1, 150), hkv * r(1, 3), hkv, [16, 24, 40, 64, 96, 128][r(0, 5)],
                bool(r(0, 1)), (r(-1, 40), r(-1, 40)), [0.0, 2.0, 30.0][r(0, 2)])
        run_case(case, dtype, device, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_contribute_nothing(dtype, device, gen):
    """Causal with seqlen_q > seqlen_k: the first 9 rows see no key. They give out 0 and
    lse -inf, dq 0, and their dout (here huge) must not leak into dk / dv."""
    skip_unsupported("attention", device, dtype)
    b, sq, sk, h, hkv, d = 2, 13, 4, 4, 2, 64
    q = randn(gen, b, sq, h, d, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, b, sk, hkv, d, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, b, sk, hkv, d, dtype=dtype, device=device).requires_grad_()
    out, lse = attnkit.attention(q, k, v, causal=True, softcap=10.0, return_lse=True)
    assert (out[:, :9] == 0).all() and (lse[:, :, :9] == NEG_INF).all()
    assert not out.isnan().any() and torch.isfinite(lse[:, :, 9:]).all()
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    dout[:, :9] *= 1000
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (dq[:, :9] == 0).all()
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qr, kr, vr, causal=True, softcap=10.0)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(got, want, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_inputs(device, gen):
    """q, k, v as views of one packed qkv tensor and of a head slice: non-contiguous,
    head_dim contiguous. Gradients come back with the inputs' shapes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv = randn(gen, 2, 50, 3, 4, 32, dtype=dtype, device=device).requires_grad_()
    q, k, v = qkv.unbind(2)
    q, k, v = q[:, :, 1:3], k[:, :, :1], v[:, :, :1]  # head slices too: GQA 2:1
    out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(qr, kr, vr, causal=True)
    assert_close(out, ref, FWD_TOL[dtype])
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double(), retain_graph=True)
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(got, want, GRAD_TOL[dtype], name)
    # A dout whose head_dim is not contiguous (e.g. from an expand) still gives the same grads.
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out2 = attnkit.attention(q2, k2, v2, causal=True)
    g = randn(gen, 2, 50, 2, 1, dtype=dtype, device=device).expand(2, 50, 2, 32)
    grads = torch.autograd.grad(out2, (q2, k2, v2), g)
    want = torch.autograd.grad(ref, (qr, kr, vr), g.cpu().double())
    for name, got, w in zip(("dq", "dk", "dv"), grads, want):
        assert_close(got, w, GRAD_TOL[dtype], name)


VARLEN_LENGTHS = {
    # lengths_q, lengths_k: empty sequences on either side, single tokens, odd lengths
    "mixed": ([5, 0, 1, 70, 33, 4, 0], [9, 3, 1, 70, 100, 0, 0]),
    "one": ([1], [1]),
}
VARLEN_OPTS = {
    "causal-window-softcap": dict(causal=True, window=(40, -1), softcap=10.0),
    "full": dict(),
    "window-both": dict(window=(3, 8), softcap=2.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", VARLEN_OPTS.values(), ids=VARLEN_OPTS.keys())
@pytest.mark.parametrize("lengths", VARLEN_LENGTHS.values(), ids=VARLEN_LENGTHS.keys())
def test_attention_varlen(lengths, opts, dtype, device, gen):
    skip_unsupported("attention", device, dtype)
    lens_q, lens_k = lengths
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    h, hkv, d = 4, 2, 40
    q = randn(gen, sum(lens_q), h, d, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=device).requires_grad_()
    # max_seqlen_* are upper bounds: pass loose ones.
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q) + 3, max(lens_k) + 1, return_lse=True,
                                        **opts)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention_varlen(qr, kr, vr, cu_q.cpu(), cu_k.cpu(), **opts)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (h, sum(lens_q))
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    empty_rows = (ref_lse == NEG_INF).t()
    assert (out.detach().cpu()[empty_rows] == 0).all()
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(got, want, GRAD_TOL[dtype], name)
    assert (dq.cpu()[empty_rows] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_dense_per_sequence(device, gen):
    """Packing sequences must not change any of them: varlen equals dense attention of each."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens_q, lens_k = [17, 1, 64], [30, 5, 64]
    q = randn(gen, sum(lens_q), 4, 64, dtype=dtype, device=device)
    k, v = randn(gen, sum(lens_k), 1, 64, dtype=dtype, device=device), randn(gen, sum(lens_k), 1, 64, dtype=dtype,
                                                                              device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, 64, 64, causal=True, return_lse=True)
    for b in range(3):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, l = attnkit.attention(q[None, qs], k[None, ks], v[None, ks], causal=True, return_lse=True)
        assert_close(out[qs], o[0].double(), FWD_TOL[dtype])
        assert_close(lse[:, qs], l[0].double(), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_lse_gradient(device, varlen, gen):
    """lse is differentiable: a loss on out and lse (softcap, window, a fully masked row)
    gives the reference's gradients."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = randn(gen, 2, 37, 4, 64), randn(gen, 2, 50, 2, 64), randn(gen, 2, 50, 2, 64)
    w_out, w_lse = randn(gen, 2, 37, 4, 64), randn(gen, 2, 4, 37)
    opts = dict(causal=True, window=(20, -1), softcap=20.0)
    leaves = [t.to(dtype=dtype, device=device).requires_grad_() for t in (q, k, v)]
    if varlen:
        cu = cu_seqlens([37, 37], device)
        cu_k = cu_seqlens([50, 50], device)
        out, lse = attnkit.attention_varlen(*(t.flatten(0, 1) for t in leaves), cu, cu_k, 37, 50, return_lse=True,
                                            **opts)
        out, lse = out.unflatten(0, (2, 37)), lse.unflatten(1, (2, 37)).transpose(0, 1)
    else:
        out, lse = attnkit.attention(*leaves, return_lse=True, **opts)
    loss = (out.float() * w_out.to(device)).sum() + (lse * w_lse.to(device)).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference.attention(*ref_leaves, **opts)
    ref_grads = torch.autograd.grad((ref * w_out.double()).sum() + (ref_lse * w_lse.double()).sum(), ref_leaves)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_split_keys_merged_gradients(device, gen):
    """Attention over two halves of the keys merged by merge_attention_states has the
    gradients of attention over all keys (the ring / split-KV pattern)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (randn(gen, 1, 40, 4, 32, dtype=dtype, device=device).requires_grad_() for _ in range(3))
    dout = randn(gen, 1, 40, 4, 32, dtype=dtype, device=device)
    whole = attnkit.attention(q, k, v)
    want = torch.autograd.grad(whole, (q, k, v), dout)
    o_a, l_a = attnkit.attention(q, k[:, :17], v[:, :17], return_lse=True)
    o_b, l_b = attnkit.attention(q, k[:, 17:], v[:, 17:], return_lse=True)
    merged, _ = attnkit.merge_attention_states(o_a, l_a, o_b, l_b)
    got = torch.autograd.grad(merged, (q, k, v), dout)
    assert_close(merged, whole.double(), FWD_TOL[dtype])
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w.double(), 2 * GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_no_queries_backward(device, varlen, gen):
    """seqlen_q = 0 (or no tokens): the backward accepts what the forward did, zero gradients."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = randn(gen, 2, 0, 4, 32, dtype=dtype, device=device).requires_grad_()
    k, v = (randn(gen, 2, 9, 2, 32, dtype=dtype, device=device).requires_grad_() for _ in range(2))
    if varlen:
        qv = q.detach().flatten(0, 1).requires_grad_()
        kv, vv = (t.detach().flatten(0, 1).requires_grad_() for t in (k, v))
        cu_q, cu_k = cu_seqlens([0, 0], device), cu_seqlens([9, 9], device)
        out = attnkit.attention_varlen(qv, kv, vv, cu_q, cu_k, 0, 9, causal=True)
        leaves = (qv, kv, vv)
    else:
        out = attnkit.attention(q, k, v, causal=True)
        leaves = (q, k, v)
    out.sum().backward()
    assert leaves[0].grad.shape == leaves[0].shape
    assert (leaves[1].grad == 0).all() and (leaves[2].grad == 0).all()


def test_opcheck(gen):
    scale = 16 ** -0.5
    q, k, v = (randn(gen, 1, 19, 2, 16).requires_grad_() for _ in range(3))
    args = (q, k, v, None, None, 0, 0, True, scale, 4, -1, 0.0)
    torch.library.opcheck(torch.ops.attnkit.attention_fwd.default, args)
    out, lse = torch.ops.attnkit.attention_fwd(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse) + args[3:]
    torch.library.opcheck(torch.ops.attnkit.attention_bwd.default, bwd)

    cu_q, cu_k = torch.tensor([0, 7, 19], dtype=torch.int32), torch.tensor([0, 12, 19], dtype=torch.int32)
    qv = randn(gen, 19, 4, 16).requires_grad_()
    kv, vv = randn(gen, 19, 2, 16).requires_grad_(), randn(gen, 19, 2, 16).requires_grad_()
    vargs = (qv, kv, vv, cu_q, cu_k, 12, 12, False, scale, -1, -1, 5.0)
    torch.library.opcheck(torch.ops.attnkit.attention_fwd.default, vargs)
    out, lse = torch.ops.attnkit.attention_fwd(*vargs)
    bwd = (torch.randn_like(out), qv.detach(), kv.detach(), vv.detach(), out.detach(), lse) + vargs[3:]
    torch.library.opcheck(torch.ops.attnkit.attention_bwd.default, bwd)


def test_torch_compile_fullgraph(gen):
    q = randn(gen, 2, 40, 4, 32).requires_grad_()
    k, v = randn(gen, 2, 40, 2, 32).requires_grad_(), randn(gen, 2, 40, 2, 32).requires_grad_()

    def f(q, k, v):
        out, lse = attnkit.attention(q, k, v, causal=True, window=(16, -1), softcap=5.0, return_lse=True)
        return (out * out).sum() + lse.sum().detach(), lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, lse = f(q, k, v)
    closs, clse = compiled(q, k, v)
    assert torch.allclose(lse, clse, rtol=1e-6, atol=1e-6) and torch.allclose(loss, closs)
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(closs, (q, k, v))):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_torch_compile_varlen(gen):
    cu = cu_seqlens([7, 0, 30])
    q, k, v = (randn(gen, 37, 2, 16).requires_grad_() for _ in range(3))

    def f(q, k, v, cu):
        return attnkit.attention_varlen(q, k, v, cu, cu, 30, 30, causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, closs = f(q, k, v, cu), compiled(q, k, v, cu)
    assert torch.allclose(loss, closs)
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(closs, (q, k, v))):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# (argument the message must name, inputs from good (q, k, v), options)
BAD = {
    "q-rank": (r"\bq\b", lambda q, k, v: (q[0], k, v), {}),
    "k-dtype": (r"\bk\b", lambda q, k, v: (q, k.half(), v), {}),
    "v-dtype": (r"\bv\b", lambda q, k, v: (q, k, v.bfloat16()), {}),
    "q-int": (r"\bq\b", lambda q, k, v: (q.int(), k.int(), v.int()), {}),
    "q-float64": (r"\bq\b", lambda q, k, v: (q.double(), k.double(), v.double()), {}),
    "k-head_dim": (r"\bk\b", lambda q, k, v: (q, k[..., :8], v[..., :8]), {}),
    "v-head_dim": (r"\bv\b", lambda q, k, v: (q, k, v[..., :8]), {}),
    "q-heads-not-multiple": (r"\bq\b", lambda q, k, v: (q[:, :, :3], k, v), {}),
    "q-head_dim-stride": (r"\bq\b", lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), {}),
    "k-head_dim-stride": (r"\bk\b", lambda q, k, v: (q, k.transpose(2, 3).contiguous().transpose(2, 3), v), {}),
    "v-length": (r"\bv\b", lambda q, k, v: (q, k, v[:, :5]), {}),
    "k-batch": (r"\bk\b", lambda q, k, v: (q, k[:1], v[:1]), {}),
    "window-left": ("window", lambda q, k, v: (q, k, v), {"window": (-2, 0)}),
    "window-right": ("window", lambda q, k, v: (q, k, v), {"window": (3, -5)}),
    "softcap": ("softcap", lambda q, k, v: (q, k, v), {"softcap": -1.0}),
}


@pytest.mark.parametrize("name,make,opts", BAD.values(), ids=BAD.keys())
def test_bad_input(name, make, opts, gen):
    q, k, v = randn(gen, 2, 8, 4, 16), randn(gen, 2, 8, 2, 16), randn(gen, 2, 8, 2, 16)
    with pytest.raises((ValueError, RuntimeError), match=name):
        attnkit.attention(*make(q, k, v), **opts)


def test_bad_varlen_input(gen):
    q, k, v = randn(gen, 10, 2, 16), randn(gen, 10, 2, 16), randn(gen, 10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    cases = [
        (r"cu_seqlens_[qk]", i32(0, 4, 6, 10), good),          # one more sequence than cu_seqlens_k
        ("cu_seqlens_q", i32(0, 6, 4, 10), i32(0, 3, 5, 10)),  # decreasing
        ("cu_seqlens_k", i32(0, 2, 4, 10), i32(0, 6, 5, 10)),  # decreasing
        ("cu_seqlens_k", good, i32(0, 4, 9)),                  # last entry != total_k
        ("cu_seqlens_q", i32(0, 4, 11), good),                 # last entry != total_q
        ("cu_seqlens_q", good.long(), good),                   # int64
        ("cu_seqlens_k", good, good.long()),                   # int64
        ("cu_seqlens_q", i32(1, 4, 10), good),                 # not starting at 0
        ("cu_seqlens_q", good.view(1, 3), good),               # 2-D
    ]
    for name, cu_q, cu_k in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            attnkit.attention_varlen(q, k, v, cu_q, cu_k, 10, 10)
    with pytest.raises((ValueError, RuntimeError), match="max_seqlen_q"):
        attnkit.attention_varlen(q, k, v, good, good, 3, 10)
    with pytest.raises((ValueError, RuntimeError), match="max_seqlen_k"):
        attnkit.attention_varlen(q, k, v, good, good, 10, 5)
    with pytest.raises((ValueError, RuntimeError), match=r"\bq\b"):  # dense q with cu_seqlens
        attnkit.attention_varlen(q[None], k, v, good, good, 10, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not attnkit.cuda_available(), reason="needs a CUDA GPU and the CUDA kernels")
def test_device_mismatch(gen):
    q, k, v = randn(gen, 1, 8, 2, 16), randn(gen, 1, 8, 2, 16), randn(gen, 1, 8, 2, 16)
    with pytest.raises((ValueError, RuntimeError), match=r"\bk\b"):
        attnkit.attention(q, k.cuda(), v)
    with pytest.raises((ValueError, RuntimeError), match=r"\bv\b"):
        attnkit.attention(q, k, v.cuda())
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens_q"):
        attnkit.attention_varlen(q[0], k[0], v[0], cu.cuda(), cu, 8, 8)
