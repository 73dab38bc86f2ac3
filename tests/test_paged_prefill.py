"""Paged prefill: attention_varlen(..., block_table=, seqused_k=) over a paged KV cache, and
decode() with more than 16 queries (routed to it), against the float64 reference over the
gathered pages: page sizes 1 / 3 / 16 / 256, shuffled tables, partial last pages, queries
longer than their keys (rows that see nothing), seqused_k, windows, softcap, GQA, poisoned
unused pages; inference-only; opcheck, torch.compile and bad input."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, cu_seqlens, devices_for, paged, randn

DEVICES = devices_for("attention")
NEG_INF = float("-inf")


def poison_unused(k, v, table, lens):
    """NaN into every page slot no sequence uses: a kernel that reads one shows NaN."""
    used = torch.zeros(k.shape[:2], dtype=torch.bool)
    page_size = k.shape[1]
    for b, n in enumerate(lens.tolist()):
        for t in range(n):
            used[int(table[b, t // page_size]), t % page_size] = True
    k[~used.to(k.device)] = float("nan")
    v[~used.to(v.device)] = float("nan")


def run_paged(gen, len_q, len_k, page_size, heads, kv_heads, d, dtype, device, seqused=None, **opts):
    k, v, table, lens_k = paged(gen, len_k, page_size, kv_heads, d, dtype, device)
    # With seqused_k the keys past it must not be read either.
    poison_unused(k, v, table, torch.tensor(seqused if seqused is not None else len_k))
    q = randn(gen, sum(len_q), heads, d, dtype=dtype, device=device)
    cu_q, cu_k = cu_seqlens(len_q, device), cu_seqlens(len_k, device)
    used = None if seqused is None else torch.tensor(seqused, dtype=torch.int32, device=device)
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, max(len_q), max(len_k), block_table=table, seqused_k=used,
                                       return_lse=True, **opts)
    ref, ref_lse = reference.attention_varlen(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu_q.cpu(),
                                              cu_k.cpu(), block_table=table.cpu(),
                                              seqused_k=None if used is None else used.cpu(), **opts)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (heads, sum(len_q))
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    assert (out.cpu()[(ref_lse == NEG_INF).T] == 0).all(), "rows that see no key must be exactly 0"
    return out, lse


# (len_q per sequence, len_k per sequence, page_size, heads, kv_heads, head_dim, options)
CASES = [
    ([5, 1, 40], [5, 17, 200], 1, 4, 2, 64, dict(causal=True)),
    ([33, 7, 70], [90, 7, 70], 3, 4, 1, 64, dict(causal=True)),                    # MQA, len_q == len_k
    ([100, 64, 1], [300, 64, 257], 16, 8, 2, 128, dict(causal=True, window=(40, 0))),
    ([130, 3], [65, 600], 16, 2, 2, 64, dict(causal=True)),                         # len_q > len_k: empty rows
    ([17, 200], [500, 1000], 256, 4, 4, 64, dict(causal=False, window=(30, 10), softcap=5.0)),
    ([64, 0, 9], [64, 33, 0], 16, 2, 1, 32, dict(causal=True)),                     # empty sequences
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"p{c[2]}-q{c[0]}-k{c[1]}")
def test_paged_varlen(case, device, gen):
    len_q, len_k, page_size, h, hkv, d, opts = case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run_paged(gen, len_q, len_k, page_size, h, hkv, d, dtype, device, **opts)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_varlen_bf16_and_seqused(device, gen):
    run_paged(gen, [40, 9, 300], [100, 50, 700], 16, 4, 2, 64, torch.bfloat16, device, seqused=[60, 50, 512],
              causal=True)
    run_paged(gen, [3, 20], [40, 80], 3, 2, 1, 64, torch.bfloat16, device, seqused=[0, 79], causal=False)


@pytest.mark.parametrize("device", DEVICES)
def test_seqused_k_on_packed_keys(device, gen):
    """seqused_k without pages: sequence b reads keys cu_seqlens_k[b] .. + seqused_k[b] only."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    len_q, len_k, used = [30, 5, 64], [80, 10, 64], [50, 10, 1]
    q = randn(gen, sum(len_q), 4, 64, dtype=dtype, device=device)
    k, v = (randn(gen, sum(len_k), 2, 64, dtype=dtype, device=device) for _ in range(2))
    cu_q, cu_k = cu_seqlens(len_q, device), cu_seqlens(len_k, device)
    for b in range(3):  # keys past seqused_k are NaN: never read
        k[cu_k[b] + used[b]:cu_k[b + 1]] = float("nan")
    used_t = torch.tensor(used, dtype=torch.int32, device=device)
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, 64, 80, causal=True, seqused_k=used_t, return_lse=True)
    ref, ref_lse = reference.attention_varlen(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu_q.cpu(),
                                              cu_k.cpu(), causal=True, seqused_k=used_t.cpu())
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [17, 64, 300])
@pytest.mark.parametrize("page_size", [None, 1, 16], ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_decode_many_queries(page_size, seqlen_q, device, gen):
    """decode() with more than 16 queries equals the reference decode (same convention:
    cache_seqlens counts the new tokens, queries are the last positions, causal)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [seqlen_q, seqlen_q + 5, 700]
    if page_size is None:
        k = randn(gen, 3, 701, 2, 64, dtype=dtype, device=device)
        v = randn(gen, 3, 701, 2, 64, dtype=dtype, device=device)
        table, seqlens = None, torch.tensor(lens, dtype=torch.int32, device=device)
    else:
        k, v, table, seqlens = paged(gen, lens, page_size, 2, 64, dtype, device)
    q = randn(gen, 3, seqlen_q, 8, 64, dtype=dtype, device=device)
    for window in (-1, 100):
        out, lse = attnkit.decode(q, k, v, seqlens, block_table=table, window=window, softcap=3.0, return_lse=True)
        ref, ref_lse = reference.decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), seqlens.cpu(),
                                        block_table=None if table is None else table.cpu(), window=window,
                                        softcap=3.0)
        assert out.shape == q.shape and lse.shape == (3, 8, seqlen_q)
        assert_close(out, ref, FWD_TOL[dtype], "out")
        assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


def test_decode_16_and_17_queries_agree(gen):
    """The decode kernel (16 queries) and the paged prefill route (17) give the same rows."""
    k, v, table, lens = paged(gen, [100, 350], 16, 2, 64, torch.float32, "cpu")
    q = randn(gen, 2, 17, 4, 64)
    many = attnkit.decode(q, k, v, lens, block_table=table)
    few = attnkit.decode(q[:, 1:].contiguous(), k, v, lens, block_table=table)
    assert_close(many[:, 1:], few.double(), 1e-5, "last 16 queries")


def test_inference_only(gen):
    k, v, table, lens = paged(gen, [40], 16, 2, 64, torch.float32, "cpu")
    q = randn(gen, 40, 2, 64).requires_grad_()
    out = attnkit.attention_varlen(q, k, v, cu_seqlens([40]), cu_seqlens([40]), 40, 40, block_table=table)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_opcheck_and_compile(gen):
    k, v, table, lens = paged(gen, [40, 70], 16, 2, 64, torch.float32, "cpu")
    q = randn(gen, 50, 4, 64)
    cu_q, cu_k = cu_seqlens([20, 30]), cu_seqlens([40, 70])
    args = (q, k, v, cu_q, cu_k, table, None, 30, 70, True, 0.125, -1, -1, 0.0)
    torch.library.opcheck(torch.ops.attnkit.attention_varlen_kv.default, args)
    fn = lambda q: attnkit.attention_varlen(q, k, v, cu_q, cu_k, 30, 70, causal=True, block_table=table)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q), fn(q))


BAD = {
    "k-rank": (lambda k, table: (k[:, 0], table), ValueError, "k must have 4 dimensions"),
    "page-id": (lambda k, table: (k, table.masked_fill(table == table[0, 0], 999)), ValueError, "block_table"),
    "table-rows": (lambda k, table: (k, table[:1]), ValueError, "block_table must have batch"),
    "table-dtype": (lambda k, table: (k, table.long()), ValueError, "block_table must be int32"),
    "capacity": (lambda k, table: (k, table[:, :1]), ValueError, "more than block_table holds"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input(name, gen):
    k, v, table, lens = paged(gen, [40, 70], 16, 2, 64, torch.float32, "cpu")
    q = randn(gen, 50, 4, 64)
    make, err, match = BAD[name]
    k2, table2 = make(k, table)
    with pytest.raises(err, match=match):
        attnkit.attention_varlen(q, k2, v if k2.dim() == 4 else v[:, 0], cu_seqlens([20, 30]), cu_seqlens([40, 70]),
                                 30, 70, block_table=table2)
    with pytest.raises(ValueError, match="seqused_k"):
        attnkit.attention_varlen(q, k, v, cu_seqlens([20, 30]), cu_seqlens([40, 70]), 30, 70, block_table=table,
                                 seqused_k=torch.tensor([-1, 3], dtype=torch.int32))


# ---------------------------------------------------------------- quantized pages

QUANT_FORMATS = [("int8", None), ("int8", 32), ("int4", None), ("int4", 64), ("fp8_e4m3", None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_format,group_size", QUANT_FORMATS, ids=[f"{f}-g{g}" for f, g in QUANT_FORMATS])
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
def test_quantized_pages(kv_format, group_size, rotate, device, gen):
    """attention_varlen over quantized pages (QuantizedKV, as PagedKVCache(kv_format=...)
    holds them) equals the reference over its own dequantized pages (exact up to q's dtype):
    page sizes 1 / 16, partial last pages, shuffled tables, GQA, rotated keys, windows,
    sinks and ALiBi; unused pages poisoned with NaN scales."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 1e-5 if dtype == torch.float32 else FWD_TOL[dtype]
    slopes = torch.rand(4, generator=gen).to(device)
    for page_size, len_q, len_k, opts in [(16, [40, 1, 130], [300, 17, 129], dict(causal=True)),
                                          (1, [20, 33], [20, 90], dict(causal=True, window=(24, 0), sink_tokens=3,
                                                                       alibi_slopes=slopes))]:
        k, v, table, lens = paged(gen, len_k, page_size, 2, 128, torch.float32, device)
        qk = attnkit.quantize_kv(k * 3 + 1, kv_format, group_size=group_size, rotate=rotate)
        qv = attnkit.quantize_kv(v, kv_format, group_size=group_size)
        used = torch.zeros(k.shape[:2], dtype=torch.bool)
        for b, n in enumerate(len_k):
            for t in range(n):
                used[int(table[b, t // page_size]), t % page_size] = True
        for cache in (qk, qv):  # a NaN scale on every unused slot: reading one poisons the output
            cache.scale[~used.to(device)] = float("nan")
        q = randn(gen, sum(len_q), 4, 128, dtype=dtype, device=device)
        cu_q, cu_k = cu_seqlens(len_q, device), cu_seqlens(len_k, device)
        out, lse = attnkit.attention_varlen(q, qk, qv, cu_q, cu_k, max(len_q), max(len_k), block_table=table,
                                            return_lse=True, **opts)
        ref_opts = dict(opts, alibi_slopes=slopes.cpu()) if "alibi_slopes" in opts else opts
        ref, ref_lse = reference.attention_varlen(q.cpu().double(), attnkit.dequantize_kv(qk).cpu().double(),
                                                  attnkit.dequantize_kv(qv).cpu().double(), cu_q.cpu(), cu_k.cpu(),
                                                  block_table=table.cpu(), **ref_opts)
        assert_close(out, ref, tol, f"out page {page_size}")
        assert_lse_close(lse, ref_lse, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_packed_keys_and_decode(device, gen):
    """Quantized packed (not paged) varlen keys, and decode() with 40 queries on a quantized
    PagedKVCache (routed to the paged prefill), against the dequantized reference."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 1e-5 if dtype == torch.float32 else FWD_TOL[dtype]
    len_q, len_k = [30, 7], [100, 7]
    k, v = (randn(gen, sum(len_k), 2, 64, device=device) for _ in range(2))
    qk, qv = (attnkit.quantize_kv(t, "int8", group_size=32) for t in (k, v))
    q = randn(gen, sum(len_q), 4, 64, dtype=dtype, device=device)
    cu_q, cu_k = cu_seqlens(len_q, device), cu_seqlens(len_k, device)
    out = attnkit.attention_varlen(q, qk, qv, cu_q, cu_k, 30, 100, causal=True)
    ref, _ = reference.attention_varlen(q.cpu().double(), attnkit.dequantize_kv(qk).cpu().double(),
                                        attnkit.dequantize_kv(qv).cpu().double(), cu_q.cpu(), cu_k.cpu(), causal=True)
    assert_close(out, ref, tol, "packed")

    cache = attnkit.PagedKVCache(64, 16, 2, 64, dtype=dtype, device=device, max_seqs=2, kv_format="int4")
    for s, n in enumerate((300, 41)):
        cache.append(s, randn(gen, n, 2, 64, dtype=dtype, device=device), randn(gen, n, 2, 64, dtype=dtype,
                                                                               device=device))
    q = randn(gen, 2, 40, 8, 64, dtype=dtype, device=device)
    out = attnkit.decode(q, cache.k_cache, cache.v_cache, cache.cache_seqlens, block_table=cache.block_table)
    ref, _ = reference.decode(q.cpu().double(), attnkit.dequantize_kv(cache.k_cache).cpu().double(),
                              attnkit.dequantize_kv(cache.v_cache).cpu().double(), cache.cache_seqlens.cpu(),
                              block_table=cache.block_table.cpu())
    assert_close(out, ref, tol, "decode 40 queries int4")


def test_quantized_bad_input(gen):
    k = attnkit.quantize_kv(torch.randn(4, 16, 2, 64, generator=gen), "int8")
    v = attnkit.quantize_kv(torch.randn(4, 16, 2, 64, generator=gen), "int4")
    q = torch.randn(10, 2, 64, generator=gen)
    cu_q, cu_k = cu_seqlens([10]), cu_seqlens([30])
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    with pytest.raises(ValueError, match="kv_format and group_size of k_cache"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, 10, 30, block_table=table)
    with pytest.raises(ValueError, match="both be attnkit.QuantizedKV"):
        attnkit.attention_varlen(q, k, torch.randn(4, 16, 2, 64), cu_q, cu_k, 10, 30, block_table=table)
    q48 = torch.randn(10, 2, 48, generator=gen)
    k48 = attnkit.quantize_kv(torch.randn(4, 16, 2, 48, generator=gen), "fp8_e4m3")
    with pytest.raises(ValueError, match="multiple of 32"):
        attnkit.attention_varlen(q48, k48, k48, cu_q, cu_k, 10, 30, block_table=table)
    out = attnkit.attention_varlen(q.requires_grad_(), k, k, cu_q, cu_k, 10, 30, block_table=table)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_quantized_opcheck_and_compile(gen):
    k, v, table, lens = paged(gen, [40, 70], 16, 2, 64, torch.float32, "cpu")
    qk, qv = attnkit.quantize_kv(k, "int4", rotate=True), attnkit.quantize_kv(v, "int4")
    q = randn(gen, 50, 4, 64)
    cu_q, cu_k = cu_seqlens([20, 30]), cu_seqlens([40, 70])
    args = (q, qk.data, qv.data, cu_q, cu_k, table, None, 30, 70, True, 0.125, -1, -1, 0.0, 0, None, "int4", 0,
            qk.scale, qk.zero, qv.scale, qv.zero, True)
    torch.library.opcheck(torch.ops.attnkit.attention_varlen_kv.default, args)
    fn = lambda q: attnkit.attention_varlen(q, qk, qv, cu_q, cu_k, 30, 70, causal=True, block_table=table)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), fn(q))
