"""Shared test helpers: device parametrisation, error budgets against the float64
reference (attnkit.reference), a seeded generator, and comparison helpers that also check
every element, NaN and the -inf pattern of LSE."""
import pytest
import torch

import attnkit
from attnkit.testing import realistic_kv  # noqa: F401  (shared with tools/demo.py)

# Where each op's CUDA kernel arrives, for the skip reason while it has none.
CUDA_ISSUE = {"attention": "#4", "decode": "#5", "sparse_decode": "#6", "neighborhood_attention": "#7",
              "block_sparse_attention": "#19"}
# Ops whose CUDA kernels take fp16 / bf16 only (docs/semantics.md); fp32 runs on the CPU.
CUDA_HALF_ONLY = {"attention", "decode", "sparse_decode", "neighborhood_attention", "block_sparse_attention"}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels")


def devices_for(op):
    """Device parametrisation for tests of `op` ("attention", "decode",
    "merge_attention_states"): "cpu" always; "cuda" (marked `cuda`) when
    attnkit.cuda_available(), skipped while `op` has no CUDA kernel in this build."""
    params = ["cpu"]
    if attnkit.cuda_available():
        marks = [pytest.mark.cuda]
        if not attnkit.has_cuda_kernel(op):
            marks.append(pytest.mark.skip(reason=f"CUDA kernel arrives with issue {CUDA_ISSUE.get(op, '#4/#5')}"))
        params.append(pytest.param("cuda", marks=marks))
    return params


def cuda_module_marks(op, what):
    """pytestmark of a module of CUDA-only tests of `op`: marked `cuda`, skipped with the
    reason when there is no GPU or this build has no CUDA kernel for `op` (`what` names it)."""
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch.cuda.is_available() is False)"
    elif not attnkit.has_cuda_kernel(op):
        reason = f"this build has no CUDA {what} kernel (attnkit.has_cuda_kernel({op!r}) is False)"
    else:
        reason = None
    return [pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=reason or "")]


def skip_unsupported(op, device, dtype):
    """Skips a (device, dtype) pair that `op` does not support by design."""
    if device == "cuda" and op in CUDA_HALF_ONLY and dtype == torch.float32:
        pytest.skip(f"the CUDA {op} kernels take fp16 / bf16 only (docs/semantics.md)")


# Relative-error budgets against the float64 reference, per input dtype.
FWD_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# A single element may be off by at most this many budgets, measured against the largest
# reference element: catches elements never written or written to the wrong place, which
# a norm-wise error could average away.
ELEMENT_FACTOR = 3.0
TINY = torch.finfo(torch.float64).tiny


def rel_err(a, ref):
    """||a - ref|| / max(||ref||, tiny), in float64 on the CPU."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / max(ref.norm().item(), TINY)).item()


def assert_close(got, want, tol, what="output"):
    """got (any dtype / device) matches the float64 reference `want`: same shape, no NaN,
    relative error <= tol, and every element within ELEMENT_FACTOR * tol * max|want|. An
    exactly zero reference (e.g. dq with one visible key) is compared by absolute error."""
    got_c, want_c = got.detach().double().cpu(), want.detach().double().cpu()
    assert got_c.shape == want_c.shape, f"{what}: shape {tuple(got_c.shape)} != reference {tuple(want_c.shape)}"
    assert not got_c.isnan().any(), f"{what}: {int(got_c.isnan().sum())} NaN elements"
    assert torch.isfinite(got_c).all(), f"{what}: {int((~torch.isfinite(got_c)).sum())} infinite elements"
    if got_c.numel() == 0:
        return
    scale = want_c.abs().max().item()
    worst = (got_c - want_c).abs()
    if scale == 0:
        assert worst.max().item() <= tol, f"{what}: reference is 0, max |error| {worst.max().item():.3e} > {tol:.1e}"
        return
    err = rel_err(got_c, want_c)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    idx = int(worst.argmax())
    assert worst.max().item() <= ELEMENT_FACTOR * tol * scale, (
        f"{what}: element {tuple(torch.unravel_index(torch.tensor(idx), worst.shape))} off by "
        f"{worst.max().item():.3e} (reference {want_c.flatten()[idx].item():.4e}, got {got_c.flatten()[idx].item():.4e}, "
        f"max |reference| {scale:.3e})")


def assert_lse_close(lse, want, tol):
    """lse is float32, has the reference's shape and exactly its -inf entries (rows with no
    visible key), no NaN, and matches it elsewhere within tol."""
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, expected float32"
    lse_c, want_c = lse.detach().cpu().double(), want.detach().cpu().double()
    assert lse_c.shape == want_c.shape, f"lse: shape {tuple(lse_c.shape)} != reference {tuple(want_c.shape)}"
    assert not lse_c.isnan().any(), f"lse: {int(lse_c.isnan().sum())} NaN elements"
    empty = want_c == float("-inf")
    got_empty = lse_c == float("-inf")
    assert torch.equal(got_empty, empty), (
        f"lse: -inf at {got_empty.nonzero().tolist()[:8]}, reference -inf at {empty.nonzero().tolist()[:8]}")
    assert_close(lse_c[~empty], want_c[~empty], tol, "lse")


@pytest.fixture
def gen():
    """A seeded CPU generator: every test draws the same inputs on every run."""
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    """Standard normal values drawn on the CPU from `gen`, then cast and moved."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def cu_seqlens(lengths, device="cpu"):
    """int32 (batch + 1,) offsets of packed sequences of the given lengths."""
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def paged(gen, lens, page_size, kv_heads, head_dim, dtype, device, spare_pages=5):
    """A paged cache with room for `lens` and a shuffled (torch.randperm) page table, one
    spare logical page per sequence; unused table entries hold arbitrary valid ids."""
    pages_per_seq = max((n + page_size - 1) // page_size for n in lens) + 1
    num_pages = len(lens) * pages_per_seq + spare_pages
    table = torch.randperm(num_pages, generator=gen)[:len(lens) * pages_per_seq].view(len(lens), pages_per_seq)
    k = randn(gen, num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
    v = randn(gen, num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
    return k, v, table.int().to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def hadamard(x):
    """H x along the last axis (a power of two), H the orthonormal Hadamard matrix, in float32
    butterfly by butterfly in the order of attnkit/quant.h's hadamard_rotate: torch's float32
    add, subtract and multiply round like the kernels, so this gives their bits."""
    x = x.float().clone()
    n = x.shape[-1]
    log2n = n.bit_length() - 1
    h = 1
    while h < n:
        pairs = x.unflatten(-1, (n // (2 * h), 2, h))
        lower, upper = pairs[..., 0, :].clone(), pairs[..., 1, :].clone()
        pairs[..., 0, :] = lower + upper
        pairs[..., 1, :] = lower - upper
        h *= 2
    norm = torch.tensor(2.0 ** -(log2n // 2), dtype=torch.float32)
    if log2n % 2:
        norm = norm * torch.tensor(0.70710678118654752, dtype=torch.float32)
    return x * norm
