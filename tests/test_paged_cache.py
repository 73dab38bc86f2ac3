"""attnkit.PagedKVCache (CPU) against a host reference: after chunk appends that cross page
boundaries, batches of single tokens, interleaved sequences and free + reuse, the cache
gathered through block_table equals the concatenated inputs exactly, key_min / key_max
equal the min / max over each page's stored keys, and attnkit.decode on the cache equals
reference attention on the concatenated K/V; a full cache raises and changes nothing;
bad input names the argument; opcheck of the append op. Model runs on CUDA too
(tests/test_paged_cache_cuda.py)."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, randn

DTYPES = [torch.float32, torch.bfloat16]
H, D = 2, 16


class Model:
    """The cache plus what each sequence should hold (lists of appended rows)."""

    def __init__(self, gen, dtype, num_pages=12, page_size=4, max_seqs=3, device="cpu", **kw):
        self.gen, self.dtype, self.device = gen, dtype, device
        self.cache = attnkit.PagedKVCache(num_pages, page_size, H, D, dtype=dtype, device=device,
                                          max_seqs=max_seqs, **kw)
        self.k = [[] for _ in range(max_seqs)]
        self.v = [[] for _ in range(max_seqs)]

    def rows(self, n):
        return (randn(self.gen, n, H, D, dtype=self.dtype, device=self.device),
                randn(self.gen, n, H, D, dtype=self.dtype, device=self.device))

    def chunk(self, s, n):
        k, v = self.rows(n)
        self.cache.append(s, k, v)
        self.k[s].append(k)
        self.v[s].append(v)

    def tokens(self, seq_ids):
        k, v = self.rows(len(seq_ids))
        self.cache.append(seq_ids, k, v)
        for i, s in enumerate(seq_ids):
            self.k[s].append(k[i:i + 1])
            self.v[s].append(v[i:i + 1])

    def free(self, s):
        self.cache.free(s)
        self.k[s], self.v[s] = [], []

    def want(self, s):
        empty = torch.empty(0, H, D, dtype=self.dtype, device=self.device)
        return torch.cat(self.k[s] or [empty]), torch.cat(self.v[s] or [empty])

    def check(self):
        c = self.cache
        used = []
        for s in range(c.max_seqs):
            k, v = self.want(s)
            n = k.shape[0]
            n_pages = -(-n // c.page_size)
            assert c.cache_seqlens[s].item() == n == c.seq_len(s)
            table = c.block_table[s]
            assert (table[n_pages:] == -1).all() and (table[:n_pages] >= 0).all()
            assert table[:n_pages].tolist() == c.pages(s)
            pages = table[:n_pages].long()
            used += pages.tolist()
            assert torch.equal(c.k_pages[pages].reshape(-1, H, D)[:n], k), f"keys of sequence {s}"
            assert torch.equal(c.v_pages[pages].reshape(-1, H, D)[:n], v), f"values of sequence {s}"
            for i, p in enumerate(pages.tolist()):
                stored = k[i * c.page_size:(i + 1) * c.page_size].float()
                assert torch.equal(c.key_min[p], stored.amin(0)), f"key_min of page {p}"
                assert torch.equal(c.key_max[p], stored.amax(0)), f"key_max of page {p}"
        assert len(set(used)) == len(used), "a page is held by two sequences"
        assert c.num_free_pages == c.num_pages - len(used)

    def state(self):
        c = self.cache
        return [t.clone() for t in (c.k_pages, c.v_pages, c.key_min, c.key_max, c.block_table, c.cache_seqlens)] + [
            c.num_free_pages, [c.pages(s) for s in range(c.max_seqs)]]


def assert_same_state(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def chunk_appends(m, sizes):
    for n in sizes:
        m.chunk(0, n)
        m.check()


def interleaved_appends(m):
    """Single tokens of interleaved sequences and chunks, free, then reuse of the freed pages."""
    m.chunk(0, 5)
    m.tokens([0, 1, 2])
    m.chunk(1, 6)
    m.tokens(torch.tensor([2, 0]))
    m.check()
    for _ in range(4):
        m.tokens([1, 0, 2])
        m.check()
    freed = m.cache.pages(0)
    m.free(0)
    m.check()
    c = m.cache
    room = c.num_free_pages * c.page_size + len(c.pages(2)) * c.page_size - c.seq_len(2)
    m.chunk(2, room)  # fills the cache, so reuses the freed pages: their key min / max start afresh
    assert set(freed) <= set(c.pages(2)) and c.num_free_pages == 0
    m.check()
    m.free(1)
    m.chunk(0, 3)
    m.tokens([0, 1])
    m.check()


def decode_on_cache(m, gen):
    """attnkit.decode on the cache's tensors equals reference attention over what each
    sequence was given."""
    m.chunk(0, 9)
    m.chunk(1, 3)
    m.chunk(2, 13)
    m.tokens([0, 1, 2])
    m.free(1)
    m.chunk(1, 8)
    m.tokens([2, 1])
    m.check()
    ids = torch.tensor([2, 0, 1], device=m.device)
    q = randn(gen, 3, 1, 4, D, dtype=m.dtype, device=m.device)  # GQA 4:2
    c = m.cache
    out = attnkit.decode(q, c.k_pages, c.v_pages, c.cache_seqlens[ids], block_table=c.block_table[ids])
    for b, s in enumerate(ids.tolist()):
        k, v = m.want(s)
        ref, _ = reference.attention(q[b:b + 1].double(), k[None].double(), v[None].double())
        assert_close(out[b:b + 1], ref, FWD_TOL[m.dtype], f"decode of sequence {s}")


def full_cache(m):
    """Appends that do not fit raise and change nothing; then the cache works on."""
    m.chunk(0, 10)
    m.chunk(1, 7)  # 5 pages used, 2 free rows in page of seq 0 and 1 in seq 1
    before = m.state()
    k, v = m.rows(3)
    with pytest.raises(RuntimeError, match="full"):
        m.cache.append(0, k, v)
    with pytest.raises(RuntimeError, match="full"):
        m.cache.append([0, 1, 2], k, v)  # seq 2 needs a page
    assert_same_state(before, m.state())
    m.check()
    m.chunk(0, 2)  # fits in the partial page
    m.tokens([1])
    m.free(1)
    with pytest.raises(RuntimeError, match="max_pages_per_seq"):
        m.cache.append(2, *m.rows(17))
    m.check()
    m.chunk(2, 8)
    m.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_chunks_cross_pages(gen, dtype, page_size):
    chunk_appends(Model(gen, dtype, num_pages=64 // page_size + 2, page_size=page_size, max_seqs=1),
                  [3, 0, 7, 16, 1, 9, 4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_interleaved_single_tokens_free_and_reuse(gen, dtype):
    interleaved_appends(Model(gen, dtype, num_pages=12, page_size=4, max_seqs=3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_on_cache(gen, dtype):
    decode_on_cache(Model(gen, dtype, num_pages=16, page_size=4, max_seqs=3), gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_cache_changes_nothing(gen, dtype):
    full_cache(Model(gen, dtype, num_pages=5, page_size=4, max_seqs=3, max_pages_per_seq=4))


def test_bad_input(gen):
    m = Model(gen, torch.float32)
    c = m.cache
    k, v = m.rows(2)
    with pytest.raises(ValueError, match="k must be torch.float32"):
        c.append(0, k.double(), v)
    with pytest.raises(ValueError, match="v must have shape"):
        c.append(0, k, v[:1])
    with pytest.raises(ValueError, match="k must have shape"):
        c.append(0, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="k must have shape"):
        c.append([0, 1, 2], k, v)
    with pytest.raises(ValueError, match="seq_ids must be an int in"):
        c.append(3, k, v)
    with pytest.raises(ValueError, match="seq_ids must be distinct"):
        c.append([1, 1], k, v)
    with pytest.raises(ValueError, match="seq_ids must be"):
        c.append(torch.tensor([0.0, 1.0]), k, v)
    with pytest.raises(ValueError, match="seq_id must be an int in"):
        c.free(-1)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        attnkit.PagedKVCache(4, 0, H, D)
    with pytest.raises(ValueError, match="dtype"):
        attnkit.PagedKVCache(4, 4, H, D, dtype=torch.int32)
    with pytest.raises(ValueError, match="slot_mapping"):
        torch.ops.attnkit.paged_cache_append(c.k_pages, c.v_pages, c.key_min, c.key_max, k, v,
                                             torch.tensor([0, c.num_pages * c.page_size]))
    with pytest.raises(ValueError, match="key_min must be float32"):
        torch.ops.attnkit.paged_cache_append(c.k_pages, c.v_pages, c.key_min.double(), c.key_max, k, v,
                                             torch.tensor([0, 1]))
    m.check()  # nothing above wrote anything


def test_opcheck(gen):
    c = attnkit.PagedKVCache(3, 4, H, D, max_seqs=1)
    k, v = randn(gen, 5, H, D), randn(gen, 5, H, D)
    torch.library.opcheck(torch.ops.attnkit.paged_cache_append.default,
                          (c.k_pages, c.v_pages, c.key_min, c.key_max, k, v, torch.tensor([8, 9, 10, 11, 4])))
