"""CUDA page_scores and select_pages against the CPU kernels and the float64 reference:
page_scores (GQA, several queries, q in fp32 / fp16 / bf16, head_dim not a multiple of 32,
strided q, negative scale, partial last pages, empty sequences) within 1e-5 relative of the
CPU kernel (a different summation order) and of the reference, -inf exactly at and past each end; select_pages bit-identical to
the CPU kernel for rows of up to 16k pages (128k tokens in pages of 8) with ties, NaN,
-0 / +0 and every top_k / sink / recent regime; both ops captured in one CUDA graph and
replayed on new lengths and queries; values CUDA does not check (lengths, page ids) give
defined results, not faults; bad input; opcheck. Marked `cuda`, skipped without a GPU or
the CUDA kernels."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import cuda_module_marks
from test_page_select import NEG_INF, SMALL_CASES, check_selection, make_cache, small_scores

pytestmark = cuda_module_marks("select_pages", "page selection")

DEV = "cuda"


def cuda(*tensors):
    return [t.to(DEV) for t in tensors]


def scores_on_both(q, kmin, kmax, table, seqlens, page_size, scale=None):
    """page_scores on CUDA, checked against the CPU kernel and the reference -> CUDA scores."""
    got = attnkit.page_scores(*cuda(q, kmin, kmax, table, seqlens), page_size=page_size, scale=scale)
    cpu = attnkit.page_scores(q, kmin, kmax, table, seqlens, page_size=page_size, scale=scale)
    ref = reference.page_scores(q, kmin, kmax, table, seqlens, page_size=page_size, scale=scale)
    assert got.dtype == torch.float32 and got.device.type == "cuda" and got.shape == cpu.shape
    got_c = got.cpu()
    assert torch.equal(got_c == NEG_INF, cpu == NEG_INF) and torch.equal(got_c == NEG_INF, ref == NEG_INF)
    finite = torch.isfinite(ref)
    assert torch.isfinite(got_c[finite]).all()
    torch.testing.assert_close(got_c[finite], cpu[finite], rtol=1e-5, atol=1e-5)  # summation order differs
    torch.testing.assert_close(got_c[finite].double(), ref[finite], rtol=1e-5, atol=1e-4)
    return got


@pytest.mark.parametrize("heads_q,heads_kv", [(32, 8), (4, 1), (2, 2)])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 100, 128, 256])
def test_page_scores(heads_q, heads_kv, seqlen_q, dtype, head_dim):
    gen = torch.Generator().manual_seed(heads_q * 10 + seqlen_q + head_dim)
    page_size, max_pages = 16, 40
    lengths = [0, 1, 16, 37, 112, 640]  # empty, one token, one page, partial last page, full table
    _, kmin, kmax, table, seqlens = make_cache(lengths, page_size, heads_kv, head_dim, max_pages, gen)
    q = torch.randn(len(lengths), seqlen_q, heads_q, head_dim, generator=gen).to(dtype)
    scores_on_both(q, kmin, kmax, table, seqlens, page_size)


def test_page_scores_scale_strided_q_and_many_pages():
    gen = torch.Generator().manual_seed(3)
    _, kmin, kmax, table, seqlens = make_cache([50, 9, 4000], 8, 2, 32, 520, gen)
    q = torch.randn(3, 4, 2, 2, 32, generator=gen)[:, :, :, 1]  # non-contiguous heads
    for scale in (0.5, -0.25, None):
        scores_on_both(q, kmin, kmax, table, seqlens, 8, scale)
    scores_on_both(torch.randn(3, 2, 4, 64, generator=gen)[..., ::2], kmin, kmax, table, seqlens, 8)  # strided d


def test_page_scores_values_cuda_does_not_check():
    """Lengths past the table are clamped to it (the CPU raises ValueError); a page id
    outside key_min scores NaN instead of being read."""
    gen = torch.Generator().manual_seed(5)
    _, kmin, kmax, table, _ = make_cache([24, 24], 8, 1, 16, 3, gen)
    q = torch.randn(2, 1, 1, 16, generator=gen)
    args = cuda(q, kmin, kmax)
    got = attnkit.page_scores(*args, table.cuda(), torch.tensor([10_000, -5], dtype=torch.int32, device=DEV),
                              page_size=8)
    want = scores_on_both(q, kmin, kmax, table, torch.tensor([24, 0], dtype=torch.int32), 8)
    assert torch.equal(got, want)
    bad = table.clone()
    bad[0, 1] = kmin.shape[0]
    got = attnkit.page_scores(*args, bad.cuda(), torch.tensor([24, 24], dtype=torch.int32, device=DEV), page_size=8)
    assert got[0, 0, 1].isnan() and torch.isfinite(got[0, 0, [0, 2]]).all() and torch.isfinite(got[1]).all()


def select_on_both(scores, top_k, sink, recent):
    """select_pages on CUDA equals the CPU kernel exactly -> the CUDA pages."""
    got = attnkit.select_pages(scores.to(DEV), top_k, sink_pages=sink, recent_pages=recent)
    want = attnkit.select_pages(scores.cpu(), top_k, sink_pages=sink, recent_pages=recent)
    assert got.dtype == torch.int32 and got.device.type == "cuda" and got.shape == want.shape
    assert torch.equal(got.cpu(), want), f"rows differ: {(got.cpu() != want).any(-1).nonzero().tolist()[:5]}"
    return got


@pytest.mark.parametrize("top_k,sink,recent", SMALL_CASES)
def test_select_pages_small_rows(top_k, sink, recent):
    scores = small_scores(top_k + 7 * sink + 31 * recent)
    select_on_both(scores, top_k, sink, recent)
    check_selection(scores, top_k, sink, recent)  # the CPU result against the reference and its properties


def tricky_scores(gen, rows, max_pages, lengths):
    """Scores with heavy ties (few distinct values), -0 / +0, NaN and +inf, each row ending at
    its length with -inf (values after the first -inf are arbitrary)."""
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, float("nan"), float("inf"), -3.0, 1e-40, -1e-40])
    scores = values[torch.randint(0, len(values), (rows, max_pages), generator=gen)]
    mixed = torch.rand(rows, max_pages, generator=gen) < 0.5
    scores[mixed] = torch.randn(int(mixed.sum()), generator=gen)
    for r, n in enumerate(lengths):
        if n < max_pages:
            scores[r, n] = NEG_INF
            scores[r, n + 1:] = torch.randn(max_pages - n - 1, generator=gen)
    return scores


@pytest.mark.parametrize("max_pages", [1, 7, 511, 512, 513, 2000])
@pytest.mark.parametrize("top_k", [0, 1, 17, 600])
def test_select_pages_ties_nan_zeros(max_pages, top_k):
    gen = torch.Generator().manual_seed(max_pages * 3 + top_k)
    lengths = [max_pages, 0, 1, max_pages // 2, max(max_pages - 2, 0), 3]
    scores = tricky_scores(gen, len(lengths), max_pages, lengths).view(2, 3, max_pages)
    for sink, recent in [(1, 1), (0, 0), (4, 16)]:
        got = select_on_both(scores, top_k, sink, recent)
        if max_pages <= 513:
            assert torch.equal(got.cpu(), reference.select_pages(scores, top_k, sink_pages=sink, recent_pages=recent))


def test_select_pages_128k_token_rows():
    """Rows of 16384 pages (128k tokens in pages of 8), 1/16 of them chosen, lengths from
    empty to full; plain random scores and scores with many ties."""
    gen = torch.Generator().manual_seed(128)
    max_pages, heads_kv = 16384, 8
    lengths = [16384, 16383, 9000, 8192, 1024, 1, 0, 12345] * 2
    for scores in (tricky_scores(gen, len(lengths), max_pages, lengths),
                   torch.randn(len(lengths), max_pages, generator=gen).round(decimals=1)):
        for r, n in enumerate(lengths):
            scores[r, n:] = NEG_INF
        scores = scores.view(2, heads_kv, max_pages)
        got = select_on_both(scores, 1024, 1, 4)
        assert torch.equal(got.cpu()[0, :2], reference.select_pages(scores[:1, :2], 1024, sink_pages=1,
                                                                    recent_pages=4)[0])
    got = select_on_both(scores, 20000, 2, 2)  # top_k above the pages: every valid page, in order
    row = got[0, 0].cpu()
    assert row[:16384].tolist() == list(range(16384)) and (row[16384:] == -1).all()


def test_pipeline_from_page_scores_picks_the_hot_page():
    gen = torch.Generator().manual_seed(11)
    _, kmin, kmax, table, seqlens = make_cache([160], 16, 1, 16, 10, gen)
    kmax[table[0, 5]] += 100
    scores = attnkit.page_scores(*cuda(torch.ones(1, 1, 1, 16), kmin, kmax, table, seqlens), page_size=16)
    assert attnkit.select_pages(scores, 1).tolist() == [[[0, 5, 9]]]


def test_cuda_graph_capture():
    """page_scores + select_pages in one captured graph, replayed after writing new
    queries and lengths into the captured tensors: equal to eager calls on the CPU."""
    gen = torch.Generator().manual_seed(21)
    page_size, heads_q, heads_kv, head_dim, max_pages = 8, 16, 4, 128, 300
    lengths = [2400, 17, 0, 1500]
    _, kmin, kmax, table, seqlens = make_cache(lengths, page_size, heads_kv, head_dim, max_pages, gen)
    q = torch.randn(4, 1, heads_q, head_dim, generator=gen).to(torch.bfloat16)
    q_d, kmin_d, kmax_d, table_d, seqlens_d = cuda(q, kmin, kmax, table, seqlens)

    def step():
        scores = attnkit.page_scores(q_d, kmin_d, kmax_d, table_d, seqlens_d, page_size=page_size)
        return scores, attnkit.select_pages(scores, 16, sink_pages=1, recent_pages=2)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scores_out, pages_out = step()
    for new_lengths in ([2400, 17, 0, 1500], [2399, 2400, 8, 1], [0, 0, 0, 0]):
        q_new = torch.randn(q.shape, generator=gen).to(torch.bfloat16)
        new_seqlens = torch.tensor(new_lengths, dtype=torch.int32)
        q_d.copy_(q_new)
        seqlens_d.copy_(new_seqlens)
        graph.replay()
        torch.cuda.synchronize()
        want_scores = attnkit.page_scores(q_new, kmin, kmax, table, new_seqlens, page_size=page_size)
        finite = torch.isfinite(want_scores)
        assert torch.equal(torch.isfinite(scores_out.cpu()), finite)
        torch.testing.assert_close(scores_out.cpu()[finite], want_scores[finite], rtol=1e-5, atol=1e-5)
        assert torch.equal(pages_out.cpu(), attnkit.select_pages(scores_out.cpu(), 16, sink_pages=1, recent_pages=2))


def test_empty_shapes():
    assert attnkit.select_pages(torch.zeros(0, 2, 5, device=DEV), 2).shape == (0, 2, 4)
    assert attnkit.select_pages(torch.zeros(1, 1, 3, device=DEV), 0, sink_pages=0, recent_pages=0).shape == (1, 1, 0)
    assert attnkit.select_pages(torch.zeros(2, 1, 0, device=DEV), 3).tolist() == [[[-1] * 5]] * 2
    _, kmin, kmax, _, _ = make_cache([], 4, 1, 8, 1, torch.Generator().manual_seed(0))
    out = attnkit.page_scores(*cuda(torch.randn(2, 1, 1, 8), kmin, kmax, torch.zeros(2, 0, dtype=torch.int32),
                                    torch.zeros(2, dtype=torch.int32)), page_size=4)
    assert out.shape == (2, 1, 0) and out.device.type == "cuda"


def test_bad_input_raises_value_error_naming_the_argument():
    gen = torch.Generator().manual_seed(1)
    _, kmin, kmax, table, seqlens = make_cache([20, 3], 8, 2, 16, 3, gen)
    q, kmin, kmax, table, seqlens = cuda(torch.randn(2, 1, 4, 16), kmin, kmax, table, seqlens)
    ok = dict(q=q, key_min=kmin, key_max=kmax, block_table=table, cache_seqlens=seqlens)
    cases = [("key_min", dict(key_min=kmin.cpu())), ("key_max", dict(key_max=kmax.cpu())),
             ("block_table", dict(block_table=table.cpu())), ("cache_seqlens", dict(cache_seqlens=seqlens.cpu())),
             ("q", dict(q=q.double())), ("key_min", dict(key_min=kmin.half()))]
    for name, over in cases:
        with pytest.raises(ValueError, match=name):
            attnkit.page_scores(*{**ok, **over}.values(), page_size=8)
    with pytest.raises(ValueError, match="scores"):
        attnkit.select_pages(torch.zeros(1, 1, 4, device=DEV, dtype=torch.float64), 1)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    _, kmin, kmax, table, seqlens = make_cache([20, 0, 31], 8, 2, 16, 4, gen)
    q, kmin, kmax, table, seqlens = cuda(torch.randn(3, 2, 4, 16), kmin, kmax, table, seqlens)
    torch.library.opcheck(torch.ops.attnkit.page_scores.default, (q, kmin, kmax, table, seqlens, 8, 0.25))
    scores = attnkit.page_scores(q, kmin, kmax, table, seqlens, page_size=8)
    torch.library.opcheck(torch.ops.attnkit.select_pages.default, (scores, 2, 1, 1))
