"""CUDA PagedKVCache append (the fused row copy + key min / max kernel) against the CPU
kernel and the host model of tests/test_paged_cache.py: after chunk appends across page
boundaries (page sizes 1 to 64), batches of single tokens, free + reuse, long chunks, keys
with signed zeros and NaN, and rows that are not 16-byte aligned, every tensor of the cache
is bit-identical to a CPU cache given the same appends; a full cache raises and changes
nothing; slots outside the cache are skipped, not written; decode on the cache matches the
reference; opcheck. Marked `cuda`, skipped without a GPU or the CUDA kernel."""
import pytest
import torch

import attnkit
from conftest import cuda_module_marks, randn
from test_paged_cache import D, H, Model, chunk_appends, decode_on_cache, full_cache, interleaved_appends

pytestmark = cuda_module_marks("paged_cache_append", "PagedKVCache append")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATE = ("k_pages", "v_pages", "key_min", "key_max", "block_table", "cache_seqlens")


def bits(t):
    """The raw bits of a tensor, so that -0 / +0 and NaN payloads count."""
    t = t.detach().cpu().contiguous()
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


class Twin(Model):
    """A CUDA cache (checked by Model against the appended rows) and a CPU cache that takes
    the same appends: their tensors must be bit-identical."""

    def __init__(self, gen, dtype, num_pages=12, page_size=4, max_seqs=3, **kw):
        super().__init__(gen, dtype, num_pages, page_size, max_seqs, device="cuda", **kw)
        self.twin = attnkit.PagedKVCache(num_pages, page_size, H, D, dtype=dtype, device="cpu", max_seqs=max_seqs,
                                         **kw)

    def chunk(self, s, n):
        super().chunk(s, n)
        self.twin.append(s, self.k[s][-1].cpu(), self.v[s][-1].cpu())

    def tokens(self, seq_ids):
        super().tokens(seq_ids)
        ids = [int(s) for s in seq_ids]
        self.twin.append(ids, torch.cat([self.k[s][-1] for s in ids]).cpu(),
                         torch.cat([self.v[s][-1] for s in ids]).cpu())

    def free(self, s):
        super().free(s)
        self.twin.free(s)

    def check(self):
        super().check()
        for name in STATE:
            got, want = getattr(self.cache, name), getattr(self.twin, name)
            assert got.device.type == "cuda", name
            assert torch.equal(bits(got), bits(want)), f"{name}: CUDA and CPU caches differ"
        assert [self.cache.pages(s) for s in range(self.cache.max_seqs)] == [
            self.twin.pages(s) for s in range(self.twin.max_seqs)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 4, 16, 64])
