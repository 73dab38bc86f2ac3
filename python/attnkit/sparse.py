"""Page selection for query-aware sparse decode (Quest): score every page of a paged KV
cache with an upper bound of its logits, then keep the sink, recent and top-k pages.
Schemas and CPU kernels: csrc/torch/page_select.cpp, csrc/cpu/page_select.cpp."""
import torch

from . import _checks
from ._ops import ops


@torch.library.register_fake("attnkit::page_scores")
def _page_scores_fake(q, key_min, key_max, block_table, cache_seqlens, page_size, scale):
    return q.new_empty((q.shape[0], key_min.shape[1], block_table.shape[1]), dtype=torch.float32)


@torch.library.register_fake("attnkit::select_pages")
def _select_pages_fake(scores, top_k, sink_pages, recent_pages):
    return scores.new_empty((scores.shape[0], scores.shape[1], top_k + sink_pages + recent_pages),
                            dtype=torch.int32)


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def page_scores(q, key_min, key_max, block_table, cache_seqlens, *, page_size, scale=None):
    """Quest score of every logical page of a paged KV cache -> float32 (batch, kv_heads, max_pages).

    q (batch, seqlen_q, heads_q, head_dim): the decode queries (float32, float16 or bfloat16;
    read in float32). key_min, key_max (float32, num_pages x kv_heads x head_dim): per physical
    page and kv head, the channel-wise min and max of the page's keys. block_table (int32,
    batch x max_pages): logical -> physical page. cache_seqlens (int32, batch): valid tokens.
    page_size (keyword, required): tokens per page, i.e. k_cache.shape[1] of the paged cache.
    scale: the softmax scale, None = 1/sqrt(head_dim).

    Score of logical page j of sequence b and kv head g:
        max over the queries s and the q heads h of group g of
            sum_d max(scale * q[b, s, h, d] * key_min[p, g, d], scale * q[b, s, h, d] * key_max[p, g, d])
    with p = block_table[b, j]. Each term bounds scale * q_d * k_d for every key of the page,
    so the score is >= every logit scale * q.k of the page for every query row of the group:
    the max over heads and queries keeps it an upper bound for all of them (a page any head
    may need ranks high). Pages j >= ceil(cache_seqlens[b] / page_size) score -inf; their
    block_table entries are not read.
    """
    for t, name in ((q, "q"), (key_min, "key_min"), (key_max, "key_max"), (block_table, "block_table"),
                    (cache_seqlens, "cache_seqlens")):
        _checks.check_tensor(t, name)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be an int > 0, got {page_size!r}")
    _checks.require_kernel("page_scores", q)
    return ops.page_scores(q, key_min, key_max, block_table, cache_seqlens, page_size,
                           _checks.resolve_scale(scale, q))


def select_pages(scores, top_k, *, sink_pages=1, recent_pages=1):
    """Pages to attend per (sequence, kv head) -> int32 (batch, kv_heads, top_k + sink_pages + recent_pages).

    scores (float32, batch x kv_heads x max_pages), e.g. from page_scores: a row's valid pages
    are its leading scores that are not -inf (page_scores writes -inf exactly at and past a
    sequence's end; anything after the first -inf is ignored). Of the n valid pages, the first
    sink_pages and the last recent_pages are always kept, plus the top_k highest-scoring pages
    between them (ties to the lower page index; NaN ranks last). Each row is sorted ascending,
    without duplicates, and padded with -1 at the end when fewer pages are chosen.
    """
    _checks.check_tensor(scores, "scores")
    _check_count(top_k, "top_k")
    _check_count(sink_pages, "sink_pages")
    _check_count(recent_pages, "recent_pages")
    _checks.require_kernel("select_pages", scores)
    return ops.select_pages(scores, top_k, sink_pages, recent_pages)
