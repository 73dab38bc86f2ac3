"""attnkit.neighborhood_attention against the float64 reference (attnkit.reference, whose mask is
built from the definition in Python, independently of csrc/include/attnkit/neighborhood.h):
forward out and LSE, gradients dq, dk, dv, in 1-D, 2-D and 3-D with kernel sizes (odd and
even), dilation, stride, per-axis causal, mixed per-axis options, GQA, odd sizes and head dims;
kernel == axis length equals dense attention; the reference mask itself against hand-worked
windows; opcheck, torch.compile and bad input. The CUDA rows (forward and backward) run where
a GPU and the CUDA kernel are present and are skipped otherwise; tests/test_neighborhood_cuda.py
holds the large CUDA shapes."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, devices_for, randn

DEVICES = devices_for("neighborhood_attention")

# (batch, spatial, heads, kv_heads, head_dim, kernel_size, dilation, stride, is_causal)
CASES = [
    (2, (37,), 2, 2, 32, 7, 1, 1, False),
    (1, (40,), 4, 2, 16, 5, 3, 1, False),                       # dilation, 40 % 3 != 0
    (1, (33,), 2, 1, 24, 6, 1, 3, False),                       # even kernel, stride, MQA
    (1, (29,), 2, 2, 16, 9, 2, 2, True),                        # causal + dilation + stride
    (2, (8, 8), 2, 2, 16, 3, 1, 1, False),
    (1, (9, 11), 4, 2, 40, (3, 5), (2, 1), (1, 2), (False, True)),  # mixed per-axis options
    (1, (7, 10), 2, 1, 8, (7, 4), (1, 2), (3, 4), (True, False)),   # kernel == axis 0, stride == kernel
    (1, (4, 5, 6), 2, 2, 16, 3, (1, 1, 2), (2, 1, 1), (True, False, False)),
    (1, (3, 6, 5), 3, 1, 20, (2, 3, 5), 1, (1, 3, 2), (False, True, True)),
]


def case_id(c):
    b, spatial, h, hkv, d, ks, dil, st, causal = c
    return f"b{b}-{'x'.join(map(str, spatial))}-h{h}:{hkv}-d{d}-k{ks}-d{dil}-s{st}-c{causal}".replace(" ", "")


def run_case(case, dtype, device, gen, grads=True):
    """Forward and backward of one case against the reference."""
    b, spatial, h, hkv, d, kernel_size, dilation, stride, is_causal = case
    if device == "cuda" and d % 8:
        pytest.skip("the CUDA kernels need head_dim % 8 == 0")
    opts = dict(dilation=dilation, stride=stride, is_causal=is_causal)
    q = randn(gen, b, *spatial, h, d, dtype=dtype, device=device).requires_grad_(grads)
    k = randn(gen, b, *spatial, hkv, d, dtype=dtype, device=device).requires_grad_(grads)
    v = randn(gen, b, *spatial, hkv, d, dtype=dtype, device=device).requires_grad_(grads)
    out, lse = attnkit.neighborhood_attention(q, k, v, kernel_size, return_lse=True, **opts)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = reference.neighborhood_attention(qr, kr, vr, kernel_size, **opts)

    assert out.dtype == dtype and out.device == q.device and out.shape == q.shape
    assert lse.shape == (b, h, *spatial) and lse.device == q.device
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    if grads:
        dout = randn(gen, *out.shape, dtype=dtype, device=device)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())
        for name, g, w, t in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert_close(g, w, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_neighborhood(case, device, gen):
    """Every case in float32 on the CPU, bfloat16 on CUDA."""
    run_case(case, torch.float32 if device == "cpu" else torch.bfloat16, device, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[1::3], ids=case_id)
def test_neighborhood_half(case, dtype, device, gen):
    run_case(case, dtype, device, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_random_sweep(device, gen):
    """Random grids and options, forward and backward."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rng = torch.Generator().manual_seed(7)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))
    for _ in range(12):
        rank = pick(1, 3)
        spatial = tuple(pick(1, 12 if rank < 3 else 6) for _ in range(rank))
        dilation = tuple(pick(1, max(1, n // 2)) for n in spatial)
        kernel = tuple(pick(1, n // d) for n, d in zip(spatial, dilation))
        stride = tuple(pick(1, k) for k in kernel)
        causal = tuple(bool(pick(0, 1)) for _ in spatial)
        hkv = pick(1, 2)
        case = (pick(1, 2), spatial, hkv * pick(1, 2), hkv, 8 * pick(1, 3), kernel, dilation, stride, causal)
        run_case(case, dtype, device, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [(45,), (6, 7), (3, 4, 5)], ids=str)
def test_full_kernel_is_dense_attention(spatial, device, gen):
    """kernel_size == every axis length (dilation 1, non-causal): every query sees every token."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = randn(gen, 2, *spatial, 4, 32, dtype=dtype, device=device)
    k, v = (randn(gen, 2, *spatial, 2, 32, dtype=dtype, device=device) for _ in range(2))
    out, lse = attnkit.neighborhood_attention(q, k, v, spatial, return_lse=True)
    flat = lambda t: t.reshape(t.shape[0], -1, *t.shape[-2:])
    dense, dense_lse = attnkit.attention(flat(q), flat(k), flat(v), return_lse=True)
    assert_close(out.reshape(dense.shape), dense.double(), FWD_TOL[dtype], "out")
    assert_close(lse.reshape(dense_lse.shape), dense_lse.double(), 1e-5, "lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [0.0, -0.5], ids=lambda s: f"scale{s:g}")
def test_nonpositive_scale(scale, device, gen):
    """scale <= 0 (shares the prefill kernel's softmax): against the reference, fwd and bwd."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = randn(gen, 1, 9, 11, 4, 32, dtype=dtype, device=device).requires_grad_()
    k, v = (randn(gen, 1, 9, 11, 2, 32, dtype=dtype, device=device).requires_grad_() for _ in range(2))
    opts = dict(dilation=(2, 1), is_causal=(False, True), scale=scale)
    out, lse = attnkit.neighborhood_attention(q, k, v, (3, 5), return_lse=True, **opts)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.neighborhood_attention(qr, kr, vr, (3, 5), **opts)
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (qr, kr, vr), dout.cpu().double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, GRAD_TOL[dtype], name)


def test_reference_mask_by_hand():
    """The oracle's windows on small axes, worked out by hand from NATTEN's definition."""
    rows = lambda m: [[j for j in range(m.shape[1]) if m[i, j]] for i in range(m.shape[0])]
    # kernel 3 on 6: centred, shifted inward at both borders
    assert rows(reference.neighborhood_axis_mask(6, 3)) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4],
                                                            [3, 4, 5], [3, 4, 5]]
    # even kernel 4: two keys before, one after the centre
    assert rows(reference.neighborhood_axis_mask(6, 4)) == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5],
                                                                                [2, 3, 4, 5]]
    # dilation 2 on 7: groups {0, 2, 4, 6} and {1, 3, 5}, kernel 2 inside each
    assert rows(reference.neighborhood_axis_mask(7, 2, dilation=2)) == [[0, 2], [1, 3], [0, 2], [1, 3], [2, 4],
                                                                        [3, 5], [4, 6]]
    # stride 2, kernel 3 on 7: pairs {0, 1}, {2, 3}, {4, 5}, {6} share the window of index 1, 3, 5, 6
    assert rows(reference.neighborhood_axis_mask(7, 3, stride=2)) == [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + \
        [[4, 5, 6]] * 3
    # causal kernel 3: up to three keys ending at the query
    assert rows(reference.neighborhood_axis_mask(5, 3, is_causal=True)) == [[0], [0, 1], [0, 1, 2], [1, 2, 3],
                                                                            [2, 3, 4]]
    # causal, stride 2: the leader is the last of the pair (capped at the axis end), windows end
    # at the query
    assert rows(reference.neighborhood_axis_mask(5, 2, stride=2, is_causal=True)) == [[0], [0, 1], [2], [2, 3],
                                                                                      [3, 4]]
    m = reference.neighborhood_mask((2, 3), (1, 3), (1, 1), (1, 1), (False, False))
    assert rows(m) == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3


def test_lse_is_not_differentiable(gen):
    q, k, v = (randn(gen, 1, 8, 8, 1, 16).requires_grad_() for _ in range(3))
    out, lse = attnkit.neighborhood_attention(q, k, v, 3, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def test_strided_inputs(gen):
    """q, k, v as slices of one packed (batch, h, w, 3, heads, head_dim) tensor."""
    qkv = randn(gen, 2, 6, 7, 3, 2, 16)
    q, k, v = qkv.unbind(3)
    out = attnkit.neighborhood_attention(q, k, v, (3, 5), dilation=(2, 1))
    ref, _ = reference.neighborhood_attention(q, k, v, (3, 5), dilation=(2, 1))
    assert_close(out, ref, FWD_TOL[torch.float32])


def op_args(q, k, v, scale=0.25):
    return (q, k, v, [3, 2], [1, 2], [2, 1], [0, 1], scale)


def test_opcheck(gen):
    q = randn(gen, 1, 5, 6, 4, 16).requires_grad_()
    k, v = (randn(gen, 1, 5, 6, 2, 16).requires_grad_() for _ in range(2))
    args = op_args(q, k, v)
    torch.library.opcheck(torch.ops.attnkit.neighborhood_fwd.default, args)
    out, lse = torch.ops.attnkit.neighborhood_fwd(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse) + args[3:]
    torch.library.opcheck(torch.ops.attnkit.neighborhood_bwd.default, bwd)


def test_torch_compile_fullgraph(gen):
    q = randn(gen, 2, 4, 5, 6, 2, 16).requires_grad_()
    k, v = (randn(gen, 2, 4, 5, 6, 1, 16).requires_grad_() for _ in range(2))

    def f(q, k, v):
        out, lse = attnkit.neighborhood_attention(q, k, v, (3, 3, 5), dilation=(1, 1, 1), stride=(1, 2, 1),
                                                  is_causal=(True, False, False), return_lse=True)
        return (out * out).sum() + lse.sum().detach(), lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, lse = f(q, k, v)
    closs, clse = compiled(q, k, v)
    assert torch.allclose(lse, clse, rtol=1e-6, atol=1e-6) and torch.allclose(loss, closs)
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(closs, (q, k, v))):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# (text the message must contain, inputs from good (q, k, v) of shape (2, 6, 8, heads, 16), options)
BAD = {
    "q-rank-3": (r"\bq\b", lambda q, k, v: (q[0, 0], k[0, 0], v[0, 0]), {}),
    "q-rank-7": (r"\bq\b", lambda q, k, v: (q[None, None, None], k, v), {}),
    "k-spatial": (r"\bk\b", lambda q, k, v: (q, k[:, :5], v[:, :5]), {}),
    "v-shape": (r"\bv\b", lambda q, k, v: (q, k, v[:, :, :7]), {}),
    "k-dtype": (r"\bk\b", lambda q, k, v: (q, k.half(), v), {}),
    "q-float64": (r"\bq\b", lambda q, k, v: (q.double(), k.double(), v.double()), {}),
    "k-head_dim": (r"\bk\b", lambda q, k, v: (q, k[..., :8], v[..., :8]), {}),
    "q-heads": (r"\bq\b", lambda q, k, v: (q[..., :3, :], k, v), {}),
    "kernel-too-large": ("kernel_size", lambda q, k, v: (q, k, v), {"kernel_size": (7, 3)}),
    "kernel-zero": ("kernel_size", lambda q, k, v: (q, k, v), {"kernel_size": 0}),
    "kernel-times-dilation": ("kernel_size", lambda q, k, v: (q, k, v), {"kernel_size": 3, "dilation": (2, 3)}),
    "kernel-axes": ("kernel_size", lambda q, k, v: (q, k, v), {"kernel_size": (3, 3, 3)}),
    "kernel-type": ("kernel_size", lambda q, k, v: (q, k, v), {"kernel_size": 3.0}),
    "dilation-zero": ("dilation", lambda q, k, v: (q, k, v), {"dilation": 0}),
    "stride-zero": ("stride", lambda q, k, v: (q, k, v), {"stride": (1, 0)}),
    "stride-above-kernel": ("stride", lambda q, k, v: (q, k, v), {"stride": 4}),
    "is_causal-type": ("is_causal", lambda q, k, v: (q, k, v), {"is_causal": 1}),
    "scale": ("scale", lambda q, k, v: (q, k, v), {"scale": float("nan")}),
}


@pytest.mark.parametrize("name,make,opts", BAD.values(), ids=BAD.keys())
def test_bad_input(name, make, opts, gen):
    q, k, v = randn(gen, 2, 6, 8, 4, 16), randn(gen, 2, 6, 8, 2, 16), randn(gen, 2, 6, 8, 2, 16)
    opts = dict(opts)
    kernel_size = opts.pop("kernel_size", 3)
    with pytest.raises(ValueError, match=name):
        attnkit.neighborhood_attention(*make(q, k, v), kernel_size, **opts)
