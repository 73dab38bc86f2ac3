"""attnkit.block_sparse_attention against the float64 reference (attnkit.reference builds the
element mask from the lists entry by entry in Python, independently of
csrc/include/attnkit/block_sparse.h): forward out and LSE, gradients (through out and lse),
for random, empty, full (== attention), repeated / unsorted / out-of-range lists, causal with
seqlen_q != seqlen_k, sequences that are not multiples of the block sizes, block sizes of
64 and 128, GQA, fp32 / fp16 / bf16; every pattern builder against a naive torch version;
the transpose op; opcheck, torch.compile, poisoned outputs and bad input. CUDA rows run where
a GPU and the kernel are present; tests/test_block_sparse_cuda.py holds the large CUDA shapes."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, devices_for, randn, skip_unsupported

DEVICES = devices_for("block_sparse_attention")


def random_lists(gen, batch, heads, q_blocks, k_blocks, list_len, *, canonical=False):
    """Random lists with repeats, any order, -1 and too-large entries, and counts that may
    exceed the list (clamped) or be negative."""
    if canonical:
        keep = torch.rand(batch, heads, q_blocks, k_blocks, generator=gen) < 0.5
        return attnkit.lists_from_block_mask(keep)
    indices = torch.randint(-1, k_blocks + 1, (batch, heads, q_blocks, list_len), generator=gen).int()
    counts = torch.randint(-1, list_len + 2, (batch, heads, q_blocks), generator=gen).int()
    return indices, counts


def check(q, k, v, indices, counts, gen, *, grads=True, lse_grad=True, **opts):
    """Forward (out, lse) and gradients of q, k, v (a loss on out and lse) against the reference."""
    dtype = q.dtype
    q, k, v = (t.requires_grad_(grads) for t in (q, k, v))
    out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, return_lse=True, **opts)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_(grads) for t in (q, k, v))
    ref_opts = {name: opts[name] for name in ("block_size_q", "block_size_k", "causal", "scale", "softcap")
                if name in opts}
    for name in ("column_indices", "column_counts"):
        if opts.get(name) is not None:
            ref_opts[name] = opts[name].expand(q.shape[0], *opts[name].shape[1:])
    ref, ref_lse = reference.block_sparse_attention(qr, kr, vr, indices.expand(q.shape[0], *indices.shape[1:]),
                                                    counts.expand(q.shape[0], *counts.shape[1:]), **ref_opts)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    if grads:
        dout = randn(gen, *out.shape, dtype=dtype, device=q.device)
        dlse = randn(gen, *lse.shape, device=q.device) if lse_grad else torch.zeros_like(lse)
        seen = torch.isfinite(ref_lse)  # d lse of a row that sees nothing is not defined
        loss = (out.float() * dout.float()).sum() + (torch.where(seen.to(q.device), lse, 0) * dlse).sum()
        ref_loss = (ref * dout.cpu().double()).sum() + (torch.where(seen, ref_lse, 0) * dlse.cpu().double()).sum()
        got = torch.autograd.grad(loss, (q, k, v))
        want = torch.autograd.grad(ref_loss, (qr, kr, vr))
        for name, g, w, t in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert_close(g, w, GRAD_TOL[dtype], name)
    return out, lse


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, block_size_q, block_size_k, causal)
CASES = [
    (2, 200, 200, 2, 2, 32, 64, 64, False),
    (1, 256, 256, 4, 2, 64, 64, 64, True),           # GQA, multiples of the blocks
    (1, 130, 300, 2, 1, 16, 64, 128, True),          # causal Sq < Sk, MQA, partial blocks
    (1, 300, 130, 2, 2, 24, 128, 64, True),          # causal Sq > Sk: early rows see nothing
    (2, 97, 161, 3, 3, 40, 64, 64, False),
]


def case_id(c):
    return "b{}-q{}-k{}-h{}:{}-d{}-bq{}-bk{}-c{}".format(*c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_lists(case, device, gen):
    b, sq, sk, h, hkv, d, bq, bk, causal = case
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    qb, kb = -(-sq // bq), -(-sk // bk)
    indices, counts = random_lists(gen, b, h, qb, kb, kb + 2)
    q, k, v = (randn(gen, b, s, n, d, dtype=dtype, device=device) for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
    check(q, k, v, indices.to(device), counts.to(device), gen, block_size_q=bq, block_size_k=bk, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half(dtype, device, gen):
    b, sq, sk, h, hkv, d = 1, 190, 250, 4, 2, 64
    indices, counts = random_lists(gen, b, h, 3, 4, 3)
    q, k, v = (randn(gen, b, s, n, d, dtype=dtype, device=device) for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
    check(q, k, v, indices.to(device), counts.to(device), gen, causal=True, softcap=5.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_full_lists_equal_dense_attention(causal, device, gen):
    """Every key block listed: the dense attention's numbers, bit for bit on the CPU (the
    same tiles in the same order)."""
    b, sq, sk, h, d = 1, 150, 230, 2, 32
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (randn(gen, b, s, h, d, dtype=dtype, device=device) for s in (sq, sk, sk))
    qb, kb = -(-sq // 64), -(-sk // 64)
    indices = torch.arange(kb, dtype=torch.int32, device=device).expand(b, h, qb, kb)
    counts = torch.full((b, h, qb), kb, dtype=torch.int32, device=device)
    out, lse = check(q.clone(), k.clone(), v.clone(), indices, counts, gen, causal=causal)
    dense, dense_lse = attnkit.attention(q, k, v, causal=causal, return_lse=True)
    if device == "cpu" and not causal:
        assert torch.equal(out, dense) and torch.equal(lse, dense_lse)
    else:
        assert_close(out, dense.double(), FWD_TOL[dtype], "out vs attention")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists(device, gen):
    """No block listed: out 0, lse -inf, gradients 0 (no NaN)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (randn(gen, 1, 100, 2, 32, dtype=dtype, device=device).requires_grad_() for _ in range(3))
    indices = torch.full((1, 2, 2, 3), -1, dtype=torch.int32, device=device)
    counts = torch.tensor([[[0, 3], [2, 0]]], dtype=torch.int32, device=device)  # counts over -1 entries
    out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_lists_are_sets(gen):
    """Repeats, order, padding, out-of-range entries and counts beyond the list: the same
    numbers as the canonical list of the same set."""
    q, k, v = (randn(gen, 1, 256, 2, 16) for _ in range(3))
    messy = torch.tensor([[[[3, 1, 3, -1, 7, 1], [0, 0, 0, 0, 0, 2]], [[2, -5, 2, 2, 9, 0], [1, 3, 2, 0, 1, 3]]]],
                         dtype=torch.int32).repeat(1, 1, 2, 1)
    counts = torch.tensor([[[6, 99, 6, 2], [4, -3, 5, 6]]], dtype=torch.int32)
    indices, canonical_counts = attnkit.canonical_block_lists(messy, counts, 4)
    assert indices.tolist()[0][0][:2] == [[1, 3, -1, -1, -1, -1], [0, 2, -1, -1, -1, -1]]
    assert canonical_counts.tolist() == [[[2, 2, 2, 1], [1, 0, 1, 4]]]
    a = attnkit.block_sparse_attention(q, k, v, messy, counts)
    b = attnkit.block_sparse_attention(q, k, v, indices, canonical_counts)
    assert torch.equal(a, b)
    check(q, k, v, messy, counts, gen)


