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


def resolve_sink_tokens(sink_tokens):
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
    return saturate_window(sink_tokens)


def check_alibi_slopes(alibi_slopes, q, batch):
    """alibi_slopes: None, or float32 (heads,) / (batch, heads) on q's device."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise ValueError(f"alibi_slopes must be a float32 tensor or None, got {type(alibi_slopes).__name__}")
    heads = q.shape[-2]
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on the device of q ({q.device}), got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (heads,) = ({heads},) or (batch, heads) = ({batch}, {heads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    return alibi_slopes


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
