import pytest
import torch

import attnkit


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels")


def devices_for(op):
    """The CPU always; CUDA when a GPU is present, skipped (with the reason) while `op` has no
    CUDA kernel yet."""
    params = ["cpu"]
    if torch.cuda.is_available():
        marks = [pytest.mark.cuda]
        if not attnkit.has_cuda_kernel(op):
            marks.append(pytest.mark.skip(reason=f"no CUDA kernel for {op} yet (it arrives with its CUDA issue)"))
        params.append(pytest.param("cuda", marks=marks))
    return params


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; the denominator is at least 1 so that an exactly
    zero reference (e.g. dq with a single visible key) compares by absolute error."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1.0)).item()


# Relative-error budgets against the float64 reference per input dtype.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)
