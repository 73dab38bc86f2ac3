"""attnkit.decode against the float64 reference (reference.decode): contiguous and paged
caches, page sizes 1, 16 and 64 with shuffled page tables, 1..16 queries, GQA 8:1 and 4:2,
window, softcap, lengths below / at / across page boundaries and tile edges, strided caches,
opcheck, torch.compile, bad input; and the lean (stream-K) schedule through the op: batch
mixes with empty and long sequences, windows, head groups and thread counts from 1 to 16."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, devices_for, paged, randn, skip_unsupported

DEVICES = devices_for("decode")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")
HEADS = {"gqa8:1": (8, 1), "gqa4:2": (4, 2), "mha2:2": (2, 2)}


def check(q, k_cache, v_cache, lens, table=None, **opts):
    """decode (out and lse) equals reference.decode; queries that see no key are exactly 0."""
    out, lse = attnkit.decode(q, k_cache, v_cache, lens, block_table=table, return_lse=True, **opts)
    ref, ref_lse = reference.decode(q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), lens.cpu(),
                                    block_table=None if table is None else table.cpu(), **opts)
    assert out.dtype == q.dtype and out.device == q.device and out.shape == q.shape
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.device == q.device
    assert_close(out, ref, FWD_TOL[q.dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[q.dtype])
    assert (out.cpu()[(ref_lse == NEG_INF).transpose(1, 2)] == 0).all(), "queries that see no key must be exactly 0"
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q", [1, 3, 16])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_decode_contiguous(heads, seqlen_q, dtype, device, gen):
    skip_unsupported("decode", device, dtype)
    h, hkv = heads
    lens = torch.tensor([1, 16, 1000, 4100], dtype=torch.int32, device=device)  # 4100 = full capacity
    q = randn(gen, 4, seqlen_q, h, 64, dtype=dtype, device=device)
    k = randn(gen, 4, 4100, hkv, 64, dtype=dtype, device=device)
    v = randn(gen, 4, 4100, hkv, 64, dtype=dtype, device=device)
    check(q, k, v, lens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [1, 3, 16])
@pytest.mark.parametrize("heads", [(8, 1), (4, 2)], ids=["gqa8:1", "gqa4:2"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_decode_paged(page_size, heads, seqlen_q, device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # one token, below a page, exactly one page, one past two pages, long (across split chunks)
    lens = [1, page_size // 2 + 1, page_size, 2 * page_size + 1, 1000, 4100]
    k, v, table, lens = paged(gen, lens, page_size, heads[1], 64, dtype, device)
    q = randn(gen, len(lens), seqlen_q, heads[0], 64, dtype=dtype, device=device)
    check(q, k, v, lens, table)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_decode_paged_half_window_softcap(page_size, dtype, device, gen):
    lens = [1, page_size + 1, 700, 1500, 4100]
    k, v, table, lens = paged(gen, lens, page_size, 2, 128, dtype, device)
    q = randn(gen, len(lens), 2, 8, 128, dtype=dtype, device=device)
    check(q, k, v, lens, table)
    check(q, k, v, lens, table, window=100, softcap=20.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [0, 1, 257, 1500])
def test_decode_window_softcap_odd_head_dim(window, device, gen):
    dtype = torch.float16 if device == "cuda" else torch.float32
    d = 64 if device == "cuda" else 40
    lens = torch.tensor([5, 300, 1300, 4100], dtype=torch.int32, device=device)
    q = randn(gen, 4, 4, 6, d, dtype=dtype, device=device)
    k, v = randn(gen, 4, 4101, 3, d, dtype=dtype, device=device), randn(gen, 4, 4101, 3, d, dtype=dtype, device=device)
    check(q, k, v, lens, window=window)
    check(q, k, v, lens, window=window, softcap=2.0, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [2**31 - 1, 2**31, 2**40])
def test_decode_huge_window(window, device, gen):
    """Windows past int32 saturate (unbounded on any int32 length), never wrap."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = torch.tensor([5, 300, 1300], dtype=torch.int32, device=device)
    q = randn(gen, 3, 2, 4, 64, dtype=dtype, device=device)
    k, v = randn(gen, 3, 1301, 2, 64, dtype=dtype, device=device), randn(gen, 3, 1301, 2, 64, dtype=dtype, device=device)
    check(q, k, v, lens, window=window)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_head_dims(device, gen):
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for d in (64, 96, 128, 256) if device == "cuda" else (16, 40, 64, 128, 256):
            lens = torch.tensor([77, 1025], dtype=torch.int32, device=device)
            q = randn(gen, 2, 3, 4, d, dtype=dtype, device=device)
            k, v = randn(gen, 2, 1100, 1, d, dtype=dtype, device=device), randn(gen, 2, 1100, 1, d, dtype=dtype,
                                                                                 device=device)
            check(q, k, v, lens, softcap=30.0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_short_and_empty_sequences(device, gen):
    """A cache shorter than the number of queries: the early queries see no key (out 0,
    lse -inf); an empty cache gives 0 / -inf for all of them."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = torch.tensor([0, 2, 5, 1], dtype=torch.int32, device=device)
    q = randn(gen, 4, 4, 2, 32, dtype=dtype, device=device)
    k, v = randn(gen, 4, 8, 2, 32, dtype=dtype, device=device), randn(gen, 4, 8, 2, 32, dtype=dtype, device=device)
    out, lse = check(q, k, v, lens)
    assert (out[0] == 0).all() and (lse[0] == NEG_INF).all()
    assert (out[1, :2] == 0).all() and (lse[1, :, :2] == NEG_INF).all() and torch.isfinite(lse[1, :, 2:]).all()
    assert (out[3, :3] == 0).all() and torch.isfinite(lse[3, :, 3]).all()
    table = torch.tensor([[3, 0], [1, 2], [4, 5], [6, 7]], dtype=torch.int32, device=device)
    check(q, k.view(16, 2, 2, 32)[:8], v.view(16, 2, 2, 32)[:8], torch.tensor([0, 1, 3, 4], dtype=torch.int32,
                                                                           device=device), table)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_empty_batch_and_no_q_heads(device, gen):
    """batch 0 and 0 q heads return empty results without launching anything (on CUDA a
    0-block launch would be an error)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v = randn(gen, 2, 64, 2, 64, dtype=dtype, device=device), randn(gen, 2, 64, 2, 64, dtype=dtype, device=device)
    lens = torch.tensor([5, 64], dtype=torch.int32, device=device)
    out, lse = attnkit.decode(randn(gen, 2, 3, 0, 64, dtype=dtype, device=device), k, v, lens, return_lse=True)
    assert out.shape == (2, 3, 0, 64) and lse.shape == (2, 0, 3)
    out, lse = attnkit.decode(randn(gen, 0, 3, 4, 64, dtype=dtype, device=device), k[:0], v[:0], lens[:0],
                              return_lse=True)
    assert out.shape == (0, 3, 4, 64) and lse.shape == (0, 4, 3)
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_block_table_capacity_past_int32(device, gen):
    """A block_table whose capacity (pages per sequence x page_size) passes 2^31 tokens: the
    capacity stays int64 in the binding (it used to wrap through int()) and is bounded by
    kDecodeMaxKeys; the lengths, int32, are read as they are."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    page_size, width = 4096, 1 << 20  # capacity 2^32
    k = randn(gen, 3, page_size, 1, 64, dtype=dtype, device=device)
    v = randn(gen, 3, page_size, 1, 64, dtype=dtype, device=device)
    table = torch.zeros(2, width, dtype=torch.int32, device=device)
    table[0, :2] = torch.tensor([2, 0], dtype=torch.int32)
    table[1, :1] = 1
    q = randn(gen, 2, 2, 4, 64, dtype=dtype, device=device)
    check(q, k, v, torch.tensor([5000, 17], dtype=torch.int32, device=device), table)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_ignores_unused_table_entries_and_shares_pages(device, gen):
    """Entries of block_table past a sequence's last page are never read (here -1 and ids
    past num_pages); sequences may share physical pages (a common prefix)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    page_size, num_pages = 16, 40
    k = randn(gen, num_pages, page_size, 2, 64, dtype=dtype, device=device)
    v = randn(gen, num_pages, page_size, 2, 64, dtype=dtype, device=device)
    ids = torch.randperm(num_pages, generator=gen)
    table = torch.full((3, 20), -1, dtype=torch.int32)
    table[0, :3] = ids[:3]                   # 40 tokens: 3 pages
    table[1, :3] = ids[:3]                   # same prefix pages, then its own
    table[1, 3:12] = ids[3:12]               # 180 tokens: 12 pages
    table[2, :1] = ids[12:13]                # 16 tokens: exactly one page
    table[2, 1:5] = num_pages + 1000         # garbage past its last page
    lens = torch.tensor([40, 180, 16], dtype=torch.int32)
    q = randn(gen, 3, 2, 8, 64, dtype=dtype, device=device)
    check(q, k, v, lens.to(device), table.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_strided_caches(device, gen):
    """k / v caches as views of one packed kv tensor, q a head slice: head_dim contiguous,
    other strides free."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kv = randn(gen, 2, 600, 2, 2, 64, dtype=dtype, device=device)
    k, v = kv.unbind(2)
    q = randn(gen, 2, 3, 8, 64, dtype=dtype, device=device)[:, :, 2:6]
    lens = torch.tensor([513, 600], dtype=torch.int32, device=device)
    check(q, k, v, lens)
    pages = randn(gen, 30, 2, 16, 2, 64, dtype=dtype, device=device)  # (pages, k/v, page_size, heads, dim)
    table = torch.randperm(30, generator=gen)[:28].view(2, 14).int().to(device)
    check(q, pages[:, 0], pages[:, 1], torch.tensor([200, 17], dtype=torch.int32, device=device), table)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_matches_attention_and_is_inference_only(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = randn(gen, 1, 3, 4, 32, dtype=dtype, device=device).requires_grad_()
    k, v = randn(gen, 1, 50, 2, 32, dtype=dtype, device=device), randn(gen, 1, 50, 2, 32, dtype=dtype, device=device)
    out, lse = attnkit.decode(q, k, v, torch.tensor([50], dtype=torch.int32, device=device), window=9,
                              return_lse=True)
    want, want_lse = attnkit.attention(q.detach().cpu(), k.cpu(), v.cpu(), causal=True, window=(9, -1),
                                       return_lse=True)
    assert_close(out, want.double(), FWD_TOL[dtype])
    assert_close(lse, want_lse.double(), 1e-5)
    assert not lse.requires_grad
    with pytest.raises(RuntimeError):  # inference only: no backward
        out.sum().backward()


def test_opcheck(gen):
    scale = 16 ** -0.5
    q, k, v = randn(gen, 2, 2, 4, 16), randn(gen, 6, 4, 2, 16), randn(gen, 6, 4, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    table = torch.tensor([[5, 0], [2, 4]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.attnkit.decode.default, (q, k, v, lens, table, scale, 0.0, -1))
    torch.library.opcheck(torch.ops.attnkit.decode.default, (q, k[:2], v[:2], lens.clamp(max=4), None, scale, 5.0, 2))


def test_torch_compile_fullgraph(gen):
    q, k, v = randn(gen, 2, 2, 4, 16), randn(gen, 6, 4, 2, 16), randn(gen, 6, 4, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    table = torch.tensor([[5, 0], [2, 4]], dtype=torch.int32)

    def f(q, k, v, lens, table):
        out, lse = attnkit.decode(q, k, v, lens, block_table=table, softcap=3.0, window=4, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (out, lse), (cout, clse) = f(q, k, v, lens, table), compiled(q, k, v, lens, table)
    assert torch.allclose(out, cout, rtol=1e-6, atol=1e-6) and torch.allclose(lse, clse, rtol=1e-6, atol=1e-6)


def bad_calls(gen):
    """{case: (argument the message must name, call)}"""
    q, k, v = randn(gen, 2, 1, 4, 16), randn(gen, 2, 10, 2, 16), randn(gen, 2, 10, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    pages, table = randn(gen, 4, 4, 2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    stride = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)  # head_dim not contiguous
    dec = attnkit.decode
    return {
        "q-rank": (r"\bq\b", lambda: dec(q[0], k, v, lens)),
        "q-int": (r"\bq\b", lambda: dec(q.int(), k.int(), v.int(), lens)),
        "k_cache-dtype": ("k_cache", lambda: dec(q, k.half(), v, lens)),
        "v_cache-dtype": ("v_cache", lambda: dec(q, k, v.bfloat16(), lens)),
        "k_cache-head_dim": ("k_cache", lambda: dec(q, k[..., :8], v[..., :8], lens)),
        "v_cache-shape": ("v_cache", lambda: dec(q, k, v[:, :5], lens)),
        "k_cache-rank": ("k_cache", lambda: dec(q, k[0], v[0], lens)),
        "k_cache-batch": ("k_cache", lambda: dec(q, k[:1], v[:1], lens)),
        "q-heads-not-multiple": (r"\bq\b", lambda: dec(q[:, :, :3], k, v, lens)),
        "q-head_dim-stride": (r"\bq\b", lambda: dec(stride(q), k, v, lens)),
        "k_cache-head_dim-stride": ("k_cache", lambda: dec(q, stride(k), v, lens)),
        "cache_seqlens-int64": ("cache_seqlens", lambda: dec(q, k, v, lens.long())),
        "cache_seqlens-length": ("cache_seqlens", lambda: dec(q, k, v, lens[:1])),
        "cache_seqlens-capacity": ("cache_seqlens", lambda: dec(q, k, v, i32(3, 11))),
        "cache_seqlens-negative": ("cache_seqlens", lambda: dec(q, k, v, i32(-1, 3))),
        "cache_seqlens-paged-capacity": ("cache_seqlens", lambda: dec(q, pages, pages, i32(3, 9), block_table=table)),
        "block_table-too-large": ("block_table", lambda: dec(q, pages, pages, lens, block_table=i32([0, 1], [2, 4]))),
        "block_table-negative": ("block_table", lambda: dec(q, pages, pages, lens, block_table=i32([-1, 1], [2, 3]))),
        "block_table-int64": ("block_table", lambda: dec(q, pages, pages, lens, block_table=table.long())),
        "block_table-rows": ("block_table", lambda: dec(q, pages, pages, lens, block_table=table[:1])),
        "window": ("window", lambda: dec(q, k, v, lens, window=-2)),
        "softcap": ("softcap", lambda: dec(q, k, v, lens, softcap=-0.5)),
    }


@pytest.mark.parametrize("case", list(bad_calls(torch.Generator())))
def test_bad_input(case, gen):
    name, call = bad_calls(gen)[case]
    with pytest.raises((ValueError, RuntimeError), match=name):
        call()


def test_unused_block_table_entries_are_not_checked(gen):
    """Page ids past a sequence's last page are ignored, whatever they hold."""
    q, pages = randn(gen, 2, 1, 4, 16), randn(gen, 4, 4, 2, 16)
    table = torch.tensor([[0, 99], [2, -5]], dtype=torch.int32)
    attnkit.decode(q, pages, pages, torch.tensor([3, 4], dtype=torch.int32), block_table=table)


@pytest.mark.cuda
@pytest.mark.skipif(not attnkit.cuda_available(), reason="needs a CUDA GPU and the CUDA kernels")
def test_device_mismatch(gen):
    q, k, v = randn(gen, 2, 1, 4, 16), randn(gen, 2, 10, 2, 16), randn(gen, 2, 10, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    for name, args in (("k_cache", (q, k.cuda(), v, lens)), ("v_cache", (q, k, v.cuda(), lens)),
                       ("cache_seqlens", (q, k, v, lens.cuda()))):
        with pytest.raises((ValueError, RuntimeError), match=name):
            attnkit.decode(*args)
    pages, table = randn(gen, 4, 4, 2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match="block_table"):
        attnkit.decode(q, pages, pages, lens, block_table=table.cuda())


# ---- the lean (stream-K) schedule through the op -----------------------------------------
# The CPU decode splits the KV tiles of all (sequence, kv head group) pairs into one equal
# share per thread (csrc/include/attnkit/schedule.h, docs/decode.md): shares cut sequences
# anywhere, several short sequences fall into one share, threads may outnumber tiles, and
# split sequences are merged by LSE. These cases move those cuts around.

@pytest.fixture
def threads():
    """Sets torch's thread count for the test (the schedule's worker count); restores it."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


MIXES = {
    "zeros-and-long": [0, 3000, 0, 0, 1, 4100, 0],
    "one-long-many-short": [4100] + [1, 2, 3, 0, 5, 17, 64, 65, 0, 2] * 3,
    "all-zero": [0, 0, 0],
    "fewer-tiles-than-threads": [1, 0, 2],
    "tile-edges": [63, 64, 65, 127, 128, 129, 0, 192],
}


@pytest.mark.parametrize("num_threads", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_decode_schedule_mixes(mix, num_threads, threads, gen):
    threads(num_threads)
    cap = max(max(mix), 1)
    lens = torch.tensor(mix, dtype=torch.int32)
    q = randn(gen, len(mix), 3, 8, 64)
    k, v = randn(gen, len(mix), cap, 2, 64), randn(gen, len(mix), cap, 2, 64)
    out, lse = check(q, k, v, lens)
    assert (out[lens == 0] == 0).all() and (lse[lens == 0] == NEG_INF).all()
    kp, vp, table, lens_p = paged(gen, mix, 16, 2, 64, torch.float32, "cpu")
    check(q, kp, vp, lens_p, table)


@pytest.mark.parametrize("num_threads", [1, 2, 5, 16])
@pytest.mark.parametrize("window", [-1, 0, 63, 64, 200])
def test_decode_schedule_windows_bf16(window, num_threads, threads, gen):
    """Windows drop whole tiles from the front of a sequence: only tiles holding a visible
    key are scheduled, so the shares move with the window."""
    threads(num_threads)
    mix = [4100, 0, 70, 1000, 5, 129]
    k, v, table, lens = paged(gen, mix, 32, 2, 128, torch.bfloat16, "cpu")
    q = randn(gen, len(mix), 4, 8, 128, dtype=torch.bfloat16)
    check(q, k, v, lens, table, window=window)
    check(q, k, v, lens, table, window=window, softcap=10.0)


@pytest.mark.parametrize("num_threads", [1, 3, 8])
@pytest.mark.parametrize("heads", [(40, 5), (64, 8), (16, 16)], ids=["gqa8:5", "gqa8:8", "mha16"])
def test_decode_schedule_head_groups(heads, num_threads, threads, gen):
    """Many q rows per kv head (16 queries, large groups) split the kv heads into several
    groups, the last one smaller; each group is its own pair in the schedule."""
    threads(num_threads)
    h, hkv = heads
    lens = torch.tensor([700, 0, 1, 300], dtype=torch.int32)
    q = randn(gen, 4, 16, h, 128)
    k, v = randn(gen, 4, 700, hkv, 128), randn(gen, 4, 700, hkv, 128)
    check(q, k, v, lens)
    check(q[:, :1], k, v, lens, window=50)


def test_decode_same_result_for_any_thread_count(threads, gen):
    """Thread counts change where sequences are cut and merged, not the result (beyond
    float32 rounding of the merge)."""
    mix = [3000, 0, 129, 1, 64]
    k, v, table, lens = paged(gen, mix, 16, 2, 64, torch.float32, "cpu")
    q = randn(gen, len(mix), 2, 8, 64)
    results = []
    for n in (1, 2, 3, 6, 13):
        threads(n)
        results.append(attnkit.decode(q, k, v, lens, block_table=table, return_lse=True))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-6, atol=1e-6)
