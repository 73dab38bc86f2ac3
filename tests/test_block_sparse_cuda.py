"""CUDA block-sparse attention at bench-like shapes against the float64 reference (run on the
GPU; its element mask is built from the lists in Python): forward and backward for random
lists (repeats, any order, padding), top-k, S2 strided shards, empty lists, MInference's
vertical-slash lines with exact columns and random columns, causal with
seqlen_q != seqlen_k, partial blocks, block sizes 64 / 128 / 192, GQA, head_dim 64, 128 and
a padded 80, outputs allocated over NaN-poisoned memory; full lists equal attnkit.attention
(forward and gradients); dK and dV are bit-reproducible; the list ops (canonical form,
transpose) equal the CPU's exactly; unsupported input raises ValueError. All tests are marked
`cuda` and skipped without a GPU or without the CUDA kernel."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cuda_module_marks, randn
from test_prefill_cuda import poison_allocator

pytestmark = cuda_module_marks("block_sparse_attention", "block-sparse attention")

DEV = "cuda"

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, block_size_q, block_size_k, causal, pattern)
SHAPES = [
    (1, 4096, 4096, 4, 1, 128, 64, 64, True, "topk"),
    (2, 2048, 2048, 4, 4, 64, 64, 64, True, "s2"),
    (1, 1999, 3001, 2, 2, 128, 128, 64, True, "random"),    # Sq < Sk, partial blocks
    (1, 3001, 1999, 4, 2, 64, 64, 128, True, "random"),     # Sq > Sk: early rows see nothing
    (1, 1500, 2500, 2, 1, 80, 192, 64, False, "random"),    # padded head_dim, 192-row blocks
    (1, 1024, 1024, 2, 2, 64, 64, 64, False, "empty"),
    (1, 4096, 4096, 4, 2, 128, 64, 64, True, "vslash"),     # blocks of the slash lines + exact columns
    (1, 1999, 2501, 2, 1, 64, 128, 64, True, "columns"),    # random blocks + random columns
]


def shape_id(s):
    return f"q{s[1]}-k{s[2]}-h{s[3]}:{s[4]}-d{s[5]}-b{s[6]}x{s[7]}-c{int(s[8])}-{s[9]}"


def make_lists(shape, q, k, gen):
    """(block indices, block counts, column keyword arguments (empty without columns))."""
    b, sq, sk, h, _, _, bq, bk, causal, pattern = shape
    qb, kb = -(-sq // bq), -(-sk // bk)
    if pattern == "topk":
        return (*attnkit.block_topk_indices(attnkit.pooled_block_scores(q, k, bq), max(1, kb // 8), causal=causal,
                                            local_blocks=1, sink_blocks=1), {})
    if pattern == "s2":
        return (*attnkit.strided_shard_indices(sq, h, stride=4, local_window=2 * bq, block_size=bq, device=DEV), {})
    if pattern == "empty":
        return (torch.full((b, h, qb, 2), -1, dtype=torch.int32, device=DEV),
                torch.full((b, h, qb), 2, dtype=torch.int32, device=DEV), {})
    if pattern == "vslash":
        indices, counts, columns, column_counts = attnkit.vertical_slash_indices(q, k, vertical=300, slash=200,
                                                                                block_size=bq, exact_columns=True)
        return indices, counts, {"column_indices": columns, "column_counts": column_counts}
    indices = torch.randint(-1, kb + 1, (b, h, qb, kb // 2 + 2), generator=gen).int()
    counts = torch.randint(0, kb // 2 + 3, (b, h, qb), generator=gen).int()
    if pattern == "columns":
        indices, counts = indices[..., :3], counts.clamp(max=3)
        columns = torch.randint(-1, sk + 1, (b, h, qb, 200), generator=gen).int()
        column_counts = torch.randint(0, 201, (b, h, qb), generator=gen).int()
        return indices.to(DEV), counts.to(DEV), {"column_indices": columns.to(DEV),
                                                  "column_counts": column_counts.to(DEV)}
    return indices.to(DEV), counts.to(DEV), {}


def run(shape, dtype, gen, grads):
    b, sq, sk, h, hkv, d, bq, bk, causal, _ = shape
    q = randn(gen, b, sq, h, d, dtype=dtype, device=DEV)
    k, v = (randn(gen, b, sk, hkv, d, dtype=dtype, device=DEV) for _ in range(2))
    indices, counts, columns = make_lists(shape, q, k, gen)
    opts = dict(block_size_q=bq, block_size_k=bk, causal=causal)
    q, k, v = (t.requires_grad_(grads) for t in (q, k, v))
    poison_allocator()
    out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, return_lse=True, **opts, **columns)
    full = (indices.expand(b, *indices.shape[1:]), counts.expand(b, *counts.shape[1:]))
    opts.update({name: t.expand(b, *t.shape[1:]) for name, t in columns.items()})  # for the reference
    return q, k, v, out, lse, full, opts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward(shape, dtype):
    q, k, v, out, lse, lists, opts = run(shape, dtype, torch.Generator().manual_seed(0), grads=False)
    ref, ref_lse = reference.block_sparse_attention(q, k, v, *lists, **opts)
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_backward(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    q, k, v, out, lse, lists, opts = run(shape, dtype, gen, grads=True)
    dout = randn(gen, *out.shape, dtype=dtype, device=DEV)
    dlse = randn(gen, *lse.shape, device=DEV)
    seen = torch.isfinite(lse)
    poison_allocator()
    got = torch.autograd.grad((out.float() * dout.float()).sum() + (torch.where(seen, lse, 0) * dlse).sum(),
                              (q, k, v))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.block_sparse_attention(qr, kr, vr, *lists, **opts)
    want = torch.autograd.grad((ref * dout.double()).sum() + (torch.where(seen, ref_lse, 0) * dlse.double()).sum(),
                               (qr, kr, vr))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, GRAD_TOL[dtype], name)


def test_full_lists_equal_dense_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(gen, 2, 1000, 4, 128, dtype=torch.bfloat16, device=DEV).requires_grad_() for _ in range(3))
    blocks = -(-1000 // 64)
    indices = torch.arange(blocks, dtype=torch.int32, device=DEV).expand(2, 4, blocks, blocks)
    counts = torch.full((2, 4, blocks), blocks, dtype=torch.int32, device=DEV)
    out = attnkit.block_sparse_attention(q, k, v, indices, counts, causal=True)
    dense = attnkit.attention(q, k, v, causal=True)
    assert_close(out, dense.double(), FWD_TOL[torch.bfloat16])
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(dense, (q, k, v), dout)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w.double(), GRAD_TOL[torch.bfloat16], name)


def test_dk_dv_reproducible():
    """dK and dV have one writer per row (transposed lists, no atomics): bit-identical runs."""
    q, k, v, out, _, _, _ = run(SHAPES[1], torch.bfloat16, torch.Generator().manual_seed(3), grads=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_list_ops_match_cpu():
    gen = torch.Generator().manual_seed(4)
    indices = torch.randint(-3, 70, (2, 3, 40, 50), generator=gen).int()
    counts = torch.randint(-2, 55, (2, 3, 40), generator=gen).int()
    cpu = torch.ops.attnkit.block_lists_canonical(indices, counts, 64)
    gpu = torch.ops.attnkit.block_lists_canonical(indices.to(DEV), counts.to(DEV), 64)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    cpu_t = torch.ops.attnkit.block_lists_transpose(*cpu, 64)
    gpu_t = torch.ops.attnkit.block_lists_transpose(*gpu, 64)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_t, gpu_t))


def test_unsupported_input():
    lists = (torch.zeros(1, 2, 1, 1, dtype=torch.int32, device=DEV), torch.ones(1, 2, 1, dtype=torch.int32, device=DEV))
    q = torch.randn(1, 16, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attnkit.block_sparse_attention(q, q, q, *lists)
    q = torch.randn(1, 16, 2, 256, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.block_sparse_attention(q, q, q, *lists)