def test_transpose_op(gen):
    """block_lists_transpose: query blocks per key block, ascending, against a naive loop."""
    indices, counts = random_lists(gen, 2, 3, 5, 7, 0, canonical=True)
    t_indices, t_counts = torch.ops.attnkit.block_lists_transpose(indices, counts, 7)
    assert t_indices.shape == (2, 3, 7, 5) and t_counts.shape == (2, 3, 7)
    for b in range(2):
        for h in range(3):
            for n in range(7):
                want = [m for m in range(5) if n in indices[b, h, m, :counts[b, h, m]].tolist()]
                assert t_indices[b, h, n].tolist() == want + [-1] * (5 - len(want))
                assert t_counts[b, h, n].item() == len(want)


def test_batch_one_lists_broadcast(gen):
    q, k, v = (randn(gen, 3, 128, 2, 16) for _ in range(3))
    indices, counts = attnkit.strided_shard_indices(128, 2, stride=2, local_window=64, block_size=64)
    out = attnkit.block_sparse_attention(q, k, v, indices, counts, causal=True)
    for b in range(3):
        assert torch.equal(out[b:b + 1], attnkit.block_sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], indices,
                                                                        counts, causal=True))


def test_poisoned_outputs_are_overwritten(gen):
    """Every element of out, lse, dq, dk and dv is written: the kernels' outputs come from
    at::empty, so allocator blocks freed full of NaN just before must not show through (rows
    that see nothing included: out 0, lse -inf)."""
    q, k, v = (randn(gen, 1, 150, 2, 16).requires_grad_() for _ in range(3))
    indices, counts = random_lists(gen, 1, 2, 3, 3, 4)
    counts[0, 0, 1] = 0  # a query block that sees nothing
    for _ in range(3):
        poison = [torch.full((n,), float("nan")) for n in (150 * 2 * 16, 2 * 150, 150 * 2 * 16 * 3)]
        del poison
        out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, causal=True, return_lse=True)
        assert torch.isfinite(out).all() and not lse.isnan().any()
        assert torch.equal(out[0, 64:128, 0], torch.zeros(64, 16)) and bool((lse[0, 0, 64:128] == float("-inf")).all())
        q.grad = k.grad = v.grad = None
        (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---- pattern builders ----------------------------------------------------------------------------

def naive_topk(scores, top_k, threshold, causal, local, sink):
    b, h, mq, nk = scores.shape
    keep = torch.zeros(b, h, mq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for m in range(mq):
                d = m + nk - mq
                eligible = [n for n in range(nk) if not causal or n <= d]
                forced = {n for n in eligible if n < sink or d - local < n <= d}
                rest = [n for n in eligible if n not in forced and scores[bi, hi, m, n] > float("-inf")
                        and (threshold is None or scores[bi, hi, m, n] >= threshold)]
                rest.sort(key=lambda n: (-scores[bi, hi, m, n].item(), n))
                for n in forced | set(rest if top_k is None else rest[:top_k]):
                    keep[bi, hi, m, n] = True
    return keep


@pytest.mark.parametrize("top_k, threshold, causal, local, sink",
                         [(3, None, True, 1, 1), (2, None, False, 0, 0), (None, 0.3, True, 2, 0),
                          (4, 0.1, False, 1, 2), (0, None, True, 1, 1)])
def test_block_topk_indices(top_k, threshold, causal, local, sink, gen):
    scores = torch.rand(2, 3, 6, 8, generator=gen)
    scores[0, 0, 2, 3] = float("nan")
    scores[1, 2, 4, 1] = float("-inf")
    indices, counts = attnkit.block_topk_indices(scores, top_k, threshold=threshold, causal=causal,
                                                 local_blocks=local, sink_blocks=sink)
    want = naive_topk(scores, top_k, threshold, causal, local, sink)
    got = torch.zeros_like(want)
    for bi, hi, m, i in (indices >= 0).nonzero().tolist():
        got[bi, hi, m, indices[bi, hi, m, i]] = True
    assert torch.equal(got, want)
    assert torch.equal(counts, want.sum(-1).int())
    assert torch.equal(attnkit.canonical_block_lists(indices, counts, 8)[0], indices)  # canonical already


def test_pooled_block_scores(gen):
    q, k = randn(gen, 2, 150, 4, 16), randn(gen, 2, 100, 2, 16)
    got = attnkit.pooled_block_scores(q, k, 64)
    qm = torch.stack([q[:, s:s + 64].mean(1) for s in range(0, 150, 64)], 2)  # (b, heads, blocks, d)
    km = torch.stack([k[:, s:s + 64].mean(1) for s in range(0, 100, 64)], 2).repeat_interleave(2, dim=1)
    assert_close(got, torch.einsum("bhmd,bhnd->bhmn", qm.double(), km.double()) / 4.0, 1e-5, "scores")


def test_strided_shard_indices_cover_every_key():
    seqlen, heads, stride, block = 1000, 4, 4, 64
    indices, counts = attnkit.strided_shard_indices(seqlen, heads, stride=stride, local_window=128, block_size=block)
    blocks = -(-seqlen // block)
    visible = reference.block_sparse_mask(indices, counts, seqlen, seqlen, block_size_q=block, block_size_k=block,
                                          causal=True)[0]
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    for h in range(heads):
        shard = ((j // block + h + 1) % stride == 0) | ((i // block - j // block) < 2)
        assert torch.equal(visible[h], shard & (j <= i)), h
    assert torch.equal(visible.any(0), (j <= i).expand(seqlen, seqlen))  # heads together: every causal key
    assert counts.shape == (1, heads, blocks)
    with pytest.raises(ValueError, match="stride"):
        attnkit.strided_shard_indices(seqlen, 2, stride=4, local_window=0, block_size=block)


@pytest.mark.parametrize("seqlen, vertical, slash", [(300, 20, 30), (256, 7, 200)])
def test_vertical_slash_indices(seqlen, vertical, slash, gen):
    """The lines of a naive float64 estimate (loops over queries and keys), then the blocks
    each kept column lies in and each kept diagonal crosses, row by row."""
    q, k = randn(gen, 1, seqlen, 4, 16), randn(gen, 1, seqlen, 2, 16)
    last_q, block = 48, 64
    indices, counts = attnkit.vertical_slash_indices(q, k, last_q=last_q, vertical=vertical, slash=slash,
                                                     block_size=block)
    blocks = -(-seqlen // block)
    want = torch.zeros(1, 4, blocks, blocks, dtype=torch.bool)
    for h in range(4):
        qs, ks = q[0, -last_q:, h].double(), k[0, :, h // 2].double()
        vertical_scores, slash_scores = torch.zeros(seqlen, dtype=torch.float64), torch.zeros(seqlen, dtype=torch.float64)
        for row in range(last_q):
            i = seqlen - last_q + row
            p = torch.softmax((ks[:i + 1] @ qs[row]) / 4.0, dim=0)
            for j in range(i + 1):
                vertical_scores[j] += p[j]
                slash_scores[i - j] += p[j]
        columns = vertical_scores.topk(vertical).indices.tolist()
        offsets = slash_scores.topk(slash).indices.tolist()
        for m in range(blocks):
            for i in range(m * block, (m + 1) * block):
                for j in [c for c in columns if c // block <= m] + [i - o for o in offsets if i - o >= 0]:
                    want[0, h, m, j // block] = True
    got = torch.zeros_like(want)
    for b, h, m, i in (indices >= 0).nonzero().tolist():
        got[b, h, m, indices[b, h, m, i]] = True
    assert torch.equal(got, want)
    assert torch.equal(counts, want.sum(-1).int())


@pytest.mark.parametrize("causal", [False, True])
def test_block_attention_map(causal, gen):
    q, k = randn(gen, 1, 200, 4, 16), randn(gen, 1, 150, 2, 16)
    got = attnkit.block_attention_map(q, k, block_size=64, causal=causal, chunk_rows=64)
    want = reference.block_attention_map(q, k, block_size=64, causal=causal)
    assert got.shape == want.shape == (1, 4, 4, 3)
    assert_close(got, want, 1e-5, "block map")


def test_builders_feed_the_op(gen):
    """pooled scores -> top-k lists -> attention, against the reference on the same lists."""
    q, k, v = (randn(gen, 1, 320, 2, 32) for _ in range(3))
    indices, counts = attnkit.block_topk_indices(attnkit.pooled_block_scores(q, k, 64), 2, causal=True,
                                                 local_blocks=1, sink_blocks=1)
    check(q, k, v, indices, counts, gen, causal=True)


# ---- compile, opcheck, bad input -----------------------------------------------------------------

def test_opcheck(gen):
    q = randn(gen, 1, 130, 4, 16).requires_grad_()
    k, v = (randn(gen, 1, 200, 2, 16).requires_grad_() for _ in range(2))
    indices, counts = random_lists(gen, 1, 4, 3, 4, 0, canonical=True)
    args = (q, k, v, indices, counts, 64, 64, True, 0.25, 0.0)
    torch.library.opcheck(torch.ops.attnkit.block_sparse_fwd.default, args)
    out, lse = torch.ops.attnkit.block_sparse_fwd(*args)
    t_indices, t_counts = torch.ops.attnkit.block_lists_transpose(indices, counts, 4)
    torch.library.opcheck(torch.ops.attnkit.block_lists_transpose.default, (indices, counts, 4))
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), indices, counts,
           t_indices, t_counts, 64, 64, True, 0.25, 0.0, torch.randn_like(lse))
    torch.library.opcheck(torch.ops.attnkit.block_sparse_bwd.default, bwd)


def test_torch_compile_fullgraph(gen):
    q = randn(gen, 2, 150, 4, 16).requires_grad_()
    k, v = (randn(gen, 2, 150, 2, 16).requires_grad_() for _ in range(2))
    scores = torch.rand(2, 4, 3, 3, generator=gen)

    def f(q, k, v, scores):
        indices, counts = attnkit.block_topk_indices(scores, 1, causal=True, local_blocks=1)
        out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, causal=True, return_lse=True)
        return (out * out).sum() + lse.sum(), lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, lse = f(q, k, v, scores)
    closs, clse = compiled(q, k, v, scores)
    assert torch.allclose(lse, clse, rtol=1e-6, atol=1e-6) and torch.allclose(loss, closs)
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(closs, (q, k, v))):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def good_inputs():
    q, k, v = torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
    return q, k, v, torch.zeros(1, 2, 2, 1, dtype=torch.int32), torch.ones(1, 2, 2, dtype=torch.int32)


BAD = {
    "block_size_q": (lambda q, k, v, i, c: (q, k, v, i, c), {"block_size_q": 32}),
    "block_size_k": (lambda q, k, v, i, c: (q, k, v, i, c), {"block_size_k": 0}),
    "kv_block_indices": (lambda q, k, v, i, c: (q, k, v, i.long(), c), {}),
    "kv_block_counts": (lambda q, k, v, i, c: (q, k, v, i, c[:, :1]), {}),
    r"kv_block_indices.*shape": (lambda q, k, v, i, c: (q, k, v, i[:, :, :1], c[:, :, :1]), {}),
    r"\bq\b": (lambda q, k, v, i, c: (q.double(), k, v, i, c), {}),
    r"\bk\b": (lambda q, k, v, i, c: (q, k[..., :8], v, i, c), {}),
    r"heads": (lambda q, k, v, i, c: (q, torch.randn(1, 100, 3, 16), torch.randn(1, 100, 3, 16), i, c), {}),
    "softcap": (lambda q, k, v, i, c: (q, k, v, i, c), {"softcap": -1.0}),
    "scale": (lambda q, k, v, i, c: (q, k, v, i, c), {"scale": float("nan")}),
}


@pytest.mark.parametrize("message", BAD)
def test_bad_input(message):
    make, opts = BAD[message]
    with pytest.raises(ValueError, match=message):
        attnkit.block_sparse_attention(*make(*good_inputs()), **opts)


@pytest.mark.parametrize("name, value", [
    ("column_indices and column_counts", {"column_indices": torch.zeros(1, 2, 2, 1, dtype=torch.int32)}),
    ("column_indices", {"column_indices": torch.zeros(1, 2, 2, 1, dtype=torch.int64),
                        "column_counts": torch.ones(1, 2, 2, dtype=torch.int32)}),
    (r"column_indices.*shape", {"column_indices": torch.zeros(1, 2, 3, 1, dtype=torch.int32),
                                "column_counts": torch.ones(1, 2, 3, dtype=torch.int32)}),
    ("column_counts", {"column_indices": torch.zeros(1, 2, 2, 1, dtype=torch.int32),
                       "column_counts": torch.ones(1, 2, 2, 1, dtype=torch.int32)}),
])
def test_bad_columns(name, value):
    with pytest.raises(ValueError, match=name):
        attnkit.block_sparse_attention(*good_inputs(), **value)


# ---- individual key columns (MInference's vertical lines) -----------------------------------------

def random_columns(gen, batch, heads, q_blocks, seqlen_k, list_len):
    """Random column lists: repeats, any order, -1 and too-large keys, counts beyond the list
    or negative."""
    indices = torch.randint(-1, seqlen_k + 2, (batch, heads, q_blocks, list_len), generator=gen).int()
    counts = torch.randint(-1, list_len + 2, (batch, heads, q_blocks), generator=gen).int()
    return indices, counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_columns_random(case, device, gen):
    """Blocks and columns together (columns inside listed blocks among them: counted once)."""
    b, sq, sk, h, hkv, d, bq, bk, causal = case
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    qb, kb = -(-sq // bq), -(-sk // bk)
    indices, counts = random_lists(gen, b, h, qb, kb, 2)
    columns, column_counts = random_columns(gen, b, h, qb, sk, 40)
    q, k, v = (randn(gen, b, s, n, d, dtype=dtype, device=device) for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
    check(q, k, v, indices.to(device), counts.to(device), gen, block_size_q=bq, block_size_k=bk, causal=causal,
          column_indices=columns.to(device), column_counts=column_counts.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_columns_only(causal, device, gen):
    """No blocks at all: every visited tile is a column tile; GQA; rows whose columns are all
    above the diagonal see nothing (out 0, lse -inf)."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = randn(gen, 2, 190, 4, 32, dtype=dtype, device=device)
    k, v = (randn(gen, 2, 330, 2, 32, dtype=dtype, device=device) for _ in range(2))
    indices = torch.full((2, 4, 3, 1), -1, dtype=torch.int32)
    counts = torch.zeros(2, 4, 3, dtype=torch.int32)
    columns, column_counts = random_columns(gen, 2, 4, 3, 330, 25)
    check(q, k, v, indices.to(device), counts.to(device), gen, causal=causal, column_indices=columns.to(device),
          column_counts=column_counts.to(device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_columns_half(dtype, gen):
    q, k, v = (randn(gen, 1, 260, 2, 64, dtype=dtype) for _ in range(3))
    indices, counts = random_lists(gen, 1, 2, 5, 5, 3)
    columns, column_counts = random_columns(gen, 1, 2, 5, 260, 30)
    check(q, k, v, indices, counts, gen, causal=True, column_indices=columns, column_counts=column_counts)


def test_every_column_equals_dense_attention(gen):
    """Every key as a column and no block: the same numbers as dense attention."""
    q, k, v = (randn(gen, 1, 150, 2, 16) for _ in range(3))
    indices, counts = torch.full((1, 2, 3, 1), -1, dtype=torch.int32), torch.zeros(1, 2, 3, dtype=torch.int32)
    columns = torch.randperm(150, generator=gen).int().expand(1, 2, 3, 150)
    out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, causal=True, return_lse=True,
                                              column_indices=columns, column_counts=torch.full((1, 2, 3), 150).int())
    ref, ref_lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6) and torch.allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_columns_ignore_values_they_do_not_list(gen):
    """NaN in the keys and values of every key a query block neither lists nor holds as a
    column (in the tiles its columns visit, too): out, lse and gradients stay finite."""
    sq, sk = 128, 256
    q = randn(gen, 1, sq, 1, 16).requires_grad_()
    k, v = randn(gen, 1, sk, 1, 16), randn(gen, 1, sk, 1, 16)
    indices, counts = torch.tensor([[[[0], [-1]]]], dtype=torch.int32), torch.tensor([[[1, 0]]], dtype=torch.int32)
    columns = torch.tensor([[[[70, 200, 203], [5, 130, 131]]]], dtype=torch.int32)
    column_counts = torch.tensor([[[3, 3]]], dtype=torch.int32)
    seen = torch.zeros(sk, dtype=torch.bool)
    seen[:64] = True
    seen[[70, 200, 203, 5, 130, 131]] = True
    k[:, ~seen], v[:, ~seen] = float("nan"), float("nan")
    k.requires_grad_(), v.requires_grad_()
    out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, column_indices=columns,
                                              column_counts=column_counts, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    dq, dk, dv = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, seen]).all() and torch.isfinite(dv[:, seen]).all()
    assert (dk[:, ~seen] == 0).all() and (dv[:, ~seen] == 0).all()
    ref, ref_lse = reference.block_sparse_attention(q.detach().double(), torch.nan_to_num(k.detach()).double(),
                                                    torch.nan_to_num(v.detach()).double(), indices, counts,
                                                    column_indices=columns, column_counts=column_counts)
    assert_close(out, ref, FWD_TOL[torch.float32], "out")


def test_canonical_column_lists(gen):
    """Against a loop: the distinct keys of each list's first `count` entries in [0, seqlen_k)
    outside the row's listed blocks, ascending, -1 padded."""
    seqlen_k, block_size = 300, 64
    blocks, block_counts = random_lists(gen, 2, 3, 4, 5, 3)
    blocks, block_counts = attnkit.canonical_block_lists(blocks, block_counts, 5)
    columns, counts = random_columns(gen, 2, 3, 4, seqlen_k, 20)
    got, got_counts = attnkit.canonical_column_lists(columns, counts, blocks, block_counts, seqlen_k, block_size)
    for b in range(2):
        for h in range(3):
            for m in range(4):
                listed = set(blocks[b, h, m, :block_counts[b, h, m]].tolist())
                n = max(0, min(20, int(counts[b, h, m])))
                want = sorted({j for j in columns[b, h, m, :n].tolist()
                               if 0 <= j < seqlen_k and j // block_size not in listed})
                assert got_counts[b, h, m] == len(want)
                assert got[b, h, m].tolist() == want + [-1] * (20 - len(want))


def test_vertical_slash_exact_columns(gen):
    """exact_columns=True: the slash blocks of the default call and the vertical keys as
    columns, each block's list those at or before its end; the op on them equals the
    reference."""
    q, k, v = (randn(gen, 1, 300, 2, 16) for _ in range(3))
    blocks, counts, columns, column_counts = attnkit.vertical_slash_indices(q, k, last_q=64, vertical=20, slash=30,
                                                                            exact_columns=True)
    assert columns.shape == (1, 2, 5, 20)
    ends = torch.arange(1, 6) * 64
    want = (columns < ends[:, None]).sum(-1)
    assert torch.equal(column_counts, want.int())
    plain_blocks, plain_counts = attnkit.vertical_slash_indices(q, k, last_q=64, vertical=20, slash=30)
    column_blocks = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    column_blocks.scatter_(-1, (columns // 64).long(), True)
    union = reference.block_sparse_mask(blocks, counts, 5, 5, block_size_q=1, block_size_k=1)
    union |= column_blocks & torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(union, reference.block_sparse_mask(plain_blocks, plain_counts, 5, 5, block_size_q=1,
                                                          block_size_k=1))
    check(q, k, v, blocks, counts, gen, causal=True, column_indices=columns, column_counts=column_counts)


def test_columns_opcheck_and_compile(gen):
    q = randn(gen, 1, 130, 4, 16).requires_grad_()
    k, v = (randn(gen, 1, 200, 2, 16).requires_grad_() for _ in range(2))
    indices, counts = random_lists(gen, 1, 4, 3, 4, 0, canonical=True)
    columns, column_counts = attnkit.canonical_column_lists(*random_columns(gen, 1, 4, 3, 200, 12), indices, counts,
                                                            200, 64)
    args = (q, k, v, indices, counts, 64, 64, True, 0.25, 0.0, columns, column_counts)
    torch.library.opcheck(torch.ops.attnkit.block_sparse_fwd.default, args)
    out, lse = torch.ops.attnkit.block_sparse_fwd(*args)
    t_indices, t_counts = torch.ops.attnkit.block_lists_transpose(indices, counts, 4)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), indices, counts,
           t_indices, t_counts, 64, 64, True, 0.25, 0.0, torch.randn_like(lse), columns, column_counts)
    torch.library.opcheck(torch.ops.attnkit.block_sparse_bwd.default, bwd)

    def f(q, k, v):
        blocks, block_counts, cols, col_counts = attnkit.vertical_slash_indices(q, k, last_q=64, vertical=10,
                                                                                slash=20, exact_columns=True)
        out = attnkit.block_sparse_attention(q, k, v, blocks, block_counts, causal=True, column_indices=cols,
                                             column_counts=col_counts)
        return (out * out).sum()

    q2, k2, v2 = (randn(gen, 1, 200, 2, 16).requires_grad_() for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, closs = f(q2, k2, v2), compiled(q2, k2, v2)
    assert torch.allclose(loss, closs, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (q2, k2, v2)), torch.autograd.grad(closs, (q2, k2, v2))):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- packed sequences (varlen) ------------------------------------------------------------------

def check_varlen(lens_q, lens_k, heads, kv_heads, head_dim, dtype, device, gen, *, lists_batch=None, columns=True,
                 **opts):
    """block_sparse_attention_varlen (out, lse, gradients) against the reference per sequence."""
    bq, bk = opts.get("block_size_q", 64), opts.get("block_size_k", 64)
    cu_q = torch.tensor([0] + lens_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lens_k).cumsum(0).int()
    batch, max_q, max_k = len(lens_q), max(lens_q), max(lens_k)
    qb, kb = -(-max_q // bq), -(-max_k // bk)
    q = randn(gen, int(cu_q[-1]), heads, head_dim, dtype=dtype, device=device).requires_grad_()
    k, v = (randn(gen, int(cu_k[-1]), kv_heads, head_dim, dtype=dtype, device=device).requires_grad_()
            for _ in range(2))
    lb = lists_batch or batch
    indices, counts = random_lists(gen, lb, heads, qb, kb, 3)
    extra = {}
    if columns:
        extra = dict(zip(("column_indices", "column_counts"), random_columns(gen, lb, heads, qb, max_k, 30)))
    dev = lambda d: {name: t.to(device) for name, t in d.items()}  # noqa: E731
    out, lse = attnkit.block_sparse_attention_varlen(q, k, v, cu_q.to(device), cu_k.to(device), max_q, max_k,
                                                     indices.to(device), counts.to(device), return_lse=True,
                                                     **opts, **dev(extra))
    assert out.shape == q.shape and lse.shape == (heads, q.shape[0])
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.block_sparse_attention_varlen(qr, kr, vr, cu_q, cu_k, indices, counts, **opts, **extra)
    assert_close(out, ref, FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    dout = randn(gen, *out.shape, dtype=dtype, device=device)
    dlse = randn(gen, *lse.shape, device=device)
    seen = torch.isfinite(ref_lse)
    loss = (out.float() * dout.float()).sum() + (torch.where(seen.to(device), lse, 0) * dlse).sum()
    ref_loss = (ref * dout.cpu().double()).sum() + (torch.where(seen, ref_lse, 0) * dlse.cpu().double()).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(ref_loss, (qr, kr, vr))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("columns", [False, True])
def test_varlen(causal, columns, device, gen):
    """Three packed sequences of odd lengths (one shorter on the query side, one on the key
    side), GQA, lists per sequence; block sizes 64 x 128."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    check_varlen([130, 61, 200], [190, 250, 70], 4, 2, 32, dtype, device, gen, causal=causal, columns=columns,
                 block_size_q=64, block_size_k=128)


def test_varlen_batch_one_lists_and_half(gen):
    check_varlen([100, 170], [100, 170], 2, 1, 64, torch.bfloat16, "cpu", gen, lists_batch=1, causal=True)


def test_varlen_equals_batched(gen):
    """Sequences of one length packed: the same numbers as block_sparse_attention."""
    q, k, v = (randn(gen, 2, 150, 2, 16) for _ in range(3))
    indices, counts = random_lists(gen, 2, 2, 3, 3, 2)
    columns, column_counts = random_columns(gen, 2, 2, 3, 150, 10)
    opts = dict(causal=True, column_indices=columns, column_counts=column_counts, return_lse=True)
    out, lse = attnkit.block_sparse_attention(q, k, v, indices, counts, **opts)
    cu = torch.tensor([0, 150, 300], dtype=torch.int32)
    out_v, lse_v = attnkit.block_sparse_attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu,
                                                         150, 150, indices, counts, **opts)
    assert torch.equal(out_v, out.flatten(0, 1))
    assert torch.equal(lse_v, lse.transpose(0, 1).flatten(1))


def test_varlen_opcheck(gen):
    cu = torch.tensor([0, 70, 200], dtype=torch.int32)
    q = randn(gen, 200, 2, 16).requires_grad_()
    k, v = (randn(gen, 200, 1, 16).requires_grad_() for _ in range(2))
    indices, counts = random_lists(gen, 2, 2, 3, 3, 0, canonical=True)
    args = (q, k, v, indices, counts, 64, 64, True, 0.25, 0.0, None, None, cu, cu, 130, 130)
    torch.library.opcheck(torch.ops.attnkit.block_sparse_fwd.default, args)


def test_varlen_bad_input(gen):
    q = torch.randn(100, 2, 16)
    lists = (torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32))
    cu = torch.tensor([0, 100], dtype=torch.int32)
    with pytest.raises(ValueError, match="3 dimensions"):
        attnkit.block_sparse_attention_varlen(q[None], q[None], q[None], cu, cu, 100, 100, *lists)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attnkit.block_sparse_attention_varlen(q, q, q, cu, cu[:1], 100, 100, *lists)
    with pytest.raises(ValueError, match="kv_block_indices"):
        attnkit.block_sparse_attention_varlen(q, q, q, cu, cu, 200, 100, *lists)  # 4 query blocks, lists hold 1


def test_raw_op_reads_in_bounds_for_any_columns(gen):
    """The op itself (no canonical form applied) with columns far outside the sequence,
    negative and unsorted: wrong numbers are allowed, a read outside K / V is not."""
    q, k, v = (randn(gen, 1, 130, 2, 16) for _ in range(3))
    indices, counts = random_lists(gen, 1, 2, 3, 3, 0, canonical=True)
    columns = torch.tensor([2**30, -7, 5, 2**31 - 1, 3, 129] * 2, dtype=torch.int32).expand(1, 2, 3, 12).contiguous()
    out, lse = torch.ops.attnkit.block_sparse_fwd(q, k, v, indices, counts, 64, 64, True, 0.25, 0.0, columns,
                                                  torch.full((1, 2, 3), 12, dtype=torch.int32))
    assert out.shape == q.shape and lse.shape == (1, 2, 130)
