"""attnkit.sparse_decode / sparse_decode_tokens against the float64 reference
(reference.sparse_decode: dense attention over exactly the selected tokens): page sizes 1, 3,
16 and 64 with shuffled page tables, partial last pages, -1 padding and out-of-range entries,
unsorted selections, GQA, 1..16 queries (causal among the selected tokens), softcap, lengths
0 / 1 / at page boundaries, empty selections (out 0, lse -inf), NaN-poisoned cache pages
that are not selected; every page selected equals attnkit.decode; the select_pages and
streaming_page_indices pipelines; opcheck, torch.compile and bad input."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, devices_for, paged, randn, skip_unsupported

DEVICES = devices_for("sparse_decode")
NEG_INF = float("-inf")


def check(q, k, v, lens, table, indices, tokens=False, **opts):
    """sparse_decode (out, lse) equals the reference; rows that see nothing are exactly 0."""
    op = attnkit.sparse_decode_tokens if tokens else attnkit.sparse_decode
    out, lse = op(q, k, v, lens, table, indices, return_lse=True, **opts)
    ref, ref_lse = reference.sparse_decode(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), table.cpu(), indices.cpu(),
                                           tokens_per_index=1 if tokens else k.shape[1], **opts)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_close(out, ref, FWD_TOL[q.dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[q.dtype])
    assert (out.cpu()[(ref_lse == NEG_INF).transpose(1, 2)] == 0).all(), "rows that see nothing must be exactly 0"
    return out, lse


def random_pages(gen, lens, kv_heads, page_size, n, pad=2):
    """Per (sequence, kv head) n distinct logical pages of the sequence (fewer when it has
    fewer), in random order, then `pad` entries of -1 or past the end."""
    rows = []
    for length in lens.tolist():
        pages = (length + page_size - 1) // page_size
        per_head = []
        for _ in range(kv_heads):
            pick = torch.randperm(max(pages, 1), generator=gen)[:min(n, pages)].tolist()
            junk = [-1 if i % 2 else pages + 3 for i in range(pad)]
            per_head.append(pick + junk + [-1] * (n - len(pick)))
        rows.append(per_head)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [1, 3, 16, 64])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_sparse_decode_pages(seqlen_q, page_size, dtype, device, gen):
    skip_unsupported("sparse_decode", device, dtype)
    # one token, half a page, exactly one page, one past two pages, long (split over workers)
    lens_list = [1, page_size // 2 + 1, page_size, 2 * page_size + 1, 700, 3000]
    k, v, table, lens = paged(gen, lens_list, page_size, 2, 64, dtype, device)
    q = randn(gen, len(lens_list), seqlen_q, 8, 64, dtype=dtype, device=device)
    indices = random_pages(gen, lens.cpu(), 2, page_size, n=max(2, 1500 // page_size // 4)).to(device)
    check(q, k, v, lens, table, indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [40, 128])
def test_sparse_decode_softcap_head_dims(head_dim, device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v, table, lens = paged(gen, [37, 1000, 513], 16, 4, head_dim, dtype, device)
    q = randn(gen, 3, 2, 8, head_dim, dtype=dtype, device=device)
    indices = random_pages(gen, lens.cpu(), 4, 16, n=20).to(device)
    check(q, k, v, lens, table, indices, softcap=5.0)
    check(q, k, v, lens, table, indices, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [1, 16])
def test_every_page_selected_equals_decode(seqlen_q, device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v, table, lens = paged(gen, [5, 16, 17, 2049, 300], 16, 2, 64, dtype, device)
    q = randn(gen, 5, seqlen_q, 4, 64, dtype=dtype, device=device)
    pages = table.shape[1]
    everything = torch.arange(pages, dtype=torch.int32, device=device).expand(5, 2, pages).contiguous()
    out, lse = attnkit.sparse_decode(q, k, v, lens, table, everything, return_lse=True)
    want, want_lse = attnkit.decode(q, k, v, lens, block_table=table, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    ref, ref_lse = reference.decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), lens.cpu(),
                                    block_table=table.cpu())
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_sparse_decode_tokens(seqlen_q, device, gen):
    dtype = torch.float16 if device == "cuda" else torch.float32
    lens_list = [0, 1, 9, 64, 1111]
    k, v, table, lens = paged(gen, lens_list, 8, 2, 64, dtype, device)
    q = randn(gen, len(lens_list), seqlen_q, 6, 64, dtype=dtype, device=device)
    n = 200
    rows = []
    for length in lens_list:  # random tokens, unsorted, some -1 and some past the end in between
        per_head = []
        for _ in range(2):
            pick = torch.randperm(max(length, 1), generator=gen)[:min(n - 20, length)].tolist()
            junk = [-1, length, length + 5, -7] * 5
            row = pick + junk
            per_head.append(row + [-1] * (n - len(row)))
        rows.append(per_head)
    check(q, k, v, lens, table, torch.tensor(rows, dtype=torch.int32, device=device), tokens=True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_causal_selections(device, gen):
    """All -1 rows, rows selecting only tokens after every query (seqlen_q 4: the last page
    holds the queries), a sequence of length 0: out 0 and lse -inf where nothing is seen."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v, table, lens = paged(gen, [0, 40, 40, 33], 16, 2, 64, dtype, device)
    q = randn(gen, 4, 4, 2, 64, dtype=dtype, device=device)
    indices = torch.tensor([[[0, 1], [2, -1]],      # length 0: nothing exists
                            [[-1, -1], [2, -1]],    # nothing selected / last page only
                            [[2, 0], [1, 2]],
                            [[2, -1], [-1, 0]]], dtype=torch.int32, device=device)
    out, lse = check(q, k, v, lens, table, indices)
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, 0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_unselected_pages_are_not_read(device, gen):
    """Pages outside the selection hold NaN: the output stays finite."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v, table, lens = paged(gen, [500, 260], 16, 2, 64, dtype, device)
    q = randn(gen, 2, 1, 4, 64, dtype=dtype, device=device)
    indices = torch.tensor([[[0, 5, 31], [3, 4, -1]], [[16, 2, -1], [0, -1, -1]]], dtype=torch.int32, device=device)
    keep = torch.zeros(k.shape[0], dtype=torch.bool, device=device)
    for b in range(2):
        keep[table[b, indices[b][indices[b] >= 0].long()]] = True
    k[~keep], v[~keep] = float("nan"), float("nan")
    out = check(q, k, v, lens, table, indices)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_quest_pipeline(device, gen):
    """PagedKVCache -> page_scores -> select_pages -> sparse_decode on a 4k context."""
    if device == "cuda" and not all(attnkit.has_cuda_kernel(op) for op in ("page_scores", "select_pages")):
        pytest.skip("page_scores / select_pages have no CUDA kernel in this build")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cache = attnkit.PagedKVCache(300, 16, 2, 64, dtype=dtype, device=device, max_seqs=2)
    for seq, length in enumerate([4000, 777]):
        cache.append(seq, randn(gen, length, 2, 64, dtype=dtype, device=device),
                     randn(gen, length, 2, 64, dtype=dtype, device=device))
    q = randn(gen, 2, 1, 8, 64, dtype=dtype, device=device)
    lens, table = cache.cache_seqlens[:2], cache.block_table[:2]
    scores = attnkit.page_scores(q, cache.key_min, cache.key_max, table, lens, page_size=16)
    pages = attnkit.select_pages(scores, 16, sink_pages=1, recent_pages=2)
    check(q, cache.k_pages, cache.v_pages, lens, table, pages)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_heads(device, gen):
    """DuoAttention: streaming heads see sinks + recent pages, retrieval heads everything."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v, table, lens = paged(gen, [1000, 40, 0, 17], 16, 4, 64, dtype, device)
    q = randn(gen, 4, 1, 8, 64, dtype=dtype, device=device)
    streaming = torch.tensor([True, False, True, False], device=device)
    pages = attnkit.streaming_page_indices(lens, streaming, page_size=16, max_pages=table.shape[1], sink_pages=2,
                                           recent_pages=3)
    assert pages.dtype == torch.int32 and pages.shape == (4, 4, table.shape[1])
    assert pages[0, 0, :6].tolist() == [0, 1, 60, 61, 62, -1]          # 1000 tokens = 63 pages
    assert pages[0, 1, :64].tolist() == list(range(63)) + [-1]
    assert pages[1, 0, :4].tolist() == [0, 1, 2, -1]                  # 3 pages: sinks, then the rest
    assert (pages[2] == -1).all()
    check(q, k, v, lens, table, pages)
    full = attnkit.decode(q[:, :, 2:4], k[:, :, 1:2], v[:, :, 1:2], lens, block_table=table)
    torch.testing.assert_close(attnkit.sparse_decode(q, k, v, lens, table, pages)[:, :, 2:4], full,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5)


