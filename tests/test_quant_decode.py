"""decode and sparse_decode on quantized KV caches (issue 8 part 3, docs/quantization.md):
- exactness: the kernel dequantizes as dequantize_kv does (tight tolerance against the
  float64 reference on the dequantized K/V), every format and grouping, contiguous and paged
  (page sizes 1 and 16, shuffled tables, partial pages), GQA, 1 and 4 queries, sparse page and
  token selections, q in float32 / float16 / bfloat16;
- accuracy: against the float64 reference on the *unquantized* K/V drawn like real ones
  (conftest.realistic_kv) through PagedKVCache(kv_format=...), with the issue's bounds
  (2e-2 int8 / fp8, 8e-2 int4), expected failures where the formats measurably miss them;
- PagedKVCache appends of chunks and single tokens, its key min / max, key offset;
- bad input (ValueError naming the argument), opcheck, torch.compile; CUDA (skipped here)."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, devices_for, paged, randn, realistic_kv, rel_err

FORMATS = [("int8", None), ("int8", 32), ("int4", None), ("int4", 64), ("fp8_e4m3", None)]
FORMAT_IDS = [f"{f}-g{g}" for f, g in FORMATS]
CUDA_DEVICES = [d for d in devices_for("decode") if d != "cpu"]


def dequantized(cache):
    return attnkit.dequantize_kv(cache)


@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_matches_dequantized(gen, kv_format, group_size, page_size, seqlen_q, dtype):
    lens = [37, 130, 5]  # partial last pages at 16
    k, v, table, cache_seqlens = paged(gen, lens, page_size, 2, 64, torch.float32, "cpu")
    k = k * 3 + 1  # off-centre values: scale and zero both matter
    qk = attnkit.quantize_kv(k, kv_format, group_size=group_size)
    qv = attnkit.quantize_kv(v, kv_format, group_size=group_size)
    q = randn(gen, 3, seqlen_q, 8, 64, dtype=dtype)
    out, lse = attnkit.decode(q, qk, qv, cache_seqlens, block_table=table, return_lse=True)
    ref, ref_lse = reference.decode(q, dequantized(qk), dequantized(qv), cache_seqlens, block_table=table)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else FWD_TOL[dtype]  # dtype: the rounding of q and out only
    assert_close(out, ref, tol)
    assert_lse_close(lse, ref_lse, tol)


@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
def test_contiguous_matches_dequantized(gen, kv_format, group_size):
    k, v = randn(gen, 2, 300, 4, 128), randn(gen, 2, 300, 4, 128)
    qk = attnkit.quantize_kv(k, kv_format, group_size=group_size)
    qv = attnkit.quantize_kv(v, kv_format, group_size=group_size)
    q = randn(gen, 2, 1, 4, 128)  # heads_q == heads_kv
    lens = torch.tensor([300, 211], dtype=torch.int32)
    out = attnkit.decode(q, qk, qv, lens, window=100)
    ref, _ = reference.decode(q, dequantized(qk), dequantized(qv), lens, window=100)
    assert_close(out, ref, 1e-5)


@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("tokens", [False, True], ids=["pages", "tokens"])
def test_sparse_matches_dequantized(gen, kv_format, group_size, tokens):
    lens = [100, 64]
    k, v, table, cache_seqlens = paged(gen, lens, 16, 2, 64, torch.float32, "cpu")
    qk = attnkit.quantize_kv(k, kv_format, group_size=group_size)
    qv = attnkit.quantize_kv(v, kv_format, group_size=group_size)
    q = randn(gen, 2, 2, 4, 64)
    if tokens:
        indices = torch.randint(-5, 110, (2, 2, 40), generator=gen, dtype=torch.int32)
        out = attnkit.sparse_decode_tokens(q, qk, qv, cache_seqlens, table, indices)
    else:
        indices = torch.tensor([[[0, 3, 6, -1], [6, 1, -1, 9]], [[2, 0, -1, -1], [3, 1, 2, 0]]], dtype=torch.int32)
        out = attnkit.sparse_decode(q, qk, qv, cache_seqlens, table, indices)
    ref, _ = reference.sparse_decode(q, dequantized(qk), dequantized(qv), cache_seqlens, table, indices,
                                     tokens_per_index=1 if tokens else 16)
    assert_close(out, ref, 1e-5)


@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_keys_match_dequantized(gen, kv_format, group_size, dtype):
    """K stored as H k (rotate=True): decode rotates q instead and equals the reference on
    the dequantized (rotated back) keys; dense paged, sparse pages and sparse tokens."""
    lens = [37, 130, 5]
    k, v, table, cache_seqlens = paged(gen, lens, 16, 2, 128, torch.float32, "cpu")
    qk = attnkit.quantize_kv(k * 3 + 1, kv_format, group_size=group_size, rotate=True)
    qv = attnkit.quantize_kv(v, kv_format, group_size=group_size)
    q = randn(gen, 3, 2, 8, 128, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else FWD_TOL[dtype]
    out, lse = attnkit.decode(q, qk, qv, cache_seqlens, block_table=table, return_lse=True)
    ref, ref_lse = reference.decode(q, dequantized(qk), dequantized(qv), cache_seqlens, block_table=table)
    assert_close(out, ref, tol)
    assert_lse_close(lse, ref_lse, tol)
    indices = torch.randint(-2, 140, (3, 2, 50), generator=gen, dtype=torch.int32)
    out = attnkit.sparse_decode_tokens(q, qk, qv, cache_seqlens, table, indices)
    ref, _ = reference.sparse_decode(q, dequantized(qk), dequantized(qv), cache_seqlens, table, indices,
                                     tokens_per_index=1)
    assert_close(out, ref, tol)


def test_unselected_nan_pages_are_not_read(gen):
    """A NaN scale on a page that no selection names must not reach the output."""
    k, v, table, lens = paged(gen, [64], 16, 1, 32, torch.float32, "cpu")
    qk, qv = attnkit.quantize_kv(k, "int8"), attnkit.quantize_kv(v, "int8")
    qk.scale[table[0, 1]] = float("nan")
    indices = torch.tensor([[[0, 2, 3]]], dtype=torch.int32)
    q = randn(gen, 1, 1, 2, 32)
    out = attnkit.sparse_decode(q, qk, qv, lens, table, indices)
    assert torch.isfinite(out).all()


# ---- accuracy against the unquantized K / V (the bounds) --------------------------------

BOUND = {"int8": 2e-2, "fp8_e4m3": 2e-2, "int4": 8e-2}
# (format, group, center_keys, rotate_keys) -> measured relative error of decode at seeds 0 and 1
# (docs/quantization.md); the entries missing the bound are expected failures (strict:
# they must keep missing). The defaults are centre and rotate for int8 / int4, centre for fp8.
ACCURACY = [
    ("int8", None, False, False, None),
    ("int8", None, True, True, None),
    ("fp8_e4m3", None, False, False, "measured 2.24e-2 > 2e-2 without a K offset"),
    ("fp8_e4m3", None, True, False, None),
    ("int4", None, True, False, "measured 9.05e-2 > 8e-2 without rotating K"),
    ("int4", None, True, True, None),
    ("int4", 32, False, False, "measured 1.08e-1 > 8e-2 without a K offset"),
    ("int4", 32, True, False, None),
    ("int4", 32, True, True, None),
]


def filled_cache(k, v, kv_format, group_size, center_keys, page_size=16, prompt=256, rotate_keys=None):
    """A PagedKVCache holding k, v (batch, seqlen, kv_heads, head_dim): a prompt chunk per
    sequence, then single tokens for all sequences at once, then the rest as a chunk."""
    batch, seqlen, heads, dim = k.shape
    pages = batch * (-(-seqlen // page_size)) + 3
    cache = attnkit.PagedKVCache(pages, page_size, heads, dim, max_seqs=batch, kv_format=kv_format,
                                 group_size=group_size, center_keys=center_keys, rotate_keys=rotate_keys,
                                 device=k.device, dtype=k.dtype)
    for b in range(batch):
        cache.append(b, k[b, :prompt], v[b, :prompt])
    for t in range(prompt, prompt + 20):
        cache.append(list(range(batch)), k[:, t], v[:, t])
    for b in range(batch):
        cache.append(b, k[b, prompt + 20:], v[b, prompt + 20:])
    return cache


@pytest.mark.parametrize("kv_format,group_size,center_keys,rotate_keys,xfail", ACCURACY,
                         ids=[f"{f}-g{g}-{'centred' if c else 'raw'}{'-rotated' if r else ''}"
                              for f, g, c, r, _ in ACCURACY])
def test_accuracy_against_unquantized(kv_format, group_size, center_keys, rotate_keys, xfail):
    errors = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        q, k, v = realistic_kv(gen, 2, 4096, 8, 128)
        cache = filled_cache(k, v, kv_format, group_size, center_keys, rotate_keys=rotate_keys)
        assert cache.k_cache.rotated == rotate_keys
        out = attnkit.decode(q, cache.k_cache, cache.v_cache, cache.cache_seqlens, block_table=cache.block_table)
        ref, _ = reference.decode(q, k, v, cache.cache_seqlens)
        errors.append(rel_err(out, ref))
    if xfail:
        assert errors[0] > BOUND[kv_format], f"now meets the bound ({errors[0]:.3e}): update docs/quantization.md"
        pytest.xfail(f"{xfail} (this run: {errors[0]:.3e})")
    assert max(errors) <= BOUND[kv_format], f"relative errors {errors} > {BOUND[kv_format]:.0e}"


def test_default_rotation():
    """rotate_keys defaults to on for int8 / int4 at head_dims 32 .. 256, off for fp8 and others."""
    assert attnkit.PagedKVCache(2, 4, 1, 128, kv_format="int4").k_cache.rotated
    assert attnkit.PagedKVCache(2, 4, 1, 64, kv_format="int8", group_size=32).k_cache.rotated
    assert not attnkit.PagedKVCache(2, 4, 1, 128, kv_format="fp8_e4m3").k_cache.rotated
    assert not attnkit.PagedKVCache(2, 4, 1, 96, kv_format="int4").k_cache.rotated
    assert not attnkit.PagedKVCache(2, 4, 1, 96).rotate_keys


# ---- PagedKVCache -----------------------------------------------------------------------------

@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("center_keys,rotate_keys", [(False, False), (True, False), (True, True), (False, True)])
def test_cache_stores_quantize_kv(gen, kv_format, group_size, center_keys, rotate_keys):
    """Pages hold quantize_kv of the rows (keys minus the key offset, rotated when asked),
    slot by slot; key_min / key_max are those of the original keys; decode equals the
    reference on the stored values."""
    k, v = randn(gen, 2, 70, 2, 64) * 2 + 1, randn(gen, 2, 70, 2, 64)
    cache = filled_cache(k, v, kv_format, group_size, center_keys, page_size=16, prompt=30, rotate_keys=rotate_keys)
    assert cache.k_cache.rotated == rotate_keys and not cache.v_cache.rotated
    offset = cache.key_offset if center_keys else torch.zeros(2, 2, 64)
    if center_keys:
        torch.testing.assert_close(offset, k[:, :30].mean(1))
    for b in range(2):
        pages = cache.pages(b)
        rows = torch.cat([torch.arange(p * 16, p * 16 + 16) for p in pages])[:70]
        want_k = attnkit.quantize_kv(k[b] - offset[b], kv_format, group_size=group_size, rotate=rotate_keys)
        want_v = attnkit.quantize_kv(v[b], kv_format, group_size=group_size)
        for got, want in ((cache.k_cache, want_k), (cache.v_cache, want_v)):
            assert torch.equal(got.data.flatten(0, 1)[rows], want.data)
            assert torch.equal(got.scale.flatten(0, 1)[rows], want.scale)
            if want.zero is not None:
                assert torch.equal(got.zero.flatten(0, 1)[rows], want.zero)
        for i, p in enumerate(pages):
            chunk = k[b, 16 * i:16 * i + 16]
            assert torch.equal(cache.key_min[p], chunk.amin(0)) and torch.equal(cache.key_max[p], chunk.amax(0))
    q = randn(gen, 2, 1, 4, 64)
    out = attnkit.decode(q, cache.k_cache, cache.v_cache, cache.cache_seqlens, block_table=cache.block_table)
    ref, _ = reference.decode(q, dequantized(cache.k_cache), dequantized(cache.v_cache), cache.cache_seqlens,
                              block_table=cache.block_table)
    assert_close(out, ref, 1e-5)


def test_cache_reuses_freed_pages(gen):
    cache = attnkit.PagedKVCache(4, 16, 1, 32, kv_format="int4")
    k = randn(gen, 40, 1, 32)
    cache.append(0, k, k)
    cache.free(0)
    cache.append(0, k[:3] + 5, k[:3])
    page = cache.pages(0)[0]
    assert torch.equal(cache.key_min[page], (k[:3] + 5).amin(0)) and torch.equal(cache.key_offset[0],
                                                                                   (k[:3] + 5).mean(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rotate_keys=True), "rotate_keys"),
    (dict(kv_format="int4", rotate_keys=1), "rotate_keys"),
    (dict(kv_format="int3"), "kv_format"),
    (dict(kv_format="fp8_e4m3", group_size=32), "group_size"),
    (dict(kv_format="int8", group_size=48), "group_size"),
    (dict(group_size=32), "group_size"),
])
def test_cache_bad_format(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attnkit.PagedKVCache(4, 16, 1, 64, **kwargs)
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.PagedKVCache(4, 16, 1, 48, kv_format="int8")
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.PagedKVCache(4, 16, 1, 512, kv_format="int8")
    with pytest.raises(ValueError, match="rotate_keys"):
        attnkit.PagedKVCache(4, 16, 1, 96, kv_format="int8", rotate_keys=True)


# ---- bad input, opcheck, compile ----------------------------------------------------------------

def small(gen, kv_format="int8"):
    k, v, table, lens = paged(gen, [20, 7], 8, 2, 32, torch.float32, "cpu")
    return (randn(gen, 2, 1, 4, 32), attnkit.quantize_kv(k, kv_format), attnkit.quantize_kv(v, kv_format), lens,
            table)


def test_bad_input(gen):
    q, qk, qv, lens, table = small(gen)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        attnkit.decode(q, qk, qv.data, lens, block_table=table)
    with pytest.raises(ValueError, match="v_cache must have the kv_format"):
        attnkit.decode(q, qk, attnkit.quantize_kv(dequantized(qv), "fp8_e4m3"), lens, block_table=table)
    with pytest.raises(ValueError, match="k_scale"):
        attnkit.decode(q, qk._replace(scale=qk.scale[..., :0]), qv, lens, block_table=table)
    with pytest.raises(ValueError, match="v_zero"):
        attnkit.decode(q, qk, qv._replace(zero=qv.zero.double()), lens, block_table=table)
    with pytest.raises(ValueError, match="k_cache"):
        attnkit.decode(q, qk._replace(data=qk.data.float()), qv, lens, block_table=table)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        attnkit.decode(q, qk._replace(data=qk.data.transpose(0, 1).contiguous().transpose(0, 1)), qv, lens,
                       block_table=table)
    with pytest.raises(ValueError, match="bytes per row"):
        attnkit.decode(q, qk._replace(kv_format="int4"), qv._replace(kv_format="int4"), lens, block_table=table)
    with pytest.raises(ValueError, match="multiple of 32"):
        attnkit.decode(q[..., :16], qk, qv, lens, block_table=table)
    with pytest.raises(ValueError, match="kv_format"):
        attnkit.sparse_decode(q, qk._replace(kv_format="int2"), qv._replace(kv_format="int2"), lens, table,
                              torch.zeros(2, 2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_scale is only for a quantized cache"):
        torch.ops.attnkit.decode(q, dequantized(qk), dequantized(qv), lens, table, 1.0, 0.0, -1, k_scale=qk.scale)
    with pytest.raises(ValueError, match="v_cache.rotated"):
        attnkit.decode(q, qk, qv._replace(rotated=True), lens, block_table=table)
    with pytest.raises(ValueError, match="k_cache.rotated must be a bool"):
        attnkit.decode(q, qk._replace(rotated=None), qv, lens, block_table=table)
    with pytest.raises(ValueError, match="rotated_keys is only for a quantized cache"):
        torch.ops.attnkit.decode(q, dequantized(qk), dequantized(qv), lens, table, 1.0, 0.0, -1, rotated_keys=True)
    big = attnkit.quantize_kv(torch.randn(4, 8, 2, 96), "int8")
    with pytest.raises(ValueError, match="rotated_keys"):
        attnkit.decode(torch.randn(2, 1, 4, 96), big._replace(rotated=True), big, lens, block_table=table)


def test_opcheck(gen):
    q, qk, qv, lens, table = small(gen, "int4")
    torch.library.opcheck(torch.ops.attnkit.decode.default,
                          (q, qk.data, qv.data, lens, table, 0.2, 0.0, -1, "int4", 0, qk.scale, qk.zero, qv.scale,
                           qv.zero))
    q, qk, qv, lens, table = small(gen, "fp8_e4m3")
    indices = torch.tensor([[[0, 2], [1, -1]], [[0, -1], [0, 1]]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.attnkit.sparse_decode.default,
                          (q, qk.data, qv.data, lens, table, indices, 8, 0.2, 0.0, "fp8_e4m3", 0, qk.scale, None,
                           qv.scale, None))


def test_rotated_and_append_opcheck(gen):
    q, qk, qv, lens, table = small(gen, "int8")
    qk = attnkit.quantize_kv(dequantized(qk), "int8", rotate=True)
    torch.library.opcheck(torch.ops.attnkit.decode.default,
                          (q, qk.data, qv.data, lens, table, 0.2, 0.0, -1, "int8", 0, qk.scale, qk.zero, qv.scale,
                           qv.zero, True))
    cache = attnkit.PagedKVCache(4, 8, 2, 64, kv_format="int4", group_size=32, max_seqs=2)
    k, v = randn(gen, 5, 2, 64), randn(gen, 5, 2, 64)
    cache.append(0, k[:2], v[:2])
    torch.library.opcheck(torch.ops.attnkit.paged_cache_append_quantized.default,
                          (cache.k_pages, cache.v_pages, cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero,
                           cache.key_min, cache.key_max, k, v, torch.tensor([2, 3, 9, 10, 11]), cache.key_offset,
                           torch.tensor([0, 0, 1, 1, 1]), "int4", 32, True))


def test_append_quantized_bad_input(gen):
    cache = attnkit.PagedKVCache(4, 8, 2, 64, kv_format="int8", max_seqs=2)
    k = randn(gen, 3, 2, 64)
    args = [cache.k_pages, cache.v_pages, cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero, cache.key_min,
            cache.key_max, k, k, torch.tensor([0, 1, 2]), cache.key_offset, torch.tensor([0, 0, 1]), "int8", 0, True]
    cases = [
        (dict(), None),
        ({2: cache.k_scale[..., :0]}, "k_scale"),
        ({3: None}, "k_zero"),
        ({10: torch.tensor([0, 1, 40])}, "slot_mapping"),
        ({12: torch.tensor([0, 0, 2])}, "token_seq"),
        ({12: None}, "key_offset and token_seq"),
        ({13: "int2"}, "kv_format"),
        ({0: cache.k_pages.float()}, "k_pages"),
        ({8: k.double()}, "k"),
    ]
    for change, match in cases:
        call = list(args)
        for i, value in change.items():
            call[i] = value
        if match is None:
            torch.ops.attnkit.paged_cache_append_quantized(*call)
            continue
        with pytest.raises(ValueError, match=match):
            torch.ops.attnkit.paged_cache_append_quantized(*call)


def test_torch_compile_fullgraph(gen):
    q, qk, qv, lens, table = small(gen)

    def f(q, kd, ks, kz, vd, vs, vz, lens, table):
        return attnkit.decode(q, attnkit.QuantizedKV(kd, ks, kz, "int8"), attnkit.QuantizedKV(vd, vs, vz, "int8"),
                              lens, block_table=table)

    args = (q, *qk[:3], *qv[:3], lens, table)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args))


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------

@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
def test_cuda_matches_cpu(gen, device, kv_format, group_size):
    k, v, table, lens = paged(gen, [300, 17], 16, 2, 128, torch.float32, "cpu")
    qk = attnkit.quantize_kv(k, kv_format, group_size=group_size)
    qv = attnkit.quantize_kv(v, kv_format, group_size=group_size)
    q = randn(gen, 2, 1, 8, 128, dtype=torch.bfloat16)
    want = attnkit.decode(q, qk, qv, lens, block_table=table)
    to = lambda c: attnkit.QuantizedKV(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in c))  # noqa: E731
    got = attnkit.decode(q.to(device), to(qk), to(qv), lens.to(device), block_table=table.to(device))
    assert_close(got, reference.decode(q, dequantized(qk), dequantized(qv), lens, block_table=table)[0],
                 FWD_TOL[torch.bfloat16])
    assert rel_err(got, want) <= FWD_TOL[torch.bfloat16]


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("kv_format,group_size", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cache_matches_cpu(gen, device, kv_format, group_size, dtype):
    """The fused CUDA append (quantize, offset, rotation, key bounds in one kernel) writes the
    bits of the CPU one, and decode on it (queries rotated in the kernel) meets the reference."""
    k = (randn(gen, 2, 300, 2, 128) * 2 + 1).to(dtype)
    v = randn(gen, 2, 300, 2, 128).to(dtype)
    cpu = filled_cache(k, v, kv_format, group_size, True, prompt=40)
    gpu = filled_cache(k.to(device), v.to(device), kv_format, group_size, True, prompt=40)
    for name in ("k_pages", "v_pages", "k_scale", "k_zero", "v_scale", "v_zero", "key_offset", "key_min", "key_max",
                 "block_table", "cache_seqlens"):
        want, got = getattr(cpu, name), getattr(gpu, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert torch.equal(got.cpu(), want), name
    q = randn(gen, 2, 1, 8, 128, dtype=torch.bfloat16)
    out = attnkit.decode(q.to(device), gpu.k_cache, gpu.v_cache, gpu.cache_seqlens, block_table=gpu.block_table)
    ref, _ = reference.decode(q, dequantized(cpu.k_cache), dequantized(cpu.v_cache), cpu.cache_seqlens,
                              block_table=cpu.block_table)
    assert_close(out, ref, FWD_TOL[torch.bfloat16])
