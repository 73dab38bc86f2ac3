"""CUDA neighborhood attention forward at bench-like shapes against the float64 reference
(run on the GPU): 1-D with a 1025 kernel, 2-D 64x64 with kernel 13 and with dilation 2, 3-D
video grids with per-axis causal and stride, GQA, head_dim 64 and 128, outputs allocated over
NaN-poisoned memory; kernel == grid is dense attention; the backward raises
NotImplementedError on CUDA (no CUDA kernel yet), unsupported input raises ValueError.
All tests are marked `cuda` and skipped without a GPU or without the CUDA kernel."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, cuda_module_marks, randn
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1])) + f"-k{s[5]}-d{s[4]}")
def test_forward(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    b, spatial, h, hkv, d, kernel_size, dilation, stride, is_causal = shape
    opts = dict(dilation=dilation, stride=stride, is_causal=is_causal)
    q = randn(gen, b, *spatial, h, d, dtype=dtype, device=DEV)
    k, v = (randn(gen, b, *spatial, hkv, d, dtype=dtype, device=DEV) for _ in range(2))
    poison_allocator()
    out, lse = attnkit.neighborhood_attention(q, k, v, kernel_size, return_lse=True, **opts)
    ref, ref_lse = reference.neighborhood_attention(q, k, v, kernel_size, **opts)
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


def test_full_kernel_is_dense():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(gen, 2, 16, 24, 4, 128, dtype=torch.bfloat16, device=DEV) for _ in range(3))
    out = attnkit.neighborhood_attention(q, k, v, (16, 24))
    dense = attnkit.attention(*(t.reshape(2, -1, 4, 128) for t in (q, k, v)))
    assert_close(out.reshape(dense.shape), dense.double(), FWD_TOL[torch.bfloat16])


def test_backward_not_implemented():
    q = torch.randn(1, 16, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    out = attnkit.neighborhood_attention(q, q, q, 5)
    with pytest.raises(NotImplementedError, match="backward"):
        out.sum().backward()


def test_unsupported_input():
    q = torch.randn(1, 16, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attnkit.neighborhood_attention(q, q, q, 5)
    q = torch.randn(1, 16, 2, 256, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.neighborhood_attention(q, q, q, 5)