def test_opcheck(gen):
    k, v, table, lens = paged(gen, [40, 100], 16, 2, 32, torch.float32, "cpu")
    q = randn(gen, 2, 2, 4, 32)
    pages = torch.tensor([[[0, 2], [1, -1]], [[6, 3], [0, 1]]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.attnkit.sparse_decode.default, (q, k, v, lens, table, pages, 16, 0.2, 0.0))
    torch.library.opcheck(torch.ops.attnkit.sparse_decode.default, (q, k, v, lens, table, pages * 7, 1, 0.2, 4.0))


def test_torch_compile_fullgraph(gen):
    k, v, table, lens = paged(gen, [40, 100], 16, 2, 32, torch.float32, "cpu")
    q = randn(gen, 2, 1, 4, 32)
    pages = torch.tensor([[[0, 2], [1, -1]], [[6, 3], [0, 1]]], dtype=torch.int32)

    def f(q, k, v, lens, table, pages):
        return attnkit.sparse_decode(q, k, v, lens, table, pages, return_lse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, lens, table, pages), f(q, k, v, lens, table, pages)):
        torch.testing.assert_close(got, want)


def test_bad_input(gen):
    k, v, table, lens = paged(gen, [40, 100], 16, 2, 32, torch.float32, "cpu")
    q = randn(gen, 2, 1, 4, 32)
    pages = torch.zeros(2, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="page_indices must be int32"):
        attnkit.sparse_decode(q, k, v, lens, table, pages.long())
    with pytest.raises(ValueError, match="page_indices must have shape"):
        attnkit.sparse_decode(q, k, v, lens, table, pages[:, :1])
    with pytest.raises(ValueError, match="page_indices must have shape"):
        attnkit.sparse_decode(q, k, v, lens, table, pages[:, :, :0])
    with pytest.raises(ValueError, match="token_indices must have 3"):
        attnkit.sparse_decode_tokens(q, k, v, lens, table, pages[0])
    with pytest.raises(ValueError, match="block_table must be a torch.Tensor"):
        attnkit.sparse_decode(q, k, v, lens, None, pages)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attnkit.sparse_decode(q, k, v, lens + 1000, table, pages)
    with pytest.raises(ValueError, match="streaming_heads must be a 1-D bool"):
        attnkit.streaming_page_indices(lens, torch.ones(2), page_size=16, max_pages=8)
    with pytest.raises(RuntimeError, match="inference-only"):
        attnkit.sparse_decode(q.requires_grad_(), k, v, lens, table, pages).sum().backward()


