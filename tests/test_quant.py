"""attnkit.quantize_kv / dequantize_kv (issue 8 parts 1, 2 and 4): CPU kernels against the
float64 reference (codes bit-exact except float32 ties), the int error bound |x - deq(q(x))|
<= scale / 2, fp8 e4m3 encoding and decoding against torch.float8_e4m3fn, edge values,
bad input, opcheck, torch.compile, and the accuracy of attnkit.decode on dequantized K/V
drawn like real ones (docs/quantization.md). CUDA == CPU bit for bit: tests/test_quant_cuda.py."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import hadamard, randn, realistic_kv, rel_err

FORMATS = [("int8", None), ("int8", 32), ("int8", 64), ("int8", 128), ("int4", None), ("int4", 32), ("int4", 64),
           ("int4", 128), ("fp8_e4m3", None)]
FORMAT_IDS = [f"{f}-g{g}" for f, g in FORMATS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEVELS = {"int8": 255, "int4": 15}


def shapes_for(group_size):
    """Leading shapes x (kv_heads, head_dim): paged pages, odd token counts, odd head_dims."""
    if group_size is None:
        return [(3, 5, 2, 128), (7, 1, 64), (2, 3, 40), (1, 4, 256)]
    return [(3, 5, 2, 128), (7, 1, 256), (2, 3, 3 * group_size)]


def quantize_cpu(x, fmt, group):
    q = attnkit.quantize_kv(x, fmt, group_size=group)
    head_dim = x.shape[-1]
    groups = head_dim // (group or head_dim)
    assert q.data.dtype == torch.uint8 and q.data.shape == (*x.shape[:-1], head_dim // 2 if fmt == "int4" else head_dim)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (*x.shape[:-1], groups)
    assert (q.zero is None) == (fmt == "fp8_e4m3")
    if q.zero is not None:
        assert q.zero.dtype == torch.float32 and q.zero.shape == q.scale.shape
    return q


def unpack(data, fmt):
    codes = data.long()
    return torch.stack((codes & 15, codes >> 4), -1).flatten(-2) if fmt == "int4" else codes


def expand(per_group, head_dim):
    """(..., groups) -> (..., head_dim), each group's value repeated over its channels."""
    return per_group.repeat_interleave(head_dim // per_group.shape[-1], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_matches_reference(fmt, group, dtype, gen):
    for shape in shapes_for(group):
        x = (randn(gen, *shape) * 3 + randn(gen, *shape[:-1], 1)).to(dtype)
        q = quantize_cpu(x, fmt, group)
        codes_ref, scale_ref, zero_ref = reference.quantize_kv(x, fmt, group_size=group)
        xd, head_dim = x.double(), shape[-1]
        assert scale_ref.shape == q.scale.shape and codes_ref.shape == q.data.shape
        assert torch.allclose(q.scale.double(), scale_ref, rtol=1e-6, atol=0), "scale"
        deq = attnkit.dequantize_kv(q)
        assert deq.dtype == torch.float32 and deq.shape == x.shape
        if fmt == "fp8_e4m3":
            # The kernel's encoding is torch's e4m3fn conversion of x / scale in float32.
            ratio = x.float() / q.scale
            assert torch.equal(q.data, ratio.to(torch.float8_e4m3fn).view(torch.uint8)), "fp8 codes"
            # The float64 reference rounds x / scale once: it may differ at float32 ties only.
            assert int((q.data != codes_ref).sum()) <= max(2, x.numel() // 1000), "fp8 codes vs reference"
            # Half an e4m3 ulp: 2^-4 relative for normals, 2^-10 * scale below 2^-6 * scale.
            bound = torch.maximum(xd.abs() * 2.0**-4, expand(q.scale.double(), head_dim) * 2.0**-10)
            assert ((deq.double() - xd).abs() <= bound * (1 + 1e-6)).all(), "fp8 error bound"
            ref_values = reference.dequantize_kv(q.data, q.scale, None, fmt)
        else:
            assert torch.equal(q.zero.double(), zero_ref), "zero is the group's min"
            scale = expand(q.scale.double(), head_dim)
            # Bit-exact codes, except where (x - zero) / scale is within float32 rounding of a tie.
            t = (xd - expand(zero_ref, head_dim)) / expand(scale_ref, head_dim)
            near_tie = ((t - t.floor()) - 0.5).abs() < 1e-4
            diff = (unpack(q.data, fmt) - unpack(codes_ref, fmt)).abs()
            assert (diff <= near_tie.long()).all(), f"{int((diff > near_tie.long()).sum())} codes differ off a tie"
            assert int((diff > 0).sum()) <= max(2, x.numel() // 1000), "too many tie differences"
            # scale / 2, plus float32 rounding in (x - zero) / scale (t <= 255) and in the fma.
            assert ((deq.double() - xd).abs() <= scale * 0.5 * (1 + 1e-4) + xd.abs() * 2.0**-23).all(), "int bound"
            ref_values = reference.dequantize_kv(q.data, q.scale, q.zero, fmt, group_size=group)
        # dequantize_kv is one float32 rounding of the exact value of the stored codes.
        assert ((deq.double() - ref_values).abs() <= ref_values.abs() * 2.0**-23).all(), "dequantize_kv"
        for out_dtype in (torch.float16, torch.bfloat16):
            got = attnkit.dequantize_kv(q, dtype=out_dtype)
            assert got.dtype == out_dtype and torch.equal(got, deq.to(out_dtype)), f"dequantize_kv to {out_dtype}"


@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_non_contiguous_and_empty(fmt, group, gen):
    x = randn(gen, 4, 6, 2, 128).transpose(0, 1)
    q = attnkit.quantize_kv(x, fmt, group_size=group)
    qc = attnkit.quantize_kv(x.contiguous(), fmt, group_size=group)
    assert torch.equal(q.data, qc.data) and torch.equal(q.scale, qc.scale)
    empty = attnkit.quantize_kv(torch.zeros(0, 3, 128), fmt, group_size=group)
    assert empty.data.shape[0] == 0 and attnkit.dequantize_kv(empty).shape == (0, 3, 128)


def test_fp8_all_bytes():
    """dequantize_kv with scale 1 decodes every byte as torch.float8_e4m3fn does."""
    data = torch.arange(256, dtype=torch.uint8).view(2, 1, 128)
    got = attnkit.dequantize_kv(attnkit.QuantizedKV(data, torch.ones(2, 1, 1), None, "fp8_e4m3"))
    want = data.view(torch.float8_e4m3fn).float()
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2  # 0x7f and 0xff
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())


def test_fp8_encoding_random(gen):
    """Rows whose max |x| is 448 have scale exactly 1, so the codes are e4m3(x) itself:
    random floats over every e4m3 exponent, subnormals, exact ties and signed zeros agree
    with torch.float8_e4m3fn."""
    magnitude = torch.exp2(torch.rand(64, 127, generator=gen, dtype=torch.float64) * 24.8 - 16)  # < 448
    sign = torch.randint(0, 2, (64, 127), generator=gen) * 2 - 1
    x = (magnitude * sign).float()
    every_value = torch.arange(0, 126, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ties = (every_value[:-1] + every_value[1:]) / 2  # half-way points, exact in float32
    x[:1, :ties.numel()] = ties
    x[1, :3] = torch.tensor([0.0, -0.0, 1e-40])
    x = torch.cat([x, torch.full((64, 1), 448.0)], dim=1).view(64, 1, 128)
    q = attnkit.quantize_kv(x, "fp8_e4m3")
    assert (q.scale == 1).all()
    assert torch.equal(q.data, x.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_edge_values(fmt, group):
    head_dim = 128
    rows = torch.zeros(6, head_dim)
    rows[0] = 2.5  # constant: exact (int: scale 0)
    rows[1, ::2] = -0.0  # zeros of both signs
    rows[2] = torch.linspace(-60000, 60000, head_dim)  # wide range
    rows[3, 7] = float("nan")
    rows[4, 100] = float("inf")
    rows[5, 0] = float("-inf")
    q = attnkit.quantize_kv(rows.view(6, 1, head_dim), fmt, group_size=group)
    deq = attnkit.dequantize_kv(q).view(6, head_dim)
    if fmt == "fp8_e4m3":  # c maps to 448, so c / scale * scale: within a float32 ulp
        assert torch.allclose(deq[0], rows[0], rtol=2.0**-22, atol=0)
        assert torch.equal(deq[1].signbit(), rows[1].signbit()), "fp8 keeps the signs of zeros"
    else:  # scale 0: exact; -0 comes back as +0
        assert torch.equal(deq[0], rows[0]) and not deq[1].signbit().any()
    assert (deq[1] == 0).all()
    assert abs(deq[2].max().item() - 60000) <= 60000 * 2.0**-22 and deq[2].min().item() >= -60000 * (1 + 2.0**-22)
    group_of = group or head_dim
    for r, col in ((3, 7), (4, 100), (5, 0)):
        poisoned = torch.zeros(head_dim, dtype=torch.bool)
        poisoned[col // group_of * group_of:(col // group_of + 1) * group_of] = True
        assert deq[r][poisoned].isnan().all(), "a group with NaN / inf dequantizes to NaN"
        assert (deq[r][~poisoned] == 0).all(), "other groups of the row are unaffected"


def test_bad_input():
    x = torch.randn(2, 3, 64)
    cases = [
        (lambda: attnkit.quantize_kv(x, "int2"), "kv_format"),
        (lambda: attnkit.quantize_kv(x, "int8", group_size=16), "group_size"),
        (lambda: attnkit.quantize_kv(x, "int8", group_size=128), "group_size"),
        (lambda: attnkit.quantize_kv(torch.randn(2, 96), "int4", group_size=64), "group_size"),
        (lambda: attnkit.quantize_kv(x, "fp8_e4m3", group_size=32), "group_size"),
        (lambda: attnkit.quantize_kv(x.double(), "int8"), "x"),
        (lambda: attnkit.quantize_kv(torch.randn(64), "int8"), "x"),
        (lambda: attnkit.quantize_kv(torch.randn(2, 3, 7), "int4"), "head_dim"),
        (lambda: attnkit.quantize_kv(x.numpy(), "int8"), "x"),
    ]
    q = attnkit.quantize_kv(x, "int4", group_size=32)
    q8 = attnkit.quantize_kv(x, "fp8_e4m3")
    cases += [
        (lambda: attnkit.dequantize_kv(q, dtype=torch.float64), "dtype"),
        (lambda: attnkit.dequantize_kv(q._replace(data=q.data.int())), "data"),
        (lambda: attnkit.dequantize_kv(q._replace(scale=q.scale[..., :1])), "scale"),
        (lambda: attnkit.dequantize_kv(q._replace(scale=q.scale.half())), "scale"),
        (lambda: attnkit.dequantize_kv(q._replace(zero=None)), "zero"),
        (lambda: attnkit.dequantize_kv(q._replace(zero=q.zero[:1])), "zero"),
        (lambda: attnkit.dequantize_kv(q8._replace(zero=q8.scale)), "zero"),
        (lambda: attnkit.dequantize_kv(q._replace(group_size=64)), "scale"),
        (lambda: attnkit.dequantize_kv(q._replace(group_size=48)), "group_size"),
        (lambda: attnkit.dequantize_kv(tuple(q)), "quantized"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", None), ("fp8_e4m3", None)])
def test_opcheck(fmt, group):
    x = torch.randn(3, 2, 64)
    torch.library.opcheck(torch.ops.attnkit.quantize_kv.default, (x, fmt, group or 0))
    q = attnkit.quantize_kv(x, fmt, group_size=group)
    torch.library.opcheck(torch.ops.attnkit.dequantize_kv.default,
                          (q.data, q.scale, q.zero, fmt, group or 0, torch.bfloat16))


def test_compile_fullgraph():
    def round_trip(x):
        return attnkit.dequantize_kv(attnkit.quantize_kv(x, "int4", group_size=32), dtype=x.dtype)

    x = torch.randn(4, 2, 64)
    assert torch.equal(torch.compile(round_trip, fullgraph=True)(x), round_trip(x))


# ---- accuracy of decode on quantized K/V (issue 8, part 4) --------------------------------

# Relative error of decode vs the float64 reference on the unquantized K/V (issue 8 bounds).
DECODE_BOUND = {"int8": 2e-2, "fp8_e4m3": 2e-2, "int4": 8e-2}
# Measured on realistic_kv (seeds 0, 1, 2; docs/quantization.md): these quantize K's outlier
# channels together with the normal ones and miss the bound. The fix measured below: shift
# K by a per-channel offset first (exact for attention), or quantize K per channel (KIVI).
MISSES_BOUND = {
    ("int4", None): "K per row: 1.8e-1 .. 2.5e-1 (outlier channels set the step of every channel)",
    ("int4", 128): "K per row: 1.8e-1 .. 2.5e-1 (outlier channels set the step of every channel)",
    ("int4", 64): "K groups of 64: 1.6e-1 .. 1.7e-1",
    ("int4", 32): "K groups of 32: 1.1e-1 .. 1.2e-1",
    ("fp8_e4m3", None): "2.2e-2 .. 2.9e-2: e4m3's 2^-4 relative step on the +-10 outlier channels of K",
}
SEQLEN = 4096


def decode_error(quantize_k, quantize_v, seed=0):
    """Relative error of attnkit.decode on (quantize_k(k), quantize_v(v)) against
    reference.decode on the unquantized realistic_kv K/V (batch 2, SEQLEN tokens, 32 / 8
    heads, head_dim 128)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = realistic_kv(gen, 2, SEQLEN, 8, 128)
    lens = torch.full((2,), SEQLEN, dtype=torch.int32)
    ref, _ = reference.decode(q.double(), k.double(), v.double(), lens)
    return rel_err(attnkit.decode(q, quantize_k(k), quantize_v(v), lens), ref)


def round_trip(fmt, group):
    return lambda x: attnkit.dequantize_kv(attnkit.quantize_kv(x, fmt, group_size=group))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_decode_accuracy(fmt, group):
    err = decode_error(round_trip(fmt, group), round_trip(fmt, group))
    if (fmt, group) in MISSES_BOUND:
        assert err > DECODE_BOUND[fmt], f"now meets the bound ({err:.3e}): update MISSES_BOUND and the doc"
        pytest.xfail(f"{fmt} group {group}: {err:.3e} > {DECODE_BOUND[fmt]:.0e}; {MISSES_BOUND[(fmt, group)]}")
    assert err <= DECODE_BOUND[fmt], f"decode relative error {err:.3e} > {DECODE_BOUND[fmt]:.0e}"


def centered(quantize, prefix=256):
    """K minus the mean of its first `prefix` tokens per (sequence, kv head, channel), then
    quantized. A per-(sequence, kv head) constant vector c changes every logit of a query by
    the same q.c, so attention's output is exactly unchanged; it takes the outlier channels'
    offset out of the quantized range (the prefix stands for the prompt a cache starts from)."""
    return lambda k: quantize(k - k[:, :prefix].mean(dim=1, keepdim=True))


def per_channel(fmt, tokens=128):
    """K quantized per channel over groups of `tokens` tokens (KIVI), through quantize_kv on
    K transposed to (batch, kv_heads, head_dim, seqlen)."""
    return lambda k: round_trip(fmt, tokens)(k.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name,quantize_k,fmt,group", [
    ("centered-fp8", centered(round_trip("fp8_e4m3", None)), "fp8_e4m3", None),
    ("centered-int4-g32", centered(round_trip("int4", 32)), "int4", 32),
    ("per-channel-int4", per_channel("int4"), "int4", None),
    ("per-channel-int4-v-g32", per_channel("int4"), "int4", 32),
], ids=lambda p: p if isinstance(p, str) else "")
def test_decode_accuracy_with_k_fix(name, quantize_k, fmt, group):
    """The formats that miss their bound meet it once K's outlier channels are handled."""
    for seed in (0, 1):
        err = decode_error(quantize_k, round_trip(fmt, group), seed)
        assert err <= DECODE_BOUND[fmt], f"{name}, seed {seed}: {err:.3e} > {DECODE_BOUND[fmt]:.0e}"


# ---- rotated rows (quantize_kv(..., rotate=True)) ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,group", FORMATS, ids=FORMAT_IDS)
def test_rotate_quantizes_hadamard_rows(fmt, group, dtype, gen):
    """rotate=True stores exactly quantize_kv(H x), and dequantize_kv rotates back: H applied
    to the dequantized values, in float32 (the bits of conftest.hadamard)."""
    for head_dim in (32, 64, 128, 256):
        if group is not None and group > head_dim:
            continue
        x = (randn(gen, 5, 3, head_dim) * 3 + randn(gen, 5, 3, 1)).to(dtype)
        x[1, 2, 7] = 40.0  # an outlier channel
        q = attnkit.quantize_kv(x, fmt, group_size=group, rotate=True)
        want = attnkit.quantize_kv(hadamard(x), fmt, group_size=group)
        assert q.rotated and not want.rotated
        assert torch.equal(q.data, want.data) and torch.equal(q.scale, want.scale)
        if want.zero is not None:
            assert torch.equal(q.zero, want.zero)
        for out_dtype in DTYPES:
            got = attnkit.dequantize_kv(q, dtype=out_dtype)
            assert torch.equal(got, hadamard(attnkit.dequantize_kv(want)).to(out_dtype))
        # H is orthonormal: the round trip errs like the format on H x.
        err = (attnkit.dequantize_kv(q).double() - x.double()).norm() / x.double().norm()
        assert err < {"int8": 1e-2, "int4": 2e-1, "fp8_e4m3": 5e-2}[fmt]


def test_hadamard_is_the_orthonormal_matrix(gen):
    """conftest.hadamard (and so the kernels) against the Sylvester matrix in float64."""
    for n in (32, 64, 128, 256):
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < n:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        x = randn(gen, 4, n)
        want = x.double() @ (H / n ** 0.5).T
        assert rel_err(hadamard(x), want) < 1e-6
        assert rel_err(hadamard(hadamard(x)), x) < 1e-6  # H H = I


def test_rotate_bad_input():
    with pytest.raises(ValueError, match="rotate"):
        attnkit.quantize_kv(torch.randn(2, 96), "int8", rotate=True)
    with pytest.raises(ValueError, match="rotate"):
        attnkit.quantize_kv(torch.randn(2, 512), "int8", rotate=True)
    with pytest.raises(ValueError, match="rotate must be a bool"):
        attnkit.quantize_kv(torch.randn(2, 64), "int8", rotate=1)
    q = attnkit.quantize_kv(torch.randn(2, 96), "int8")
    with pytest.raises(ValueError, match="rotated"):
        attnkit.dequantize_kv(q._replace(rotated=True))


def test_rotate_opcheck():
    x = torch.randn(3, 2, 64)
    torch.library.opcheck(torch.ops.attnkit.quantize_kv.default, (x, "int4", 0, True))
    q = attnkit.quantize_kv(x, "int4", rotate=True)
    torch.library.opcheck(torch.ops.attnkit.dequantize_kv.default,
                          (q.data, q.scale, q.zero, "int4", 0, torch.float16, True))
