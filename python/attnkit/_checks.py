"""Python-side argument handling shared by the public ops: defaults and the checks that
must happen before dispatch (option types, and ops without a kernel on the device)."""
import math

import torch

from ._capability import device_reason
from ._ops import CUDA_KERNELS


def resolve_scale(scale, q):
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


# Sequence lengths are int32: a window of 2**31 - 1 keys already hides nothing, so larger
# ones saturate there (the kernels' int) instead of overflowing.
_WINDOW_MAX = 2**31 - 1


def saturate_window(w):
    return min(int(w), _WINDOW_MAX)


def resolve_window(window):
    if isinstance(window, int):
        return saturate_window(window), -1
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise ValueError(f"window must be an int or a (left, right) pair of ints, -1 = unbounded; got {window!r}")
    if window[0] < -1 or window[1] < -1:
        raise ValueError(f"window must be (left, right) with each >= -1 (-1 = unbounded), got {tuple(window)}")
    return saturate_window(window[0]), saturate_window(window[1])


def resolve_softcap(softcap):
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be a number >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


def require_kernel(op, t):
    """NotImplementedError with the reason when `op` has no kernel for the device of `t`."""
    if t.device.type == "cpu":
        return
    if t.device.type == "cuda" and CUDA_KERNELS.get(op, False):
        reason = device_reason(t.device.index if t.device.index is not None else torch.cuda.current_device())
        if reason is not None:
            raise NotImplementedError(f"attnkit.{op}: {reason}")
        return
    raise NotImplementedError(
        f"attnkit.{op} has no kernel for {t.device.type} tensors in this build "
        f"(CUDA kernels present: {sorted(k for k, v in CUDA_KERNELS.items() if v) or 'none'})")


def check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
