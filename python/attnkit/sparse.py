"""Query-aware sparse decode over a paged KV cache (Quest, TokenSelect, DuoAttention): score
every page with an upper bound of its logits (page_scores), keep the sink, recent and top-k
pages (select_pages), and attend to the selected pages or tokens only (sparse_decode,
sparse_decode_tokens); streaming_page_indices expresses DuoAttention's streaming heads.
docs/sparse.md has the pipeline. Kernels: csrc/cpu/page_select.cpp, csrc/cpu/decode.cpp and
csrc/cuda/decode/decode.cu (sparse decode shares the decode kernels)."""
import torch

from . import _checks
from ._ops import ops
from .quant import QuantizedKV, cache_args


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


def _sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, indices, name, tokens_per_index, scale,
                   softcap, return_lse):
    for t, arg in ((q, "q"), (cache_seqlens, "cache_seqlens"), (block_table, "block_table"), (indices, name)):
        _checks.check_tensor(t, arg)
    k_cache, v_cache, quant = cache_args(k_cache, v_cache)
    _checks.require_kernel("sparse_decode", q)
    out, lse = ops.sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, indices, tokens_per_index,
                                 _checks.resolve_scale(scale, q), _checks.resolve_softcap(softcap), **quant)
    return (out, lse) if return_lse else out


def sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, page_indices, *, scale=None, softcap=0.0,
                  return_lse=False):
    """attnkit.decode over the selected logical pages of a paged KV cache only.

    q, k_cache, v_cache, cache_seqlens, block_table as in attnkit.decode with a paged cache
    (num_pages, page_size, kv_heads, head_dim), or a quantized one (attnkit.QuantizedKV pairs,
    as attnkit.decode takes them). page_indices (int32, batch x kv_heads x n):
    per (sequence, kv head) the logical pages whose tokens the q heads of that kv head
    attend to, e.g. from select_pages or streaming_page_indices. Entries < 0 (padding) select
    nothing, as do pages at or past the sequence's end; a partial last page contributes its
    valid tokens only. The queries (the last seqlen_q positions) stay causal: a selected
    token after a query's position is masked for it. Entries should be distinct (a page
    listed twice counts twice); their order does not matter. A query that sees no selected
    token gets out 0 and lse -inf. With every page selected this is attnkit.decode.
    Work is split with decode's lean (stream-K) schedule over the selected keys only.
    Returns out (like q), or (out, lse) with lse (batch, heads, seqlen_q) float32.
    """
    pages = k_cache.data if isinstance(k_cache, QuantizedKV) else k_cache
    page_size = pages.shape[1] if isinstance(pages, torch.Tensor) and pages.dim() == 4 else 1
    return _sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, page_indices, "page_indices", page_size,
                          scale, softcap, return_lse)


def sparse_decode_tokens(q, k_cache, v_cache, cache_seqlens, block_table, token_indices, *, scale=None,
                         softcap=0.0, return_lse=False):
    """sparse_decode with token-level selection (TokenSelect-style): token_indices (int32,
    batch x kv_heads x n) lists per (sequence, kv head) the token positions to attend to;
    entries < 0 or >= cache_seqlens[b] select nothing. Otherwise as sparse_decode."""
    return _sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, token_indices, "token_indices", 1,
                          scale, softcap, return_lse)


def streaming_page_indices(cache_seqlens, streaming_heads, *, page_size, max_pages, sink_pages=1,
                           recent_pages=1):
    """DuoAttention's head split as sparse_decode page indices -> int32 (batch, kv_heads, max_pages).

    streaming_heads (bool, kv_heads): True for a streaming head, which attends to its first
    sink_pages pages and its last recent_pages pages only (StreamingLLM's sinks + recent
    window, at page granularity); False for a retrieval head, which keeps every page. Row
    (b, g) lists those logical pages ascending, padded with -1; sequence b has
    ceil(cache_seqlens[b] / page_size) pages. Built with tensor ops on the device of
    cache_seqlens (no host sync, CUDA-graph capturable). To combine with Quest, use
    select_pages' rows for the retrieval heads instead of all pages (docs/sparse.md).
    """
    _checks.check_tensor(cache_seqlens, "cache_seqlens")
    _checks.check_tensor(streaming_heads, "streaming_heads")
    if streaming_heads.dtype != torch.bool or streaming_heads.dim() != 1:
        raise ValueError(f"streaming_heads must be a 1-D bool tensor (kv_heads,), got {streaming_heads.dtype} "
                         f"of shape {tuple(streaming_heads.shape)}")
    for value, arg in ((page_size, "page_size"), (max_pages, "max_pages")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be an int > 0, got {value!r}")
    _check_count(sink_pages, "sink_pages")
    _check_count(recent_pages, "recent_pages")
    device = cache_seqlens.device
    pages = (cache_seqlens.long().clamp(min=0) + page_size - 1) // page_size            # (batch,)
    j = torch.arange(max_pages, device=device)                                        # (max_pages,)
    n = pages[:, None]
    # Streaming rows: sinks j < min(sink, n), then the recent pages n - m .. n - 1 with
    # m = min(recent, n - sinks), packed after the sinks.
    sinks = torch.clamp(n, max=sink_pages)
    recents = torch.minimum(torch.full_like(n, recent_pages), n - sinks)
    streaming = torch.where(j < sinks, j, torch.where(j < sinks + recents, n - recents + (j - sinks), -1))
    full = torch.where(j < n, j, -1)
    rows = torch.where(streaming_heads.to(device)[None, :, None], streaming[:, None, :], full[:, None, :])
    return rows.to(torch.int32).contiguous()
