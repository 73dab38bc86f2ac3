"""CUDA neighborhood attention at bench-like shapes against the float64 reference (run on the
GPU): forward and backward, 1-D with a 1025 kernel, 2-D 64x64 with kernel 13 and with
dilation 2, 3-D video grids with per-axis causal and stride, GQA, head_dim 64 and 128,
outputs allocated over NaN-poisoned memory; kernel == grid is dense attention (forward and
gradients); dK and dV are bit-reproducible; unsupported input raises ValueError.
All tests are marked `cuda` and skipped without a GPU or without the CUDA kernel."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cuda_module_marks, randn
from test_prefill_cuda import poison_allocator

pytestmark = cuda_module_marks("neighborhood_attention", "neighborhood attention")

DEV = "cuda"

# (batch, spatial, heads, kv_heads, head_dim, kernel_size, dilation, stride, is_causal)
SHAPES = [
    (1, (8192,), 2, 1, 64, 1025, 1, 1, False),
    (1, (4099,), 2, 2, 128, 255, 3, 4, True),
    (1, (64, 64), 2, 2, 128, 13, 1, 1, False),
    (1, (64, 64), 4, 2, 64, 7, 2, 1, False),
    (1, (8, 16, 16), 2, 2, 128, (3, 7, 7), 1, 1, (True, False, False)),
    (2, (8, 16, 16), 2, 1, 64, (4, 7, 7), 1, 2, False),
    (1, (5, 9, 13), 2, 2, 96, (5, 3, 7), (1, 3, 1), (2, 1, 3), (False, True, False)),
]


def shape_id(s):
    return "x".join(map(str, s[1])) + f"-k{s[5]}-d{s[4]}"


def make_inputs(shape, dtype, gen, grads=False):
    b, spatial, h, hkv, d = shape[:5]
    q = randn(gen, b, *spatial, h, d, dtype=dtype, device=DEV)
    k, v = (randn(gen, b, *spatial, hkv, d, dtype=dtype, device=DEV) for _ in range(2))
    return tuple(t.requires_grad_(grads) for t in (q, k, v))


def options(shape):
    return dict(dilation=shape[6], stride=shape[7], is_causal=shape[8])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward(shape, dtype):
    q, k, v = make_inputs(shape, dtype, torch.Generator().manual_seed(0))
    poison_allocator()
    out, lse = attnkit.neighborhood_attention(q, k, v, shape[5], return_lse=True, **options(shape))
    ref, ref_lse = reference.neighborhood_attention(q, k, v, shape[5], **options(shape))
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


# The float64 reference backward is dense (tokens^2): the shapes up to 4k tokens.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_backward(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_inputs(shape, dtype, gen, grads=True)
    out = attnkit.neighborhood_attention(q, k, v, shape[5], **options(shape))
    dout = randn(gen, *out.shape, dtype=dtype, device=DEV)
    poison_allocator()
    got = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.neighborhood_attention(qr, kr, vr, shape[5], **options(shape))
    want = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, GRAD_TOL[dtype], name)


def test_dk_dv_reproducible():
    """dK and dV are summed in registers (no atomics): bit-identical across runs."""
    shape = SHAPES[3]
    q, k, v = make_inputs(shape, torch.bfloat16, torch.Generator().manual_seed(3), grads=True)
    out = attnkit.neighborhood_attention(q, k, v, shape[5], **options(shape))
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_full_kernel_is_dense():
    """kernel == grid: forward and gradients equal attnkit.attention's on the flattened tokens."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(gen, 2, 16, 24, 4, 128, dtype=torch.bfloat16, device=DEV).requires_grad_() for _ in range(3))
    out = attnkit.neighborhood_attention(q, k, v, (16, 24))
    dense = attnkit.attention(*(t.reshape(2, -1, 4, 128) for t in (q, k, v)))
    assert_close(out.reshape(dense.shape), dense.double(), FWD_TOL[torch.bfloat16])
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(dense, (q, k, v), dout.reshape(dense.shape))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w.double(), GRAD_TOL[torch.bfloat16], name)


def test_unsupported_input():
    q = torch.randn(1, 16, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attnkit.neighborhood_attention(q, q, q, 5)
    q = torch.randn(1, 16, 2, 256, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.neighborhood_attention(q, q, q, 5)
