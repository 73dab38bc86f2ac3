"""CUDA decode (lean / stream-K schedule) against the float64 reference (reference.decode):
contiguous and paged caches (page sizes 1, 16, 64, 256 with shuffled block tables), GQA
32:8 and 8:1, 1..16 queries, head_dim 64 / 128 / 256 (and padded 32 / 96), batch mixes with
empty sequences and 64k-token ones, more workers than tiles and far fewer, window, softcap,
CUDA-graph capture of one decode step replayed with new cache_seqlens values written into
the same tensors, the workspace bound (at most 2 partial slots per worker, whatever the
batch), and the errors of unsupported input.

The reference runs in float64 on the GPU. The small cases of tests/test_decode.py run on
CUDA too. All tests here are marked `cuda` and skipped without a GPU or without the CUDA
decode kernel in the build."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, cuda_module_marks, randn
from conftest import paged as paged_cache

pytestmark = cuda_module_marks("decode", "decode")

NEG_INF = float("-inf")
DEV = "cuda"
HALF = [torch.float16, torch.bfloat16]


def run(q, k, v, lens, table=None, **opts):
    return attnkit.decode(q, k, v, lens, block_table=table, return_lse=True, **opts)


def check(q, k, v, lens, table=None, **opts):
    """CUDA decode (out, lse) equals reference.decode; rows that see no key are exactly 0."""
    out, lse = run(q, k, v, lens, table, **opts)
    ref, ref_lse = reference.decode(q.double(), k.double(), v.double(), lens, block_table=table, **opts)
    assert out.dtype == q.dtype and out.device == q.device and out.shape == q.shape
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_close(out, ref, FWD_TOL[q.dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[q.dtype])
    assert (out[(ref_lse == NEG_INF).transpose(1, 2)] == 0).all(), "rows that see no key must be exactly 0"
    return out, lse


def paged(gen, lens, page_size, kv_heads, head_dim, dtype):
    """A paged cache on the GPU (conftest.paged)."""
    return paged_cache(gen, lens, page_size, kv_heads, head_dim, dtype, DEV, spare_pages=3)


def contiguous(gen, lens, capacity, kv_heads, head_dim, dtype):
    k = randn(gen, len(lens), capacity, kv_heads, head_dim, dtype=dtype, device=DEV)
    v = randn(gen, len(lens), capacity, kv_heads, head_dim, dtype=dtype, device=DEV)
    return k, v, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("seqlen_q", [1, 2, 5, 16])
def test_contiguous_gqa32_8(seqlen_q, head_dim, dtype, gen):
    lens = [0, 1, seqlen_q, 100, 3000, 9000]
    k, v, lens = contiguous(gen, lens, 9000, 8, head_dim, dtype)
    q = randn(gen, 6, seqlen_q, 32, head_dim, dtype=dtype, device=DEV)
    check(q, k, v, lens)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
@pytest.mark.parametrize("seqlen_q", [1, 3, 16])
def test_paged(seqlen_q, page_size, dtype, gen):
    lens = [0, 1, page_size, 2 * page_size + 1, 777, 2500]
    k, v, table, lens = paged(gen, lens, page_size, 8, 128, dtype)
    q = randn(gen, 6, seqlen_q, 32, 128, dtype=dtype, device=DEV)
    check(q, k, v, lens, table)
    check(q, k, v, lens, table, window=300, softcap=15.0)


@pytest.mark.parametrize("paged_cache", [False, True], ids=["contiguous", "paged16"])
def test_long_and_empty_mix(paged_cache, gen):
    """One 64k-token sequence among empty and short ones: the long one is split over many
    workers and merged; the empty ones get 0 / -inf."""
    lens = [65536, 0, 7, 0, 1200]
    dtype = torch.bfloat16
    if paged_cache:
        k, v, table, lens_t = paged(gen, lens, 16, 8, 128, dtype)
    else:
        (k, v, lens_t), table = contiguous(gen, lens, 65536, 8, 128, dtype), None
    q = randn(gen, 5, 1, 32, 128, dtype=dtype, device=DEV)
    out, lse = check(q, k, v, lens_t, table)
    assert (out[1] == 0).all() and (lse[1] == NEG_INF).all() and (lse[3] == NEG_INF).all()
    q4 = randn(gen, 5, 4, 32, 128, dtype=dtype, device=DEV)
    check(q4, k, v, lens_t, table, window=4096, softcap=30.0)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_batch_one_long_and_large_batch(batch, gen):
    """Batch 1 (one pair split over every worker) up to a batch with more pairs than
    workers (most pairs whole in one worker, written directly)."""
    lens = [(37 * i * i + 65536 // batch) % 20000 + (i % 5 == 3) for i in range(batch)]
    k, v, lens_t = contiguous(gen, lens, max(lens), 4, 64, torch.float16)
    q = randn(gen, batch, 2, 16, 64, dtype=torch.float16, device=DEV)
    check(q, k, v, lens_t)


@pytest.mark.parametrize("window", [0, 1, 63, 64, 1000])
@pytest.mark.parametrize("seqlen_q", [1, 16])
def test_window_softcap_scale(window, seqlen_q, gen):
    k, v, lens = contiguous(gen, [5, 64, 65, 5000], 5000, 2, 128, torch.bfloat16)
    q = randn(gen, 4, seqlen_q, 16, 128, dtype=torch.bfloat16, device=DEV)
    check(q, k, v, lens, window=window)
    check(q, k, v, lens, window=window, softcap=5.0, scale=0.2)


@pytest.mark.parametrize("heads", [(8, 1), (4, 4), (64, 2)], ids=["gqa8:1", "mha4", "gqa32:1x2"])
@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_heads_and_padded_head_dims(heads, head_dim, gen):
    """Row counts beyond one 16-row pass (32 q heads x 16 queries per kv head) and head
    dims run on the next kernel with zero columns."""
    k, v, lens = contiguous(gen, [1, 513, 2048], 2048, heads[1], head_dim, torch.float16)
    q = randn(gen, 3, 16 if heads[0] // heads[1] >= 8 else 3, heads[0], head_dim, dtype=torch.float16, device=DEV)
    check(q, k, v, lens)


def test_cache_seqlens_past_capacity_are_clamped(gen):
    """On CUDA lengths are not checked (that would need a host sync): one past the
    capacity reads as the capacity, a negative one as 0, never out of bounds."""
    k, v, lens = contiguous(gen, [300, 0], 300, 1, 64, torch.bfloat16)
    q = randn(gen, 2, 1, 2, 64, dtype=torch.bfloat16, device=DEV)
    out, lse = run(q, k, v, torch.tensor([100000, -5], dtype=torch.int32, device=DEV))
    ref, ref_lse = reference.decode(q.double(), k.double(), v.double(), torch.tensor([300, 0], dtype=torch.int32))
    assert_close(out, ref, FWD_TOL[torch.bfloat16], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[torch.bfloat16])


@pytest.mark.parametrize("paged_cache", [False, True], ids=["contiguous", "paged16"])
def test_cuda_graph_capture_and_replay(paged_cache, gen):
    """One decode step captured in a CUDA graph; cache_seqlens (and q) are then rewritten in
    place, including to 0 and to the full capacity, and each replay must equal the eager
    call with the same values."""
    capacity, batch, dtype = 8192, 4, torch.bfloat16
    if paged_cache:
        k, v, table, lens = paged(gen, [capacity] * batch, 16, 8, 128, dtype)
    else:
        (k, v, lens), table = contiguous(gen, [capacity] * batch, capacity, 8, 128, dtype), None
    q = randn(gen, batch, 2, 32, 128, dtype=dtype, device=DEV)
    lens.copy_(torch.tensor([5, 100, 3000, 17], dtype=torch.int32))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: allocator and lazy init outside the capture
            run(q, k, v, lens, table, softcap=20.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = run(q, k, v, lens, table, softcap=20.0)

    for new_lens in ([5, 100, 3000, 17], [0, 0, 0, 0], [capacity, 1, 0, 4097], [2, 8000, 64, 65]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(randn(gen, *q.shape, dtype=dtype, device=DEV))
        graph.replay()
        torch.cuda.synchronize()
        out, lse = run(q, k, v, lens, table, softcap=20.0)
        assert torch.equal(g_out, out), f"graph replay differs from eager for cache_seqlens {new_lens}"
        assert torch.equal(g_lse, lse), f"graph replay lse differs from eager for cache_seqlens {new_lens}"
        check(q, k, v, lens, table, softcap=20.0)


def test_workspace_does_not_grow_with_batch(gen):
    """Issue 16: only a worker's first and last items can be partial, so the workspace holds
    at most 2 slots per worker (W = SMs x resident CTAs per SM) of rows x head_dim floats,
    whatever the batch. Here 256 x 8 pairs of 128 rows at head_dim 128 took 2048 + W - 1
    slots before (~151 MB); now at most 2W (~35 MB at W = 264). Bounded with W <= 4 x SMs."""
    batch, heads_kv, heads_q, seqlen_q, head_dim = 256, 8, 64, 16, 128
    k, v, lens = contiguous(gen, [40] * batch, 64, heads_kv, head_dim, torch.float16)
    q = randn(gen, batch, seqlen_q, heads_q, head_dim, dtype=torch.float16, device=DEV)
    check(q, k, v, lens)  # also warms up: kernel attributes, occupancy, allocator
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = run(q, k, v, lens)
    torch.cuda.synchronize()
    workspace = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size() - lse.numel() * 4
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    slot_bytes = heads_q // heads_kv * seqlen_q * (head_dim + 1) * 4
    assert workspace <= 2 * 4 * sms * slot_bytes + (4 << 20), f"workspace {workspace / 2**20:.1f} MiB"


def test_errors_of_unsupported_input(gen):
    k, v, lens = contiguous(gen, [10], 16, 1, 64, torch.float16)
    q = randn(gen, 1, 1, 2, 64, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="q must be float16 or bfloat16"):
        attnkit.decode(q.float(), k.float(), v.float(), lens)
    k12, v12 = k[..., :12].contiguous(), v[..., :12].contiguous()
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.decode(q[..., :12].contiguous(), k12, v12, lens)
    flat = torch.zeros(k.numel() + 1, dtype=k.dtype, device=DEV)
    k_misaligned = flat[1:].view(k.shape)  # data pointer 2 bytes past 16
    with pytest.raises(ValueError, match="k_cache must have 16-byte aligned rows"):
        attnkit.decode(q, k_misaligned, v, lens)
