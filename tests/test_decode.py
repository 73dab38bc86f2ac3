"""attnkit.decode against the float64 reference: contiguous and paged caches, page sizes 1,
16 and 64 with shuffled page tables, 1..16 queries, GQA, window, softcap, lengths across
page and split boundaries, opcheck, torch.compile, bad input."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import TOL, devices_for, randn, rel_err

DEVICES = devices_for("decode")


def check(q, k_cache, v_cache, lens, table=None, **opts):
    out, lse = attnkit.decode(q, k_cache, v_cache, lens, block_table=table, return_lse=True, **opts)
    ref, ref_lse = reference.decode(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), lens.cpu(),
                                    block_table=None if table is None else table.cpu(), **opts)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any()
    assert rel_err(out, ref) <= TOL[q.dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert rel_err(lse.cpu()[finite], ref_lse[finite]) <= TOL[q.dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen_q", [1, 3, 16])
@pytest.mark.parametrize("heads", [(8, 1), (4, 2), (2, 2)], ids=lambda h: f"h{h[0]}-{h[1]}")
def test_decode_contiguous(heads, seqlen_q, dtype, device, gen):
    h, hkv = heads
    lens = torch.tensor([16, 1000, 4100], dtype=torch.int32, device=device)
    q = randn(gen, 3, seqlen_q, h, 64, dtype=dtype, device=device)
    k = randn(gen, 3, 4200, hkv, 64, dtype=dtype, device=device)
    v = randn(gen, 3, 4200, hkv, 64, dtype=dtype, device=device)
    check(q, k, v, lens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_paged(page_size, dtype, device, gen):
    lens = [1, page_size, 2 * page_size + 1, 700, 1500]  # a page, page boundaries, partial pages
    pages_per_seq = max((n + page_size - 1) // page_size for n in lens) + 1
    num_pages = len(lens) * pages_per_seq + 3
    table = torch.randperm(num_pages, generator=gen)[:len(lens) * pages_per_seq].view(len(lens), pages_per_seq)
    table, lens = table.int().to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(gen, len(lens), 2, 8, 64, dtype=dtype, device=device)
    k = randn(gen, num_pages, page_size, 2, 64, dtype=dtype, device=device)
    v = randn(gen, num_pages, page_size, 2, 64, dtype=dtype, device=device)
    check(q, k, v, lens, table)
    check(q, k, v, lens, table, window=100, softcap=20.0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_window_softcap_odd_head_dim(device, gen):
    lens = torch.tensor([5, 300, 1300], dtype=torch.int32, device=device)
    q = randn(gen, 3, 4, 6, 40, device=device)
    k, v = randn(gen, 3, 1301, 3, 40, device=device), randn(gen, 3, 1301, 3, 40, device=device)
    check(q, k, v, lens, window=0)
    check(q, k, v, lens, window=257, softcap=3.0, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_short_and_empty_sequences(device, gen):
    # A cache shorter than the number of queries: the early queries see no key (out 0, lse -inf).
    lens = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    q = randn(gen, 3, 4, 2, 32, device=device)
    k, v = randn(gen, 3, 8, 2, 32, device=device), randn(gen, 3, 8, 2, 32, device=device)
    out, lse = attnkit.decode(q, k, v, lens, return_lse=True)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    assert (out[1, :2] == 0).all() and torch.isfinite(lse[1, :, 2:]).all()
    check(q, k, v, lens)


def test_decode_matches_attention_and_is_inference_only(gen):
    q, k, v = randn(gen, 1, 3, 4, 32).requires_grad_(), randn(gen, 1, 50, 2, 32), randn(gen, 1, 50, 2, 32)
    out = attnkit.decode(q, k, v, torch.tensor([50], dtype=torch.int32))
    assert rel_err(out, attnkit.attention(q, k, v, causal=True)) <= 1e-5
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_opcheck_and_compile(gen):
    q, k, v = randn(gen, 2, 2, 4, 16), randn(gen, 6, 4, 2, 16), randn(gen, 6, 4, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    table = torch.tensor([[5, 0], [2, 4]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.attnkit.decode.default, (q, k, v, lens, table, 0.25, 0.0, -1))
    torch.library.opcheck(torch.ops.attnkit.decode.default, (q, k[:2], v[:2], lens.clamp(max=4), None, 0.25, 5.0, 2))

    def f(q, k, v, lens, table):
        return attnkit.decode(q, k, v, lens, block_table=table) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v, lens, table), f(q, k, v, lens, table))


def test_bad_input(gen):
    q, k, v = randn(gen, 2, 1, 4, 16), randn(gen, 2, 10, 2, 16), randn(gen, 2, 10, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    pages, table = randn(gen, 4, 4, 2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    bad = [
        ("q", lambda: attnkit.decode(q[0], k, v, lens)),
        ("16", lambda: attnkit.decode(randn(gen, 2, 17, 4, 16), k, v, lens)),
        ("k_cache", lambda: attnkit.decode(q, k.half(), v, lens)),
        ("k_cache", lambda: attnkit.decode(q, k[..., :8], v[..., :8], lens)),
        ("v_cache", lambda: attnkit.decode(q, k, v[:, :5], lens)),
        ("heads", lambda: attnkit.decode(q[:, :, :3], k, v, lens)),
        ("q", lambda: attnkit.decode(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, lens)),
        ("cache_seqlens", lambda: attnkit.decode(q, k, v, lens.long())),
        ("cache_seqlens", lambda: attnkit.decode(q, k, v, lens[:1])),
        ("cache_seqlens", lambda: attnkit.decode(q, k, v, torch.tensor([3, 11], dtype=torch.int32))),
        ("cache_seqlens", lambda: attnkit.decode(q, pages, pages, torch.tensor([3, 9], dtype=torch.int32),
                                                 block_table=table)),
        ("block_table", lambda: attnkit.decode(q, pages, pages, lens, block_table=torch.tensor([[0, 1], [2, 4]], dtype=torch.int32))),
        ("block_table", lambda: attnkit.decode(q, pages, pages, lens, block_table=torch.tensor([[-1, 1], [2, 3]], dtype=torch.int32))),
        ("block_table", lambda: attnkit.decode(q, pages, pages, lens, block_table=table.long())),
        ("window", lambda: attnkit.decode(q, k, v, lens, window=-2)),
        ("softcap", lambda: attnkit.decode(q, k, v, lens, softcap=-0.5)),
    ]
    for name, call in bad:
        with pytest.raises((ValueError, RuntimeError), match=name):
            call()
    # Page ids past a sequence's last page are ignored, whatever they hold.
    attnkit.decode(q, pages, pages, torch.tensor([3, 4], dtype=torch.int32),
                   block_table=torch.tensor([[0, 99], [2, -5]], dtype=torch.int32))