def test_chunks_cross_pages(gen, dtype, page_size):
    chunk_appends(Twin(gen, dtype, num_pages=160 // page_size + 2, page_size=page_size, max_seqs=1),
                  [3, 0, 7, 16, 1, 9, 4, 70, 33])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interleaved_single_tokens_free_and_reuse(gen, dtype):
    interleaved_appends(Twin(gen, dtype, num_pages=12, page_size=4, max_seqs=3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_on_cache(gen, dtype):
    decode_on_cache(Twin(gen, dtype, num_pages=16, page_size=4, max_seqs=3), gen)


def test_full_cache_changes_nothing(gen):
    full_cache(Twin(gen, torch.bfloat16, num_pages=5, page_size=4, max_seqs=3, max_pages_per_seq=4))


def test_long_chunks_many_sequences(gen):
    """Prefill-sized chunks (1000+ tokens, 8 kv heads of 128 channels) next to decode steps
    of 64 sequences: the vectorized path with long page runs."""
    heads, dim, page_size, seqs = 8, 128, 16, 64
    gpu = attnkit.PagedKVCache(600, page_size, heads, dim, dtype=torch.bfloat16, device="cuda", max_seqs=seqs)
    cpu = attnkit.PagedKVCache(600, page_size, heads, dim, dtype=torch.bfloat16, device="cpu", max_seqs=seqs)
    for s, n in [(0, 1000), (1, 1), (2, 2049), (0, 77)]:
        k, v = (randn(gen, n, heads, dim, dtype=torch.bfloat16) for _ in range(2))
        gpu.append(s, k.cuda(), v.cuda())
        cpu.append(s, k, v)
    for _ in range(3):
        k, v = (randn(gen, seqs, heads, dim, dtype=torch.bfloat16) for _ in range(2))
        gpu.append(list(range(seqs)), k.cuda(), v.cuda())
        cpu.append(list(range(seqs)), k, v)
    for name in STATE:
        assert torch.equal(bits(getattr(gpu, name)), bits(getattr(cpu, name))), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_signed_zeros_nan_and_unaligned_rows(gen, dtype):
    """Keys made of -0, +0, NaN and a few numbers: the bounds keep the CPU's first-zero-stays
    and NaN-is-skipped rules bit for bit. k / v start one element off 16 bytes, so the
    kernel takes its one-element-per-thread path."""
    m = Twin(gen, dtype, num_pages=8, page_size=4, max_seqs=2)
    choices = torch.tensor([0.0, -0.0, float("nan"), 1.5, -2.0], dtype=torch.float64)
    for s, n in [(0, 6), (1, 3), (0, 5), (1, 1)]:
        k = choices[torch.randint(0, 5, (n, H, D + 1), generator=gen)].to(dtype).cuda()[..., 1:]
        v = randn(gen, n, H, D + 1, dtype=dtype, device="cuda")[..., 1:]
        m.cache.append(s, k, v)
        m.twin.append(s, k.cpu(), v.cpu())
    for name in STATE:
        assert torch.equal(bits(getattr(m.cache, name)), bits(getattr(m.twin, name))), name


def test_slots_outside_the_cache_are_skipped(gen):
    """The CUDA kernel cannot check slot values without a host sync: it skips bad slots
    (the CPU binding raises ValueError for them)."""
    c = attnkit.PagedKVCache(3, 4, H, D, device="cuda", max_seqs=1)
    k, v = randn(gen, 3, H, D, device="cuda"), randn(gen, 3, H, D, device="cuda")
    before = [getattr(c, name).clone() for name in STATE]
    torch.ops.attnkit.paged_cache_append(c.k_pages, c.v_pages, c.key_min, c.key_max, k, v,
                                         torch.tensor([-1, 12, 1 << 40], device="cuda"))
    torch.cuda.synchronize()
    assert all(torch.equal(bits(getattr(c, name)), bits(t)) for name, t in zip(STATE, before))
    torch.ops.attnkit.paged_cache_append(c.k_pages, c.v_pages, c.key_min, c.key_max, k, v,
                                         torch.tensor([4, 5, 12], device="cuda"))
    assert torch.equal(c.k_pages[1, :2], k[:2]) and torch.equal(c.v_pages[1, :2], v[:2])
    assert torch.equal(c.key_min[1], k[:2].amin(0)) and torch.equal(c.key_max[1], k[:2].amax(0))
    assert torch.equal(c.k_pages[[0, 2]], before[0][[0, 2]]), "the skipped slot's page is untouched"


def test_bad_input(gen):
    c = attnkit.PagedKVCache(4, 4, H, D, device="cuda", max_seqs=2)
    k, v = randn(gen, 2, H, D, device="cuda"), randn(gen, 2, H, D, device="cuda")
    with pytest.raises(ValueError, match="k must be torch.float32 on cuda"):
        c.append(0, k.cpu(), v)
    with pytest.raises(ValueError, match="slot_mapping must be on the device of k_pages"):
        torch.ops.attnkit.paged_cache_append(c.k_pages, c.v_pages, c.key_min, c.key_max, k, v, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="key_min must be on the device of k_pages"):
        torch.ops.attnkit.paged_cache_append(c.k_pages, c.v_pages, c.key_min.cpu(), c.key_max, k, v,
                                             torch.tensor([0, 1], device="cuda"))


def test_opcheck(gen):
    c = attnkit.PagedKVCache(3, 4, H, D, max_seqs=1, device="cuda")
    k, v = randn(gen, 5, H, D, device="cuda"), randn(gen, 5, H, D, device="cuda")
    torch.library.opcheck(torch.ops.attnkit.paged_cache_append.default,
                          (c.k_pages, c.v_pages, c.key_min, c.key_max, k, v,
                           torch.tensor([8, 9, 10, 11, 4], device="cuda")))
