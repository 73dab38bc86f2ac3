"""Which GPUs a build serves (compiled archs vs compute capability) and the torch-version
check at import, on the host with a table of GPUs and fake version strings."""
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit import _capability as cap

# (GPU, compute capability)
GPUS = {
    "T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "A10": (8, 6), "RTX 4090": (8, 9), "L40": (8, 9),
    "H100": (9, 0), "H200": (9, 0), "B200": (10, 0), "RTX 5090": (12, 0),
}
# GPUs each arch list has a kernel image for
SERVED = {
    ("90a",): {"H100", "H200"},
    ("80", "90a"): {"A100", "A10", "RTX 4090", "L40", "H100", "H200"},
    ("80",): {"A100", "A10", "RTX 4090", "L40"},
    ("86",): {"A10", "RTX 4090", "L40"},
    ("80", "90a", "100a", "120"): {"A100", "A10", "RTX 4090", "L40", "H100", "H200", "B200", "RTX 5090"},
}


@pytest.mark.parametrize("archs", SERVED, ids=lambda a: ";".join(a))
def test_arch_table(archs):
    served = {gpu for gpu, c in GPUS.items() if cap.unserved_reason(c, gpu, list(archs)) is None}
    assert served == SERVED[archs]


def test_reasons_name_the_gpu_and_the_fallback():
    old = cap.unserved_reason((7, 5), "Tesla T4", ["80", "90a"])
    assert "Tesla T4" in old and "7.5" in old and ">= 8.0" in old and "CPU tensors" in old
    new = cap.unserved_reason((10, 0), "NVIDIA B200", ["80", "90a"])
    assert "NVIDIA B200" in new and "10.0" in new and "sm_80, sm_90a" in new and "ATTNKIT_CUDA_ARCHS" in new
    assert cap.unserved_reason((9, 0), "NVIDIA H100", None) is None  # nothing recorded: not checked


def test_build_info_is_recorded():
    info = attnkit.cuda_capabilities()
    assert info["torch"] is not None and cap._release(info["torch"]) == cap._release(torch.__version__)
    assert (info["cuda_archs"] != []) == any(attnkit._ops.CUDA_KERNELS.values())
    assert isinstance(info["devices"], list)


def test_torch_mismatch_is_named():
    cap.check_torch_version("2.14.1+cu130", "2.14.1+cpu")  # same release: fine
    with pytest.raises(ImportError, match=r"built against torch 2\.14\.1.*torch 2\.11\.0\S* is imported"):
        cap.check_torch_version("2.14.1+cu130", "2.11.0+cu130")


def test_torch_mismatch_at_import(tmp_path):
    """A fake torch version makes `import attnkit` fail with the sentence, before _C loads.
    (1.0.0: no build's torch; 2.11.0 was the GPU machines' own, so it matched a build there.)"""
    code = ("import torch; torch.__version__ = '1.0.0'; import attnkit")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last_line = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and last_line.startswith("ImportError: attnkit's compiled extension was built against")


def test_unserved_gpu_error_before_any_kernel(monkeypatch):
    """An op on a GPU without a kernel image raises the reason (faked on the host)."""
    monkeypatch.setattr(attnkit._checks, "device_reason", lambda index: "no kernel image for Fake GPU (sm_75)")
    monkeypatch.setitem(attnkit._checks.CUDA_KERNELS, "attention", True)
    fake_cuda = type("T", (), {"device": torch.device("cuda", 0)})()
    with pytest.raises(NotImplementedError, match="attnkit.attention: no kernel image for Fake GPU"):
        attnkit._checks.require_kernel("attention", fake_cuda)
