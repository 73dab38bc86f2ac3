"""The CUDA quantize_kv / dequantize_kv kernels write the very bytes, scales and values of
the CPU kernels (torch.equal), for every format, group size and dtype, on the 16-byte and
the byte-wise dequantize paths, with NaN groups. Marked `cuda`; skipped without a GPU or
without the CUDA kernels in the build."""
import pytest
import torch

import attnkit
from conftest import cuda_module_marks, randn
from test_quant import DTYPES, FORMAT_IDS, FORMATS, shapes_for

pytestmark = cuda_module_marks("quantize_kv", "quantize_kv")


def same_bits(a, b):
    """Equal NaN positions and equal bits elsewhere (-0 != +0)."""
    b = b.cpu()
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a[~a.isnan()].view(as_int), b[~b.isnan()].view(as_int))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_cuda_bit_identical(fmt, group, dtype, gen):
    # The last shape has rows of 48 (int4) or 96 bytes, some not a multiple of 16: byte-wise path.
    for shape in shapes_for(group) + [(5, 3, 2, 96 if group in (None, 32) else 2 * group)]:
        x = (randn(gen, *shape) * 3 + randn(gen, *shape[:-1], 1)).to(dtype)
        x.view(-1)[::97] = float("nan")
        cpu = attnkit.quantize_kv(x, fmt, group_size=group)
        gpu = attnkit.quantize_kv(x.cuda(), fmt, group_size=group)
        assert gpu.data.is_cuda and torch.equal(gpu.data.cpu(), cpu.data), "data"
        assert same_bits(cpu.scale, gpu.scale), "scale"
        if cpu.zero is not None:
            assert same_bits(cpu.zero, gpu.zero), "zero"
        for out_dtype in DTYPES:
            a = attnkit.dequantize_kv(cpu, dtype=out_dtype)
            b = attnkit.dequantize_kv(gpu, dtype=out_dtype)
            assert b.is_cuda and same_bits(a, b), f"dequantize_kv to {out_dtype}"


def test_unaligned_data_uses_byte_path(gen):
    """A data view that starts off 16 bytes decodes like the CPU (byte-wise CUDA path)."""
    x = randn(gen, 9, 2, 64)
    q = attnkit.quantize_kv(x.cuda(), "int8")
    sliced = attnkit.QuantizedKV(q.data.view(-1)[8:8 + 8 * 2 * 64].view(8, 2, 64), q.scale[:8], q.zero[:8], "int8")
    cpu = attnkit.QuantizedKV(*(t.cpu() if torch.is_tensor(t) else t for t in sliced))
    assert same_bits(attnkit.dequantize_kv(cpu), attnkit.dequantize_kv(sliced))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_cuda_rotated_bit_identical(fmt, group, dtype, gen):
    """rotate=True: the CUDA warp-per-row rotation and quantization write the CPU's bits."""
    for head_dim in (32, 64, 128, 256):
        if group is not None and group > head_dim:
            continue
        x = (randn(gen, 7, 3, head_dim) * 3 + randn(gen, 7, 3, 1)).to(dtype)
        x[2, 1, 5] = float("nan")
        x[4, 0] = 0.0
        cpu = attnkit.quantize_kv(x, fmt, group_size=group, rotate=True)
        gpu = attnkit.quantize_kv(x.cuda(), fmt, group_size=group, rotate=True)
        assert gpu.rotated and torch.equal(gpu.data.cpu(), cpu.data), "data"
        assert same_bits(cpu.scale, gpu.scale), "scale"
        if cpu.zero is not None:
            assert same_bits(cpu.zero, gpu.zero), "zero"
        for out_dtype in DTYPES:
            assert same_bits(attnkit.dequantize_kv(cpu, dtype=out_dtype), attnkit.dequantize_kv(gpu, dtype=out_dtype))
