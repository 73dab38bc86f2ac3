"""attnkit.page_scores against the float64 reference (GQA, several queries, partial last
pages, empty sequences) and as an upper bound of every true logit of a page;
attnkit.select_pages properties and equality with a plain Python selection; bad input;
opcheck. CPU kernels (issue 6, parts 2 and 3)."""
import math

import pytest
import torch

import attnkit
from attnkit import reference

NEG_INF = float("-inf")


def make_cache(lengths, page_size, heads_kv, head_dim, max_pages, gen, dtype=torch.float32):
    """Random keys in a shuffled paged layout with their Quest metadata -> (k_pages,
    key_min, key_max, block_table, cache_seqlens). Unused slots of a partial last page hold
    huge values the metadata must not see."""
    batch = len(lengths)
    num_pages = batch * max_pages + 3
    k_pages = torch.randn(num_pages, page_size, heads_kv, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen)[:batch * max_pages].to(torch.int32)
    block_table = perm.view(batch, max_pages).clone()
    key_min = torch.full((num_pages, heads_kv, head_dim), 1e30)
    key_max = torch.full((num_pages, heads_kv, head_dim), -1e30)
    for b, length in enumerate(lengths):
        for j in range(-(-length // page_size)):
            p = int(block_table[b, j])
            used = min(page_size, length - j * page_size)
            k_pages[p, used:] = 1e4  # past the end: never part of a score
            keys = k_pages[p, :used].float()
            key_min[p], key_max[p] = keys.amin(0), keys.amax(0)
    return k_pages, key_min, key_max, block_table, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("heads_q,heads_kv", [(32, 8), (4, 1), (2, 2)])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_scores_matches_reference_and_bounds_logits(heads_q, heads_kv, seqlen_q, dtype):
    gen = torch.Generator().manual_seed(heads_q * 10 + seqlen_q)
    page_size, head_dim, max_pages = 16, 64, 7
    lengths = [0, 1, 16, 37, 112]  # empty, one token, one full page, partial last page, all pages
    k_pages, kmin, kmax, table, seqlens = make_cache(lengths, page_size, heads_kv, head_dim, max_pages, gen)
    q = torch.randn(len(lengths), seqlen_q, heads_q, head_dim, generator=gen).to(dtype)
    scores = attnkit.page_scores(q, kmin, kmax, table, seqlens, page_size=page_size)
    ref = reference.page_scores(q, kmin, kmax, table, seqlens, page_size=page_size)
    assert scores.dtype == torch.float32 and scores.shape == (len(lengths), heads_kv, max_pages)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref)) and (scores[torch.isinf(scores)] < 0).all()
    finite = torch.isfinite(ref)
    assert finite.sum() == heads_kv * sum(-(-n // page_size) for n in lengths)
    torch.testing.assert_close(scores[finite].double(), ref[finite], rtol=1e-5, atol=1e-4)
    # The bound holds for every true logit of every query row of the group.
    scale = 1 / math.sqrt(head_dim)
    group = heads_q // heads_kv
    for b, length in enumerate(lengths):
        for j in range(-(-length // page_size)):
            used = min(page_size, length - j * page_size)
            keys = k_pages[int(table[b, j]), :used].double()  # (used, Hkv, D)
            qs = q[b].double().view(seqlen_q, heads_kv, group, head_dim)
            logits = torch.einsum("sgrd,tgd->sgrt", qs, keys) * scale
            true_max = logits.amax(dim=(0, 2, 3))  # (Hkv,)
            assert (scores[b, :, j].double() >= true_max - 1e-4).all()


def test_page_scores_scale_and_strided_q():
    gen = torch.Generator().manual_seed(3)
    _, kmin, kmax, table, seqlens = make_cache([50, 9], 8, 2, 32, 8, gen)
    q = torch.randn(2, 4, 2, 2, 32, generator=gen)[:, :, :, 1]  # non-contiguous heads
    for scale in (0.5, -0.25):
        got = attnkit.page_scores(q, kmin, kmax, table, seqlens, page_size=8, scale=scale)
        ref = reference.page_scores(q, kmin, kmax, table, seqlens, page_size=8, scale=scale)
        finite = torch.isfinite(ref)
        torch.testing.assert_close(got[finite].double(), ref[finite], rtol=1e-5, atol=1e-4)
        assert torch.isinf(got[~finite]).all()


def check_selection(scores, top_k, sink, recent):
    got = attnkit.select_pages(scores, top_k, sink_pages=sink, recent_pages=recent)
    ref = reference.select_pages(scores, top_k, sink_pages=sink, recent_pages=recent)
    assert got.dtype == torch.int32 and got.shape == scores.shape[:2] + (top_k + sink + recent,)
    assert torch.equal(got, ref)
    for b in range(scores.shape[0]):
        for g in range(scores.shape[1]):
            row = scores[b, g]
            n = int((row != NEG_INF).cumprod(0).sum())
            chosen = [p for p in got[b, g].tolist() if p != -1]
            assert got[b, g].tolist() == chosen + [-1] * (got.shape[2] - len(chosen)), "-1 only at the end"
            assert chosen == sorted(set(chosen)), "ascending, no duplicates"
            assert all(0 <= p < n for p in chosen)
            must = set(range(min(sink, n))) | set(range(max(n - recent, 0), n))
            assert must <= set(chosen)
            assert len(chosen) == min(n, len(must) + top_k)
    return got


SMALL_CASES = [(3, 1, 1), (0, 2, 3), (5, 0, 0), (50, 1, 2), (2, 4, 4)]  # (top_k, sink, recent)


def small_scores(seed):
    """Rows of 0, 1, 5 and 12 valid pages out of 12, with a run of tied scores."""
    scores = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(seed))
    for b, n in enumerate([0, 1, 5, 12]):
        scores[b, :, n:] = NEG_INF
    scores[2, 1, 1:4] = 0.5  # ties: lower page index first
    return scores


@pytest.mark.parametrize("top_k,sink,recent", SMALL_CASES)
def test_select_pages_properties(top_k, sink, recent):
    check_selection(small_scores(top_k + 7 * sink + 31 * recent), top_k, sink, recent)


def test_select_pages_from_page_scores_picks_the_hot_page():
    gen = torch.Generator().manual_seed(11)
    _, kmin, kmax, table, seqlens = make_cache([160], 16, 1, 16, 10, gen)
    kmax[table[0, 5]] += 100  # page 5 may hold a huge logit for a positive query
    q = torch.ones(1, 1, 1, 16)
    scores = attnkit.page_scores(q, kmin, kmax, table, seqlens, page_size=16)
    pages = check_selection(scores, 1, 1, 1)
    assert pages[0, 0].tolist() == [0, 5, 9]


def test_empty_shapes():
    scores = attnkit.select_pages(torch.zeros(0, 2, 5), 2)
    assert scores.shape == (0, 2, 4)
    assert attnkit.select_pages(torch.zeros(1, 1, 3), 0, sink_pages=0, recent_pages=0).shape == (1, 1, 0)
    _, kmin, kmax, _, _ = make_cache([], 4, 1, 8, 1, torch.Generator().manual_seed(0))
    out = attnkit.page_scores(torch.randn(2, 1, 1, 8), kmin, kmax, torch.zeros(2, 0, dtype=torch.int32),
                              torch.zeros(2, dtype=torch.int32), page_size=4)
    assert out.shape == (2, 1, 0)


def test_bad_input_raises_value_error_naming_the_argument():
    gen = torch.Generator().manual_seed(1)
    _, kmin, kmax, table, seqlens = make_cache([20, 3], 8, 2, 16, 3, gen)
    q = torch.randn(2, 1, 4, 16)
    ok = dict(q=q, key_min=kmin, key_max=kmax, block_table=table, cache_seqlens=seqlens)

    def call(**over):
        args = {**ok, **{k: v for k, v in over.items() if k in ok}}
        kw = {"page_size": over.get("page_size", 8)}
        return attnkit.page_scores(*args.values(), **kw)

    cases = [
        ("q", dict(q=q[0])), ("q", dict(q=q.double())), ("q", dict(q=torch.randn(2, 1, 3, 16))),
        ("key_min", dict(key_min=kmin.half())), ("key_max", dict(key_max=kmax[:, :, :8])),
        ("key_min", dict(key_min=kmin[:, :, :8], key_max=kmax[:, :, :8])),
        ("block_table", dict(block_table=table.long())), ("block_table", dict(block_table=table[:1])),
        ("cache_seqlens", dict(cache_seqlens=seqlens[:1])),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([25, 3], dtype=torch.int32))),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32))),
        ("block_table", dict(block_table=torch.full_like(table, 10_000))),
        ("page_size", dict(page_size=0)), ("q", dict(q=[1.0])),
    ]
    for name, over in cases:
        with pytest.raises(ValueError, match=name):
            call(**over)
    scores = torch.zeros(1, 1, 4)
    for name, args, kw in [("top_k", (scores, -1), {}), ("sink_pages", (scores, 1), {"sink_pages": -1}),
                           ("recent_pages", (scores, 1), {"recent_pages": 1.5}),
                           ("scores", (scores.double(), 1), {}), ("scores", (scores[0], 1), {})]:
        with pytest.raises(ValueError, match=name):
            attnkit.select_pages(*args, **kw)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    _, kmin, kmax, table, seqlens = make_cache([20, 0, 31], 8, 2, 16, 4, gen)
    q = torch.randn(3, 2, 4, 16)
    torch.library.opcheck(torch.ops.attnkit.page_scores.default, (q, kmin, kmax, table, seqlens, 8, 0.25))
    scores = attnkit.page_scores(q, kmin, kmax, table, seqlens, page_size=8)
    torch.library.opcheck(torch.ops.attnkit.select_pages.default, (scores, 2, 1, 1))
