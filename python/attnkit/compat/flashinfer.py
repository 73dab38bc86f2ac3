"""Layout conversions for FlashInfer users: its CSR page tables (paged_kv_indptr,
paged_kv_indices, paged_kv_last_page_len) to and from the block tables attnkit.decode,
PagedKVCache and flash_attn_with_kvcache use; its base-2 log-sum-exp to and from attnkit's
natural log; and merge_state / merge_states in its layout on attnkit.merge_attention_states.
docs/compat_flash_attn.md has the conventions.
"""
import math

import torch

from .._checks import check_tensor
from ..merge import merge_attention_states

LN_2 = math.log(2.0)


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _int_tensor(t, name, dim):
    check_tensor(t, name)
    _require(t.dtype in (torch.int32, torch.int64) and t.dim() == dim,
             f"{name} must be an int32 (or int64) tensor with {dim} dimension(s), got {t.dtype} of shape "
             f"{tuple(t.shape)}")


def _page_size(page_size):
    _require(isinstance(page_size, int) and not isinstance(page_size, bool) and page_size > 0,
             f"page_size must be a positive int, got {page_size!r}")


def block_table_to_csr(block_table, cache_seqlens, page_size):
    """FlashInfer's (paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len), int32, of a
    block table: sequence b holds cache_seqlens[b] tokens in pages block_table[b, :n_b], n_b =
    ceil(cache_seqlens[b] / page_size). indptr (batch + 1,): sequence b's pages are
    indices[indptr[b]:indptr[b + 1]], in order; last_page_len (batch,): the tokens in its last
    page, in [1, page_size], and 0 for an empty sequence (no pages; FlashInfer reads a
    sequence without pages as empty whatever its last_page_len). Reads the lengths on the
    host: the size of indices depends on them."""
    _page_size(page_size)
    _int_tensor(block_table, "block_table", 2)
    _int_tensor(cache_seqlens, "cache_seqlens", 1)
    _require(cache_seqlens.shape[0] == block_table.shape[0] and cache_seqlens.device == block_table.device,
             f"cache_seqlens must have one entry per block_table row ({block_table.shape[0]}) on its device, got "
             f"shape {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    lengths = cache_seqlens.long()
    pages = (lengths + page_size - 1) // page_size
    _require(bool(((lengths >= 0) & (pages <= block_table.shape[1])).all()),
             f"cache_seqlens must lie in [0, {block_table.shape[1] * page_size}] (block_table's pages x page_size), "
             f"got {cache_seqlens.tolist()}")
    used = torch.arange(block_table.shape[1], device=block_table.device) < pages[:, None]
    indices = block_table[used]
    _require(bool((indices >= 0).all()), "block_table must hold page ids >= 0 in the pages the sequences use")
    indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)])
    last_page_len = lengths - (pages - 1).clamp(min=0) * page_size
    return indptr.int(), indices.int(), last_page_len.int()


def csr_to_block_table(indptr, indices, last_page_len, page_size):
    """(block_table, cache_seqlens), int32, of FlashInfer's paged_kv_indptr /
    paged_kv_indices / paged_kv_last_page_len. block_table (batch, most pages of a sequence):
    row b holds indices[indptr[b]:indptr[b + 1]], then -1 (unused, as in PagedKVCache);
    cache_seqlens[b] = (pages - 1) * page_size + last_page_len[b], or 0 for a sequence with no
    pages. indices may be longer than indptr[-1]. Reads indptr on the host: the table's
    width depends on it."""
    _page_size(page_size)
    for t, name in ((indptr, "indptr"), (indices, "indices"), (last_page_len, "last_page_len")):
        _int_tensor(t, name, 1)
        _require(t.device == indptr.device, f"{name} must be on indptr's device ({indptr.device}), got {t.device}")
    batch = indptr.shape[0] - 1
    _require(batch >= 0 and last_page_len.shape[0] == batch,
             f"indptr must have batch + 1 entries and last_page_len batch entries, got {indptr.shape[0]} and "
             f"{last_page_len.shape[0]}")
    counts = (indptr[1:] - indptr[:-1]).long()
    _require(batch == 0 or (int(indptr[0]) == 0 and bool((counts >= 0).all()) and int(indptr[-1]) <= indices.shape[0]),
             f"indptr must start at 0, not decrease, and end at most at len(indices) = {indices.shape[0]}, got "
             f"{indptr.tolist()}")
    has_pages = counts > 0
    _require(bool(((last_page_len >= 1) & (last_page_len <= page_size) | ~has_pages).all()),
             f"last_page_len must lie in [1, page_size = {page_size}] for sequences with pages, got "
             f"{last_page_len.tolist()}")
    width = int(counts.max()) if batch else 0
    table = torch.full((batch, width), -1, dtype=torch.int32, device=indptr.device)
    table[torch.arange(width, device=indptr.device) < counts[:, None]] = indices[:int(counts.sum())].int()
    seqlens = torch.where(has_pages, (counts - 1) * page_size + last_page_len, 0)
    return table, seqlens.int()


def lse_to_base2(lse):
    """attnkit's natural-log LSE as FlashInfer's base-2 one: lse / ln 2 (-inf stays -inf)."""
    check_tensor(lse, "lse")
    return lse / LN_2


def lse_from_base2(lse):
    """FlashInfer's base-2 LSE as attnkit's natural-log one: lse * ln 2 (-inf stays -inf)."""
    check_tensor(lse, "lse")
    return lse * LN_2


def _state(v, s, v_name, s_name, dim):
    check_tensor(v, v_name)
    check_tensor(s, s_name)
    _require(v.dim() == dim and s.dtype == torch.float32 and s.shape == v.shape[:-1],
             f"{v_name} must have {dim} dimensions and {s_name} be float32 of {v_name}'s shape without head_dim, "
             f"got {tuple(v.shape)} and {s.dtype} {tuple(s.shape)}")


def merge_state(v_a, s_a, v_b, s_b):
    """FlashInfer's merge_state: the attention over the union of two disjoint key sets from the
    attentions over each. v_* (seq_len, num_heads, head_dim), s_* float32 (seq_len,
    num_heads) base-2 LSE. Returns (v like v_a, s float32 (seq_len, num_heads)); a row both
    sides saw no key of gets 0 and -inf."""
    _state(v_a, s_a, "v_a", "s_a", 3)
    _state(v_b, s_b, "v_b", "s_b", 3)
    _require(v_b.shape == v_a.shape, f"v_b must have v_a's shape {tuple(v_a.shape)}, got {tuple(v_b.shape)}")
    v, lse = merge_attention_states(v_a, lse_from_base2(s_a).t(), v_b, lse_from_base2(s_b).t())
    return v, lse_to_base2(lse).t().contiguous()


def merge_states(v, s):
    """FlashInfer's merge_states: merge_state folded over num_states. v (seq_len, num_states,
    num_heads, head_dim), s float32 (seq_len, num_states, num_heads) base-2 LSE. Returns
    (v (seq_len, num_heads, head_dim), s (seq_len, num_heads))."""
    _state(v, s, "v", "s", 4)
    _require(v.shape[1] >= 1, "v must hold num_states >= 1 states")
    if v.shape[1] == 1:
        return v[:, 0].clone(), s[:, 0].clone()
    merged, lse = v[:, 0], lse_from_base2(s[:, 0]).t()
    for i in range(1, v.shape[1]):
        merged, lse = merge_attention_states(merged, lse, v[:, i], lse_from_base2(s[:, i]).t())
    return merged, lse_to_base2(lse).t().contiguous()
