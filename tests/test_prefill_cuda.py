"""CUDA prefill kernels at large shapes against the float64 reference (attnkit.reference):
seqlen 8k, head_dim 256, GQA 8:1, varlen with lengths drawn from 1..4096 (empty sequences
included), causal + window + softcap, strided q/k/v (slices of a packed qkv tensor), fully
masked rows, and the errors of unsupported input on CUDA.

The reference runs in float64 on the GPU, one kv-head group at a time: heads are
independent, so slicing them is exact (dk / dv of a kv head need all of its q heads, so a
group is never split). The small shapes, opcheck and torch.compile run on CUDA too, in
tests/test_prefill.py. All tests here are marked `cuda` and skipped without a GPU or
without the CUDA prefill kernel in the build."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cu_seqlens, cuda_module_marks, randn

pytestmark = cuda_module_marks("attention", "prefill")

NEG_INF = float("-inf")
DEV = "cuda"


def poison_allocator(nbytes=1 << 30):
    """Best effort: leave NaN-filled blocks in torch's CUDA caching allocator, so the next
    allocations (the kernels' outputs) start as NaN and a row the kernel never writes shows.
    A no-op in effect under PYTORCH_NO_CUDA_MEMORY_CACHING=1."""
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    sizes = [min(nbytes, free // 4)] + [1 << s for s in range(26, 18, -1)]
    blocks = [torch.full((max(s // 4, 1),), float("nan"), device=DEV) for s in sizes if s > 0]
    torch.cuda.synchronize()
    del blocks


def check_groups(q, k, v, out, lse, opts, grads=None, dout=None, tol_dtype=None):
    """Compares out (b, s, Hq, d), lse (b, Hq, s) and, when `grads` = (dq, dk, dv) is given,
    the gradients, against reference.attention run in float64 on the GPU one kv-head group
    at a time."""
    dtype = tol_dtype or q.dtype
    hq, hkv = q.shape[2], k.shape[2]
    g = hq // hkv
    for kh in range(hkv):
        qs = slice(kh * g, (kh + 1) * g)
        qr = q.detach()[:, :, qs].double().requires_grad_(grads is not None)
        kr = k.detach()[:, :, kh:kh + 1].double().requires_grad_(grads is not None)
        vr = v.detach()[:, :, kh:kh + 1].double().requires_grad_(grads is not None)
        ref, ref_lse = reference.attention(qr, kr, vr, **opts)
        assert_close(out[:, :, qs], ref, FWD_TOL[dtype], f"out (kv head {kh})")
        assert_lse_close(lse[:, qs], ref_lse, FWD_TOL[dtype])
        empty = (ref_lse == NEG_INF).transpose(1, 2)  # (b, s, g)
        assert (out[:, :, qs][empty] == 0).all(), "rows that see no key must be exactly 0"
        if grads is not None:
            rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), dout[:, :, qs].double())
            dq, dk, dv = grads
            assert_close(dq[:, :, qs], rq, GRAD_TOL[dtype], f"dq (kv head {kh})")
            assert_close(dk[:, :, kh:kh + 1], rk, GRAD_TOL[dtype], f"dk (kv head {kh})")
            assert_close(dv[:, :, kh:kh + 1], rv, GRAD_TOL[dtype], f"dv (kv head {kh})")
            assert (dq[:, :, qs][empty] == 0).all(), "dq of rows that see no key must be exactly 0"
        del qr, kr, vr, ref, ref_lse
        torch.cuda.empty_cache()


def run_dense(gen, b, sq, sk, h, hkv, d, dtype=torch.bfloat16, grads=True, **opts):
    q = randn(gen, b, sq, h, d, dtype=dtype, device=DEV).requires_grad_(grads)
    k = randn(gen, b, sk, hkv, d, dtype=dtype, device=DEV).requires_grad_(grads)
    v = randn(gen, b, sk, hkv, d, dtype=dtype, device=DEV).requires_grad_(grads)
    poison_allocator()
    out, lse = attnkit.attention(q, k, v, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, sq)
    got_grads = dout = None
    if grads:
        dout = randn(gen, *out.shape, dtype=dtype, device=DEV)
        poison_allocator()
        got_grads = torch.autograd.grad(out, (q, k, v), dout)
        for t, g in zip((q, k, v), got_grads):
            assert g.shape == t.shape and g.dtype == dtype
    check_groups(q, k, v, out.detach(), lse, opts, got_grads, dout)


# (seqlen 8k) x masks: causal, full, causal + left window + softcap, two-sided window + softcap
LONG_OPTS = {
    "full": dict(),
    "causal": dict(causal=True),
    "causal-window-softcap": dict(causal=True, window=(1000, -1), softcap=30.0),
    "window-both-softcap": dict(window=(700, 300), softcap=10.0),
}


@pytest.mark.parametrize("opts", LONG_OPTS.values(), ids=LONG_OPTS.keys())
def test_seqlen_8k(opts, gen):
    run_dense(gen, 1, 8192, 8192, 4, 2, 128, **opts)


def test_seqlen_8k_fp16_forward(gen):
    run_dense(gen, 2, 8192, 8192, 2, 1, 64, dtype=torch.float16, grads=False, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dim_256(causal, gen):
    run_dense(gen, 2, 2048, 2048, 4, 2, 256, causal=causal)


def test_head_dim_256_uneven_lengths(gen):
    """seqlen_q != seqlen_k, lengths that are no multiple of any tile."""
    run_dense(gen, 1, 1531, 2777, 2, 1, 256, causal=True, softcap=20.0)


@pytest.mark.parametrize("d", [64, 128])
def test_gqa_8_to_1(d, gen):
    run_dense(gen, 2, 2048, 2048, 16, 2, d, causal=True, window=(511, -1))


def test_mqa_long(gen):
    run_dense(gen, 1, 4096, 4096, 8, 1, 128, window=(-1, 64))


def test_fully_masked_leading_rows(gen):
    """Causal with seqlen_q > seqlen_k: the first 2000 rows of each sequence see no key:
    out 0, lse -inf, dq 0 and no NaN anywhere (outputs start as NaN where the allocator
    hands back poisoned blocks)."""
    run_dense(gen, 2, 3000, 1000, 4, 2, 128, causal=True)


def test_strided_packed_qkv(gen):
    """q, k, v as slices of one packed (batch, seq, 3, heads, head_dim) tensor, with head
    slices on top (GQA 2:1): row stride 3 * heads * head_dim, head offsets. Gradients flow
    back into the packed tensor."""
    b, s, h, d = 2, 4096, 8, 128
    qkv = randn(gen, b, s, 3, h, d, dtype=torch.bfloat16, device=DEV).requires_grad_()
    q, k, v = qkv.unbind(2)
    q, k, v = q[:, :, 2:6], k[:, :, 4:6], v[:, :, 1:3]
    assert not q.is_contiguous() and q.stride(1) == 3 * h * d
    opts = dict(causal=True, softcap=15.0)
    out, lse = attnkit.attention(q, k, v, return_lse=True, **opts)
    dout = randn(gen, *out.shape, dtype=torch.bfloat16, device=DEV)
    (gqkv,) = torch.autograd.grad(out, (qkv,), dout)
    gq, gk, gv = gqkv.unbind(2)
    grads = (gq[:, :, 2:6], gk[:, :, 4:6], gv[:, :, 1:3])
    check_groups(q, k, v, out.detach(), lse, opts, grads, dout)
    # what no slice reads gets no gradient
    assert (gq[:, :, :2] == 0).all() and (gk[:, :, :4] == 0).all() and (gv[:, :, 3:] == 0).all()


def varlen_lengths(seed, n=12, hi=4096):
    g = torch.Generator().manual_seed(seed)
    lens_q = torch.randint(1, hi + 1, (n,), generator=g).tolist()
    lens_k = [lq if i % 3 else int(torch.randint(1, hi + 1, (1,), generator=g)) for i, lq in enumerate(lens_q)]
    lens_k[4] = 0  # a sequence with queries but no keys: its rows are 0, lse -inf
    lens_q[7] = 0  # and one with keys but no queries
    return lens_q, lens_k


VARLEN_OPTS = {
    "full": dict(),
    "causal": dict(causal=True),
    "causal-window-softcap": dict(causal=True, window=(300, -1), softcap=30.0),
}


@pytest.mark.parametrize("opts", VARLEN_OPTS.values(), ids=VARLEN_OPTS.keys())
def test_varlen_long(opts, gen):
    lens_q, lens_k = varlen_lengths(11)
    h, hkv, d = 8, 2, 128
    dtype = torch.bfloat16
    cu_q, cu_k = cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV)
    q = randn(gen, sum(lens_q), h, d, dtype=dtype, device=DEV).requires_grad_()
    k = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=DEV).requires_grad_()
    v = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=DEV).requires_grad_()
    poison_allocator()
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **opts)
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q))
    dout = randn(gen, *out.shape, dtype=dtype, device=DEV)
    poison_allocator()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for t in (out, lse, dq, dk, dv):
        assert not t.isnan().any(), "NaN in an output"
    # Each sequence against the dense reference: packing must not change any of them.
    for i in range(len(lens_q)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        if lens_q[i] == 0:
            continue
        if lens_k[i] == 0:
            assert (out[qs] == 0).all() and (lse[:, qs] == NEG_INF).all() and (dq[qs] == 0).all(), (
                f"sequence {i} has no keys: its rows must be 0 with lse -inf")
            continue
        check_groups(q[None, qs], k[None, ks], v[None, ks], out.detach()[None, qs], lse[None, :, qs], opts,
                     (dq[None, qs], dk[None, ks], dv[None, ks]), dout[None, qs])
    # keys of a sequence without queries get no gradient
    ks = slice(int(cu_k[7]), int(cu_k[8]))
    assert (dk[ks] == 0).all() and (dv[ks] == 0).all()


def test_varlen_many_short(gen):
    """Many short sequences (1..64 tokens) in one call: tile boundaries inside and across
    sequences, forward only."""
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 65, (300,), generator=g).tolist()
    cu = cu_seqlens(lens, DEV)
    q = randn(gen, sum(lens), 4, 64, dtype=torch.float16, device=DEV)
    k, v = randn(gen, sum(lens), 4, 64, dtype=torch.float16, device=DEV), randn(gen, sum(lens), 4, 64,
                                                                                  dtype=torch.float16, device=DEV)
    poison_allocator()
    out, lse = attnkit.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, return_lse=True)
    ref, ref_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu, cu, causal=True)
    assert_close(out, ref, FWD_TOL[torch.float16])
    assert_lse_close(lse, ref_lse, FWD_TOL[torch.float16])


# -- small cases for tools/sanitize.sh (compute-sanitizer): every kernel path, tiny sizes --

SMALL = [
    # (b, sq, sk, h, hkv, d, opts)
    (2, 77, 77, 4, 2, 64, dict(causal=True)),
    (1, 130, 65, 2, 1, 128, dict(causal=True, window=(20, -1), softcap=5.0)),   # empty leading rows
    (1, 65, 200, 2, 2, 256, dict(window=(9, 3))),
    (2, 33, 47, 4, 1, 96, dict()),
    (1, 50, 50, 2, 1, 40, dict(causal=True)),                                    # head_dim rounded up
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}:{c[4]}-d{c[5]}")
def test_small_sanitize(case, gen):
    b, sq, sk, h, hkv, d, opts = case
    run_dense(gen, b, sq, sk, h, hkv, d, **opts)


def test_small_sanitize_varlen(gen):
    lens_q, lens_k = [5, 0, 1, 70, 33, 4], [9, 3, 1, 70, 100, 0]
    cu_q, cu_k = cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV)
    q = randn(gen, sum(lens_q), 4, 64, dtype=torch.bfloat16, device=DEV).requires_grad_()
    k = randn(gen, sum(lens_k), 2, 64, dtype=torch.bfloat16, device=DEV).requires_grad_()
    v = randn(gen, sum(lens_k), 2, 64, dtype=torch.bfloat16, device=DEV).requires_grad_()
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, 70, 100, causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref, ref_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True)
    assert_close(out, ref, FWD_TOL[torch.bfloat16])
    assert_lse_close(lse, ref_lse, FWD_TOL[torch.bfloat16])
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()


# -- unsupported input on CUDA: an error naming the problem, before any kernel runs --


def test_rejects_float32(gen):
    q, k, v = (randn(gen, 1, 16, 2, 64, device=DEV) for _ in range(3))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError),
                       match=r"(?i)dtype|float32|fp32|float16|bfloat16|half"):
        attnkit.attention(q, k, v)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=DEV)
    with pytest.raises((ValueError, RuntimeError, NotImplementedError),
                       match=r"(?i)dtype|float32|fp32|float16|bfloat16|half"):
        attnkit.attention_varlen(q[0], k[0], v[0], cu, cu, 16, 16)


@pytest.mark.parametrize("d", [260, 512])
def test_rejects_large_head_dim(d, gen):
    q, k, v = (randn(gen, 1, 16, 2, d, dtype=torch.bfloat16, device=DEV) for _ in range(3))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match=r"(?i)head_dim|head dim"):
        attnkit.attention(q, k, v)


def test_error_leaves_device_usable(gen):
    """After a rejected call the next good one still works (no sticky CUDA error)."""
    q, k, v = (randn(gen, 1, 16, 2, 64, device=DEV) for _ in range(3))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        attnkit.attention(q, k, v)
    run_dense(gen, 1, 64, 64, 2, 1, 64, grads=False, causal=True)
    torch.cuda.synchronize()