CUDA_ONLY = pytest.mark.skipif(not (torch.cuda.is_available() and attnkit.has_cuda_kernel("sparse_decode")),
                               reason="needs a CUDA GPU and the CUDA sparse_decode kernel")


@pytest.mark.cuda
@CUDA_ONLY
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_cuda_long_context_gqa(head_dim, gen):
    """64k tokens, GQA 32:8, 1/16 of the pages selected per kv head (different per head)."""
    dtype = torch.bfloat16
    k, v, table, lens = paged(gen, [65536, 30000, 7], 16, 8, head_dim, dtype, "cuda", spare_pages=3)
    q = randn(gen, 3, 2, 32, head_dim, dtype=dtype, device="cuda")
    indices = random_pages(gen, lens.cpu(), 8, 16, n=256).cuda()
    check(q, k, v, lens, table, indices)


@pytest.mark.cuda
@CUDA_ONLY
def test_cuda_graph_capture_and_replay(gen):
    """One sparse decode step captured in a CUDA graph; cache_seqlens and the selection are
    rewritten in place and each replay equals the eager call with the same values."""
    dtype = torch.bfloat16
    k, v, table, lens = paged(gen, [8192] * 3, 16, 4, 128, dtype, "cuda", spare_pages=3)
    q = randn(gen, 3, 1, 16, 128, dtype=dtype, device="cuda")
    pages = torch.full((3, 4, 64), -1, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            attnkit.sparse_decode(q, k, v, lens, table, pages, return_lse=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = attnkit.sparse_decode(q, k, v, lens, table, pages, return_lse=True)
    for trial, new_lens in enumerate([[5, 100, 3000], [0, 8192, 17], [8192, 8192, 8192]]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        pages.copy_(random_pages(gen, lens.cpu(), 4, 16, n=60, pad=4)[..., :64])
        graph.replay()
        want, want_lse = attnkit.sparse_decode(q, k, v, lens, table, pages, return_lse=True)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
