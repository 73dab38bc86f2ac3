"""attnkit.attention / attention_varlen against the float64 reference: forward, LSE,
gradients, masks, GQA, odd lengths, fully masked rows, opcheck, torch.compile, bad input."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import TOL, devices_for, randn, rel_err

DEVICES = devices_for("attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
CASES = [
    (1, 1, 1, 1, 1, 16, False, (-1, -1), 0.0),
    (2, 33, 33, 4, 4, 64, False, (-1, -1), 0.0),
    (2, 100, 100, 4, 1, 64, True, (-1, -1), 0.0),
    (1, 65, 130, 6, 2, 40, True, (-1, -1), 0.0),      # seqlen_q < seqlen_k, bottom-right causal
    (1, 130, 65, 4, 2, 32, True, (-1, -1), 0.0),      # seqlen_q > seqlen_k: leading rows see nothing
    (3, 77, 91, 2, 2, 128, False, (20, -1), 0.0),     # left window only
    (1, 70, 70, 2, 1, 64, False, (-1, 5), 0.0),       # right window only
    (2, 129, 129, 4, 2, 64, True, (31, 0), 30.0),     # causal + window + softcap
    (1, 64, 200, 2, 2, 80, False, (9, 3), 2.0),       # both windows, strong softcap
]


def run_case(case, dtype, device, gen, grads):
    b, sq, sk, h, hkv, d, causal, window, softcap = case
    q = randn(gen, b, sq, h, d, dtype=dtype, device=device)
    k = randn(gen, b, sk, hkv, d, dtype=dtype, device=device)
    v = randn(gen, b, sk, hkv, d, dtype=dtype, device=device)
    for t in (q, k, v):
        t.requires_grad_(grads)
    out, lse = attnkit.attention(q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)
    qr, kr, vr = (t.detach().double().cpu().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = reference.attention(qr, kr, vr, causal=causal, window=window, softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert not out.isnan().any()
    assert rel_err(out, ref.detach()) <= TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu() == float("-inf")).eq(ref_lse == float("-inf")).all()
    assert rel_err(lse.cpu()[finite], ref_lse[finite].detach()) <= TOL[dtype]
    assert (out.cpu()[~finite.transpose(1, 2)] == 0).all()  # rows that see nothing are exactly 0
    if grads:
        g = randn(gen, *out.shape, dtype=dtype, device=device)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
        rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), g.double().cpu())
        for got, want in ((dq, rq), (dk, rk), (dv, rv)):
            assert torch.isfinite(got).all()
            assert rel_err(got, want) <= 2 * TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_q{}_k{}_h{}-{}_d{}_c{}_w{}_{}_cap{}".format(*c[:7], *c[7], c[8]))
def test_attention_forward_backward(case, dtype, device, gen):
    run_case(case, dtype, device, gen, grads=True)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_random_sweep(device, gen):
    g = torch.Generator().manual_seed(7)
    for _ in range(12):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
        hkv = r(1, 3)
        case = (r(1, 2), r(1, 150), r(1, 150), hkv * r(1, 3), hkv, [8, 24, 64, 96][r(0, 3)], bool(r(0, 1)),
                (r(-1, 40), r(-1, 40)), [0.0, 5.0][r(0, 1)])
        run_case(case, torch.float32, device, gen, grads=True)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_inputs(device, gen):
    # q, k, v as views of one packed qkv tensor (non-contiguous, head_dim contiguous).
    qkv = randn(gen, 2, 50, 3, 4, 32, device=device)
    q, k, v = qkv.unbind(2)
    ref, _ = reference.attention(q, k, v, causal=True)
    assert rel_err(attnkit.attention(q, k, v, causal=True), ref) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_varlen(dtype, device, gen):
    lens_q, lens_k = [5, 0, 1, 70, 33], [9, 3, 1, 70, 100]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    h, hkv, d = 4, 2, 48
    q = randn(gen, sum(lens_q), h, d, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=device).requires_grad_()
    opts = dict(causal=True, window=(40, -1), softcap=10.0)
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **opts)
    qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention_varlen(qr, kr, vr, cu_q.cpu(), cu_k.cpu(), **opts)
    assert lse.shape == (h, sum(lens_q))
    assert rel_err(out, ref.detach()) <= TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert rel_err(lse.cpu()[finite], ref_lse.detach()[finite]) <= TOL[dtype]
    g = randn(gen, *out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (qr, kr, vr), g.double())
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 2 * TOL[dtype]


def test_lse_split_and_merge_equals_whole(gen):
    q, k, v = randn(gen, 1, 20, 2, 32), randn(gen, 1, 90, 2, 32), randn(gen, 1, 90, 2, 32)
    oa, la = attnkit.attention(q, k[:, :37], v[:, :37], return_lse=True)
    ob, lb = attnkit.attention(q, k[:, 37:], v[:, 37:], return_lse=True)
    out, lse = attnkit.merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = reference.attention(q, k, v)
    assert rel_err(out, ref) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5


def test_opcheck(gen):
    q, k, v = (randn(gen, 1, 19, 2, 16).requires_grad_() for _ in range(3))
    args = (q, k, v, None, None, 0, 0, True, 0.25, 4, -1, 0.0)
    torch.library.opcheck(torch.ops.attnkit.attention_fwd.default, args)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    qv, kv, vv = (randn(gen, 19, 2, 16).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.attnkit.attention_fwd.default, (qv, kv, vv, cu, cu, 12, 12, False, 0.25, -1, -1, 5.0))
    out, lse = torch.ops.attnkit.attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse) + args[3:]
    torch.library.opcheck(torch.ops.attnkit.attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph(gen):
    q, k, v = (randn(gen, 2, 40, 4, 32).requires_grad_() for _ in range(3))

    def f(q, k, v):
        return attnkit.attention(q, k, v, causal=True, window=(16, -1)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b)


def test_lse_is_not_differentiable(gen):
    q, k, v = (randn(gen, 1, 8, 1, 16).requires_grad_() for _ in range(3))
    _, lse = attnkit.attention(q, k, v, return_lse=True)
    assert not lse.requires_grad


BAD = [
    ("q", lambda q, k, v: (q[0], k, v), {}),                                   # rank
    ("k", lambda q, k, v: (q, k.half(), v), {}),                               # dtype mismatch
    ("q", lambda q, k, v: (q.int(), k.int(), v.int()), {}),                    # integer dtype
    ("k", lambda q, k, v: (q, k[..., :8], v[..., :8]), {}),                    # head_dim mismatch
    ("heads", lambda q, k, v: (q[:, :, :3], k, v), {}),                        # GQA ratio
    ("q", lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), {}),  # head_dim stride
    ("v", lambda q, k, v: (q, k, v[:, :5]), {}),                               # k / v lengths differ
    ("window", lambda q, k, v: (q, k, v), {"window": (-2, 0)}),
    ("softcap", lambda q, k, v: (q, k, v), {"softcap": -1.0}),
]


@pytest.mark.parametrize("name,make,opts", BAD, ids=[f"{b[0]}{i}" for i, b in enumerate(BAD)])
def test_bad_input(name, make, opts, gen):
    q, k, v = randn(gen, 1, 8, 4, 16), randn(gen, 1, 8, 2, 16), randn(gen, 1, 8, 2, 16)
    with pytest.raises((ValueError, RuntimeError), match=name):
        attnkit.attention(*make(q, k, v), **opts)


def test_bad_varlen_input(gen):
    q, k, v = randn(gen, 10, 2, 16), randn(gen, 10, 2, 16), randn(gen, 10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        ("cu_seqlens_q", torch.tensor([0, 6, 4, 10], dtype=torch.int32), good),   # length mismatch
        ("cu_seqlens_q", torch.tensor([0, 6, 4], dtype=torch.int32), good),       # decreasing
        ("cu_seqlens_k", good, torch.tensor([0, 4, 9], dtype=torch.int32)),       # last != total
        ("cu_seqlens_q", good.long(), good),                                        # int64
        ("cu_seqlens_q", torch.tensor([1, 4, 10], dtype=torch.int32), good),      # not starting at 0
    ]
    for name, cu_q, cu_k in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            attnkit.attention_varlen(q, k, v, cu_q, cu_k, 10, 10)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        attnkit.attention_varlen(q, k, v, good, good, 3, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.cuda
def test_device_mismatch(gen):
    q, k, v = randn(gen, 1, 8, 2, 16), randn(gen, 1, 8, 2, 16), randn(gen, 1, 8, 2, 16)
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        attnkit.attention(q, k.cuda(), v)
