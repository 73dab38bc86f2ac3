"""The README's commands' set-up logic (Makefile) and the build's progress lines
(tools/build.py), checked without building: which CUDA archs `make` compiles with and
without a GPU, and which torch set-up installs with and without a GPU or nvcc."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TOOL = os.path.join(ROOT, "tools", "build.py")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_dry_run(*args):
    """`make -n -B ...` in the repository: the commands make would run, none run."""
    # Not the settings of a make this runs under (`make test` passes its flags and variables on).
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNKIT_CUDA_ARCHS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run = subprocess.run(["make", "-n", "-B", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


@needs_make
@pytest.mark.parametrize("has_gpu,archs", [("0", "90a"), ("1", "80;90a")])
def test_default_archs(has_gpu, archs):
    """One arch where no GPU is present (every source still compiles), all where one is."""
    out = make_dry_run("build", f"HAS_GPU={has_gpu}")
    assert f"CUDA archs {archs} (" in out
    assert "tools/build.py -- " in out


@needs_make
def test_archs_can_be_chosen():
    assert "CUDA archs 80 (" in make_dry_run("build", "HAS_GPU=0", "ATTNKIT_CUDA_ARCHS=80")


@needs_make
@pytest.mark.parametrize("has_gpu,has_nvcc,cpu_wheel", [("0", "0", True), ("0", "1", False), ("1", "0", False)])
def test_cpu_torch_only_without_gpu_and_nvcc(has_gpu, has_nvcc, cpu_wheel):
    """Set-up takes the CPU build of the pinned torch only where nothing CUDA can be built or
    run; its recipe falls back to PyPI's wheel when the CPU index is unreachable."""
    out = make_dry_run(".venv/.ready", f"HAS_GPU={has_gpu}", f"HAS_NVCC={has_nvcc}")
    assert f'if [ "{has_gpu}{has_nvcc}" = 00 ]' in out
    assert '"torch==2.14.1+cpu"' in out and "download.pytorch.org/whl/cpu" in out and "|| \\" in out
    assert ".venv/bin/pip install -q torch==2.14.1 " in out


def test_build_progress_lines(tmp_path):
    """ninja's long compiler lines become '[done/total m:ss] family file'; the rest passes."""
    fake = tmp_path / "fake_build.py"
    fake.write_text(textwrap.dedent(f"""
        print("[1/3] /usr/local/cuda/bin/nvcc " + "-I/x " * 200 + "-c {ROOT}/csrc/cuda/prefill/fwd_hdim64_bf16.cu -o a.o")
        print("[2/3] c++ -MMD -c {ROOT}/csrc/cpu/decode.cpp -o b.o -O3")
        print("some warning: kept as it is")
        print("[3/3] c++ -shared a.o b.o -o _C.so")
        raise SystemExit(3)
    """))
    run = subprocess.run([sys.executable, BUILD_TOOL, "--", sys.executable, str(fake)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    lines = run.stdout.splitlines()
    assert any(line.startswith("[  1/  3") and line.endswith("cuda/prefill       fwd_hdim64_bf16.cu")
               for line in lines), lines
    assert any(line.endswith("cpu                decode.cpp") for line in lines), lines
    assert "some warning: kept as it is" in lines
    assert any(line.endswith("link attnkit._C") for line in lines), lines
    assert lines[-1].startswith("attnkit build: FAILED in ")
    assert max(len(line) for line in lines) < 200
