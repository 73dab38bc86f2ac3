"""Quantized KV formats (docs/quantization.md): int8 and int4 (asymmetric, a float32 scale
and zero per row or per group of 32 / 64 / 128 channels) and fp8 e4m3 (a float32 scale per
row). A row is the head_dim channels of one (token, kv head). Schemas and bindings:
csrc/torch/quant.cpp; the format code shared by the CPU and CUDA kernels:
csrc/include/attnkit/quant.h."""
from typing import NamedTuple, Optional

import torch

from . import _checks
from ._ops import ops

KV_FORMATS = ("int8", "int4", "fp8_e4m3")
GROUP_SIZES = (32, 64, 128)


class QuantizedKV(NamedTuple):
    """Quantized rows of x (..., kv_heads, head_dim).

    data: uint8 (..., kv_heads, head_dim) for int8 and fp8_e4m3 (one code per channel;
    fp8 codes can be viewed as torch.float8_e4m3fn), (..., kv_heads, head_dim // 2) for
    int4 (channel 2j in the low nibble of byte j, 2j + 1 in the high nibble).
    scale: float32 (..., kv_heads, groups) with groups = head_dim // group_size (1 per row
    when group_size is None). zero: float32 like scale for int8 / int4, None for fp8_e4m3.
    Values: int: code * scale + zero; fp8: e4m3(code) * scale.
    rotated: the rows hold H x, H the orthonormal Hadamard matrix of size head_dim
    (quantize_kv(..., rotate=True)); dequantize_kv rotates back. As a k_cache, decode rotates
    its queries instead ((H q) . (H k) = q . k); a v_cache is never rotated.
    """
    data: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    kv_format: str
    group_size: Optional[int] = None
    rotated: bool = False


