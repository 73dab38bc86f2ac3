"""Which GPUs this build's CUDA kernels run on, and the torch it was built against.

Read before the compiled extension loads: a torch other than the build's fails with a
sentence that says so (instead of an undefined symbol), and a GPU the build has no kernel
image for fails per op with its name, capability and the fallback (instead of "no kernel
image is available"). The facts come from _build_info.py, which setup.py writes.
"""
import functools

import torch

try:
    from ._build_info import CUDA_ARCHS, TORCH_VERSION
except ImportError:  # built by an older setup.py: nothing recorded, nothing checked
    CUDA_ARCHS, TORCH_VERSION = None, None

MIN_CAPABILITY = (8, 0)  # the kernels use cp.async and bf16 MMA (Ampere and newer)


def _release(version):
    """'2.14.1+cu130' -> '2.14.1': the local tag (CUDA or CPU wheel) does not change the ABI."""
    return version.split("+")[0]


def check_torch_version(built_against=TORCH_VERSION, running=torch.__version__):
    if built_against is not None and _release(built_against) != _release(running):
        raise ImportError(
            f"attnkit's compiled extension was built against torch {built_against}, but torch {running} is "
            f"imported: C++ extensions only load into the torch they were built with. Rebuild attnkit with this "
            f"torch (`make build`, or `pip install --no-build-isolation .`), or install torch=={_release(built_against)}.")


def _parse_arch(arch):
    """'90a' -> (9, 0, True); '80' -> (8, 0, False)."""
    specific = arch.endswith("a")
    digits = arch.rstrip("a")
    return int(digits[:-1]), int(digits[-1]), specific


def arch_serves(arch, capability):
    """Whether SASS compiled for `arch` runs on a GPU of `capability` (major, minor): a plain
    arch runs on its major version at equal or higher minor (sm_80 code on sm_86 / sm_89); an
    arch-specific one ('90a') only on exactly that GPU."""
    major, minor, specific = _parse_arch(arch)
    if specific:
        return (major, minor) == tuple(capability)
    return major == capability[0] and minor <= capability[1]


def unserved_reason(capability, name, archs=CUDA_ARCHS):
    """None when this build has a kernel image for the GPU, else the sentence to raise."""
    fallback = "Use CPU tensors (attnkit's CPU kernels) or torch.nn.functional.scaled_dot_product_attention."
    cap = f"{name} (compute capability {capability[0]}.{capability[1]})"
    if tuple(capability) < MIN_CAPABILITY:
        return f"attnkit's CUDA kernels need compute capability >= 8.0 (Ampere or newer); {cap} is older. {fallback}"
    if archs is not None and not any(arch_serves(a, capability) for a in archs):
        return (f"this attnkit build has CUDA kernels for sm_{', sm_'.join(archs)} only, none of which runs on {cap}. "
                f"Rebuild with ATTNKIT_CUDA_ARCHS including {capability[0]}{capability[1]} "
                f"(e.g. ATTNKIT_CUDA_ARCHS=\"{capability[0]}{capability[1]}\" make build). {fallback}")
    return None


@functools.lru_cache(maxsize=None)
def device_reason(index):
    """unserved_reason for CUDA device `index` (queried once per device)."""
    return unserved_reason(torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))


def cuda_capabilities():
    """What this build serves: {"torch": built-against version, "cuda_archs": compiled archs
    ([] for a CPU-only build), "devices": one entry per visible GPU with its name,
    capability and whether attnkit's kernels run on it (and why not)}."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            reason = device_reason(i)
            devices.append({"index": i, "name": torch.cuda.get_device_name(i),
                            "capability": torch.cuda.get_device_capability(i), "served": reason is None,
                            "reason": reason})
    return {"torch": TORCH_VERSION, "cuda_archs": CUDA_ARCHS, "devices": devices}
