"""attnkit.compat.flashinfer: block table <-> FlashInfer CSR page table round trips on random
tables (page sizes 1 / 3 / 16, empty and page-aligned sequences), decode over a converted
table equal to decode over the original, the base-2 LSE conversions, merge_state and
merge_states against a float64 computation, bad input."""
import math

import pytest
import torch

import attnkit
from attnkit.compat import flashinfer as fi
from conftest import FWD_TOL, assert_close, assert_lse_close, randn


NUM_PAGES = 160


def random_table(gen, page_size, lens):
    """A block table of shuffled ids in [0, NUM_PAGES) with room for `lens` (int32), two
    spare columns and -1 past each sequence's pages."""
    width = max(-(-n // page_size) for n in lens) + 2
    table = torch.randperm(NUM_PAGES, generator=gen)[:len(lens) * width].view(len(lens), width).int()
    for b, n in enumerate(lens):
        table[b, -(-n // page_size):] = -1
    return table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_block_table_csr_round_trip(gen, page_size):
    lens = [0, 1, page_size, 2 * page_size + 1, 7, 0, 5 * page_size]
    table, seqlens = random_table(gen, page_size, lens)
    indptr, indices, last = fi.block_table_to_csr(table, seqlens, page_size)
    pages = [-(-n // page_size) for n in lens]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert indptr.tolist() == [0] + torch.tensor(pages).cumsum(0).tolist()
    assert indices.tolist() == [int(p) for b, n in enumerate(pages) for p in table[b, :n]]
    assert last.tolist() == [n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)]
    assert all(1 <= x <= page_size for x, p in zip(last.tolist(), pages) if p)
    back, back_lens = fi.csr_to_block_table(indptr, indices, last, page_size)
    assert torch.equal(back_lens, seqlens)
    assert back.shape == (len(lens), max(pages))
    assert torch.equal(back, table[:, :max(pages)])  # -1 past each sequence's pages on both sides


def test_csr_to_block_table_reads_flashinfer_conventions():
    # An empty sequence's last_page_len is ignored; indices may be longer than indptr[-1].
    indptr = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    indices = torch.tensor([7, 4, 9, 99, 98], dtype=torch.int32)
    last = torch.tensor([3, 5, 1], dtype=torch.int32)
    table, lens = fi.csr_to_block_table(indptr, indices, last, 4)
    assert table.tolist() == [[7, 4], [-1, -1], [9, -1]]
    assert lens.tolist() == [7, 0, 1]
    table, lens = fi.csr_to_block_table(torch.zeros(1, dtype=torch.int32), indices, last[:0], 4)
    assert table.shape == (0, 0) and lens.shape == (0,)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_decode_over_converted_table_equals_original(gen, page_size):
    lens = [17, 1, 0, 3 * page_size]
    table, seqlens = random_table(gen, page_size, lens)
    k_pages = randn(gen, NUM_PAGES, page_size, 2, 32)
    v_pages = randn(gen, NUM_PAGES, page_size, 2, 32)
    q = randn(gen, len(lens), 1, 4, 32)
    want = attnkit.decode(q, k_pages, v_pages, seqlens, block_table=table, return_lse=True)
    back, back_lens = fi.csr_to_block_table(*fi.block_table_to_csr(table, seqlens, page_size), page_size)
    got = attnkit.decode(q, k_pages, v_pages, back_lens, block_table=back, return_lse=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lse_base_conversions():
    lse = torch.tensor([0.0, 1.0, -3.5, float("-inf"), 40.0])
    base2 = fi.lse_to_base2(lse)
    torch.testing.assert_close(base2[:3], torch.tensor([0.0, 1 / math.log(2), -3.5 / math.log(2)]))
    assert base2[3] == float("-inf")
    torch.testing.assert_close(fi.lse_from_base2(base2), lse)
    # base 2: sum_j 2^(s2_j) = e^(sum_j ...) for the same logits
    logits = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(fi.lse_to_base2(torch.logsumexp(logits, 0)), torch.log2(torch.exp(logits).sum()))


def merged_float64(vs, ss):
    """The merge of states (v, base-2 s) in float64: weights 2^(s_i - s) with s the base-2 log
    of sum_i 2^(s_i); rows no state saw get 0 and -inf."""
    s = torch.logsumexp(torch.stack([x.double() for x in ss]) * math.log(2), 0) / math.log(2)
    weights = [torch.nan_to_num(torch.exp2(x.double() - s), nan=0.0) for x in ss]
    return sum(w.unsqueeze(-1) * v.double() for w, v in zip(weights, vs)), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_state_matches_float64(gen, dtype):
    seq_len, heads, head_dim = 7, 4, 32
    v_a, v_b = randn(gen, seq_len, heads, head_dim, dtype=dtype), randn(gen, seq_len, heads, head_dim, dtype=dtype)
    s_a, s_b = randn(gen, seq_len, heads) * 4, randn(gen, seq_len, heads) * 4
    s_a[0] = float("-inf")  # only b saw keys
    s_a[1, 0] = s_b[1, 0] = float("-inf")  # no side saw a key
    v, s = fi.merge_state(v_a, s_a, v_b, s_b)
    want_v, want_s = merged_float64([v_a, v_b], [s_a, s_b])
    assert v.dtype == dtype and s.dtype == torch.float32 and s.shape == (seq_len, heads)
    assert_close(v, want_v, FWD_TOL[dtype])
    assert_lse_close(s, want_s, FWD_TOL[torch.float32])
    assert (v[1, 0] == 0).all()


def test_merge_states_matches_float64(gen):
    seq_len, states, heads, head_dim = 5, 6, 2, 16
    v, s = randn(gen, seq_len, states, heads, head_dim), randn(gen, seq_len, states, heads) * 3
    s[:, 2:4] = float("-inf")
    got_v, got_s = fi.merge_states(v, s)
    want_v, want_s = merged_float64(v.unbind(1), s.unbind(1))
    assert_close(got_v, want_v, FWD_TOL[torch.float32])
    assert_lse_close(got_s, want_s, FWD_TOL[torch.float32])
    one_v, one_s = fi.merge_states(v[:, :1], s[:, :1])
    assert torch.equal(one_v, v[:, 0]) and torch.equal(one_s, s[:, 0])


BAD = {
    "page_size": lambda: fi.block_table_to_csr(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                                               0),
    "cache_seqlens": lambda: fi.block_table_to_csr(torch.zeros(1, 1, dtype=torch.int32),
                                                   torch.tensor([5], dtype=torch.int32), 4),
    "block_table": lambda: fi.block_table_to_csr(torch.tensor([[-1]], dtype=torch.int32),
                                                 torch.tensor([2], dtype=torch.int32), 4),
    "indptr": lambda: fi.csr_to_block_table(torch.tensor([0, 3], dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                                            torch.ones(1, dtype=torch.int32), 4),
    "last_page_len": lambda: fi.csr_to_block_table(torch.tensor([0, 1], dtype=torch.int32),
                                                   torch.zeros(1, dtype=torch.int32),
                                                   torch.tensor([5], dtype=torch.int32), 4),
    "indices": lambda: fi.csr_to_block_table(torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1),
                                             torch.ones(1, dtype=torch.int32), 4),
    "s_b": lambda: fi.merge_state(torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(2, 1, 4),
                                  torch.zeros(2, 1, dtype=torch.float64)),
    "v_b": lambda: fi.merge_state(torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(3, 1, 4), torch.zeros(3, 1)),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_input_raises_value_error_naming_it(what):
    with pytest.raises(ValueError, match=what):
        BAD[what]()