@torch.library.register_fake("attnkit::quantize_kv")
def _quantize_kv_fake(x, kv_format, group_size, rotate=False):
    head_dim = x.shape[-1]
    groups = head_dim // (group_size or head_dim) if head_dim else 0
    data = x.new_empty((*x.shape[:-1], head_dim // 2 if kv_format == "int4" else head_dim), dtype=torch.uint8)
    scale = x.new_empty((*x.shape[:-1], groups), dtype=torch.float32)
    zero = x.new_empty((*x.shape[:-1], 0 if kv_format == "fp8_e4m3" else groups), dtype=torch.float32)
    return data, scale, zero


@torch.library.register_fake("attnkit::dequantize_kv")
def _dequantize_kv_fake(data, scale, zero, kv_format, group_size, dtype, rotated=False):
    head_dim = data.shape[-1] * (2 if kv_format == "int4" else 1)
    return data.new_empty((*data.shape[:-1], head_dim), dtype=dtype)


def _check_format(kv_format, group_size):
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
    if group_size is None:
        return 0
    if kv_format == "fp8_e4m3":
        raise ValueError(f"group_size must be None for kv_format 'fp8_e4m3' (one scale per row), got {group_size!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be None or one of {GROUP_SIZES}, got {group_size!r}")
    return group_size


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def quantize_kv(x, kv_format, *, group_size=None, rotate=False):
    """Quantizes rows of x (..., kv_heads, head_dim) -> QuantizedKV.

    x: float32, float16 or bfloat16 (e.g. (num_pages, page_size, kv_heads, head_dim) or
    (tokens, kv_heads, head_dim)), CPU or CUDA; the two give the same bits.
    kv_format: "int8", "int4" or "fp8_e4m3". group_size: None (one scale per row, i.e. per
    token and kv head) or 32, 64, 128 channels per group (int8 / int4 only; must divide
    head_dim).

    int8 / int4 (levels L = 255 / 15): per group, zero = min, scale = (max - min) / L (float32
    arithmetic), code = min(round_half_even((x - zero) / scale), L), so every element is
    within scale / 2 of its value code * scale + zero. A constant group has scale 0 and
    codes 0 (exact). fp8_e4m3: scale = max|x| / 448, code = e4m3(x / scale) rounded half to
    even, saturated to +-448. A group (row for fp8) holding NaN or +-inf stores scale NaN
    (and zero NaN), codes 0, and dequantizes to NaN.

    rotate=True (head_dim 32, 64, 128 or 256): quantizes H x instead of x, H the orthonormal
    Hadamard matrix (a fast Walsh-Hadamard transform in float32, the same bits on CPU and
    CUDA). It spreads a few outlier channels over all channels, so one scale per row fits
    them all: for keys (docs/quantization.md). The result has rotated=True.
    """
    _checks.check_tensor(x, "x")
    group = _check_format(kv_format, group_size)
    _check_flag(rotate, "rotate")
    _checks.require_kernel("quantize_kv", x)
    data, scale, zero = ops.quantize_kv(x, kv_format, group, rotate)
    return QuantizedKV(data, scale, None if kv_format == "fp8_e4m3" else zero, kv_format, group_size, rotate)


def dequantize_kv(quantized, dtype=torch.float32):
    """The values of a QuantizedKV as a (..., kv_heads, head_dim) tensor of `dtype` (float32,
    float16 or bfloat16), on the device of its data: int: fmaf(code, scale, zero); fp8:
    e4m3(code) * scale, in float32, then (rotated rows) rotated back by H, then rounded to
    `dtype` (half to even). Build a QuantizedKV from stored tensors with QuantizedKV(data,
    scale, zero, kv_format, group_size, rotated).
    """
    if not isinstance(quantized, QuantizedKV):
        raise ValueError(f"quantized must be an attnkit.QuantizedKV, got {type(quantized).__name__}")
    data, scale, zero, kv_format, group_size, rotated = quantized
    _checks.check_tensor(data, "data")
    _checks.check_tensor(scale, "scale")
    if zero is not None:
        _checks.check_tensor(zero, "zero")
    group = _check_format(kv_format, group_size)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    _check_flag(rotated, "rotated")
    _checks.require_kernel("dequantize_kv", data)
    return ops.dequantize_kv(data, scale, zero, kv_format, group, dtype, rotated)


def cache_args(k_cache, v_cache):
    """decode / sparse_decode's caches as the ops take them: (k, v, quant) with quant the
    keyword arguments of a quantized cache (kv_format, group_size, k_scale, k_zero, v_scale,
    v_zero, rotated_keys), {} for plain tensors. A quantized cache is a pair of QuantizedKV of one
    kv_format and group_size, whose data, scale and zero have the leading shape of a cache
    ((num_pages, page_size, kv_heads) or (batch, max_seqlen, kv_heads))."""
    k_quantized, v_quantized = isinstance(k_cache, QuantizedKV), isinstance(v_cache, QuantizedKV)
    if not k_quantized and not v_quantized:
        _checks.check_tensor(k_cache, "k_cache")
        _checks.check_tensor(v_cache, "v_cache")
        return k_cache, v_cache, {}
    if not (k_quantized and v_quantized):
        raise ValueError("k_cache and v_cache must both be attnkit.QuantizedKV or both tensors, got "
                         f"{type(k_cache).__name__} and {type(v_cache).__name__}")
    for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _checks.check_tensor(cache.data, f"{name}.data")
        _checks.check_tensor(cache.scale, f"{name}.scale")
        if cache.zero is not None:
            _checks.check_tensor(cache.zero, f"{name}.zero")
    group = _check_format(k_cache.kv_format, k_cache.group_size)
    if (v_cache.kv_format, v_cache.group_size) != (k_cache.kv_format, k_cache.group_size):
        raise ValueError(f"v_cache must have the kv_format and group_size of k_cache ({k_cache.kv_format!r}, "
                         f"{k_cache.group_size!r}), got ({v_cache.kv_format!r}, {v_cache.group_size!r})")
    if v_cache.rotated is not False:
        raise ValueError(f"v_cache.rotated must be False (only keys may be stored rotated), got {v_cache.rotated!r}")
    _check_flag(k_cache.rotated, "k_cache.rotated")
    return k_cache.data, v_cache.data, dict(kv_format=k_cache.kv_format, group_size=group, k_scale=k_cache.scale,
                                            k_zero=k_cache.zero, v_scale=v_cache.scale, v_zero=v_cache.zero,
                                            rotated_keys=k_cache.rotated)
