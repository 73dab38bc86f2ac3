"""Build of attnkit._C: the C++ CPU kernels always; the CUDA kernels when torch has CUDA
and nvcc is found (unless ATTNKIT_FORCE_CPU=1).

Environment:
  ATTNKIT_CUDA_ARCHS   ";"-separated SM archs to compile for (default "80;90a")
  ATTNKIT_FORCE_CPU=1  build the CPU backend only
  ATTNKIT_CPU_FLAGS    extra C++ flags of the CPU kernels (default "-march=native"; set to ""
                       for a binary that runs on any CPU of the architecture)
  CUTLASS_DIR          a CUTLASS checkout (its include/ is used) instead of the nvidia-cutlass wheel
  MAX_JOBS             parallel compile jobs (ninja)
  ATTNKIT_BUILD_INFO   where to write _build_info.py (default python/attnkit/_build_info.py; `make
                       gpu-carry` writes it beside its out-of-tree build so the dev build's stays)
ccache is used when it is on PATH.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cutlass_include():
    if os.environ.get("CUTLASS_DIR"):
        path = os.path.join(os.environ["CUTLASS_DIR"], "include")
    else:
        try:
            import cutlass_library
        except ImportError:
            return None
        path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isfile(os.path.join(path, "cute", "tensor.hpp")) else None


def gencode_flags(archs):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def locate_cuda_home():
    """torch derives CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script
    outside the toolkit (as /usr/local/bin/nvcc here), point it at the real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def write_build_info(torch_version, cuda_archs):
    """python/attnkit/_build_info.py: what the extension is built against, read at import
    (before the extension loads) to name a torch mismatch and the GPUs this build serves."""
    path = os.environ.get("ATTNKIT_BUILD_INFO") or os.path.join(ROOT, "python", "attnkit", "_build_info.py")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time (not in git)."""\n'
                f"TORCH_VERSION = {torch_version!r}\nCUDA_ARCHS = {cuda_archs!r}\n")


def build_extensions():
    locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cpu = os.environ.get("ATTNKIT_FORCE_CPU", "0") == "1"
    with_cuda = (not force_cpu and torch.version.cuda is not None and CUDA_HOME is not None
                 and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None)
    archs = [a for a in os.environ.get("ATTNKIT_CUDA_ARCHS", "80;90a").split(";") if a]

    sources = sorted(glob.glob("csrc/torch/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cpu_flags = os.environ.get("ATTNKIT_CPU_FLAGS", "-march=native").split()
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the CPU kernels run on one thread.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-fvisibility=hidden"] + cpu_flags
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fvisibility=hidden"]

    if shutil.which("ccache"):
        os.environ.setdefault("CXX", "ccache c++")
        os.environ.setdefault("PYTORCH_NVCC", "ccache nvcc")

    cutlass = cutlass_include()
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
        if cutlass:
            include_dirs.append(cutlass)
        cxx_flags.append("-DATTNKIT_WITH_CUDA")
        nvcc_flags += ["-DATTNKIT_WITH_CUDA"] + gencode_flags(archs)
        ext = CUDAExtension("attnkit._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
        backends = f"CPU + CUDA (archs {', '.join(archs)}; nvcc from {CUDA_HOME}; CUTLASS {cutlass or 'not found'})"
    else:
        ext = CppExtension("attnkit._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
        why = "ATTNKIT_FORCE_CPU=1" if force_cpu else "torch without CUDA or nvcc not found"
        backends = f"CPU only ({why})"
    write_build_info(torch.__version__, archs if with_cuda else [])
    print(f"attnkit: building backends: {backends}; {len(sources)} sources; "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}; CPU flags {' '.join(cpu_flags) or '(none)'}",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extensions()

setup(
    name="attnkit",
    version="0.1.0",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
