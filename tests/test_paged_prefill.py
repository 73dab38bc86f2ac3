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


def test_decode_many_queries_on_quantized_pages_raises(gen):
    cache = attnkit.PagedKVCache(16, 16, 2, 64, kv_format="int8")
    cache.append(0, randn(gen, 100, 2, 64), randn(gen, 100, 2, 64))
    q = randn(gen, 1, 17, 4, 64)
    with pytest.raises(NotImplementedError, match="17.*quantized"):
        attnkit.decode(q, cache.k_cache, cache.v_cache, cache.cache_seqlens[:1], block_table=cache.block_table[:1])
