"""Non-finite inputs (docs/semantics.md, "NaN and inf"): a NaN in q, or in a key or value a
row sees, makes that row NaN (lse too, for q and keys), as torch SDPA and the float64
reference do; a key or value the row does not see never reaches it. Every op: attention,
attention_varlen (and their backward), decode (contiguous and paged), sparse_decode,
sparse_decode_tokens, neighborhood_attention, decode on quantized pages.

On the CPU a masked key never reaches a row, not even inside a key tile the row partly
sees. The CUDA kernels multiply whole tiles of probabilities by values on tensor cores, so
there a masked key's NaN *value* in a tile the row partly sees reaches it as 0 * NaN (as in
FlashAttention); their tests here poison only visible keys and keys no tile of the row
reads (other sequences, past cache_seqlens, unselected pages)."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, GRAD_TOL, assert_close, cu_seqlens, devices_for, paged, randn

NAN = float("nan")
CUDA = [d for d in devices_for("attention") if d != "cpu"]


def half_on_cuda(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def assert_nan_like(got, want, tol, what="output", expect_nan=True):
    """NaN exactly where the float64 reference has NaN (and somewhere, when expect_nan);
    every other element finite and close to it."""
    got_c, want_c = got.detach().double().cpu(), want.detach().double().cpu()
    assert got_c.shape == want_c.shape
    want_nan = want_c.isnan()
    if expect_nan:
        assert want_nan.any(), f"{what}: the test poisons nothing visible"
    else:
        assert not want_nan.any(), f"{what}: the test poisons something visible"
    got_nan = got_c.isnan()
    assert torch.equal(got_nan, want_nan), (
        f"{what}: NaN at {int(got_nan.sum())} elements ({got_nan.nonzero().tolist()[:4]}...), "
        f"reference at {int(want_nan.sum())} ({want_nan.nonzero().tolist()[:4]}...)")
    if (~want_nan).any():
        assert_close(got_c[~want_nan], want_c[~want_nan], tol, what)


def poison(t, gen, count=3):
    """t with NaN at `count` random elements."""
    t = t.clone()
    flat = t.view(-1)
    flat[torch.randint(0, flat.numel(), (count,), generator=gen)] = NAN
    return t


# ---- prefill ----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (30, 7)), (True, (90, 0))],
                         ids=["full", "causal", "window", "causal-window"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cpu(gen, causal, window, which, dtype):
    q, k, v = randn(gen, 2, 77, 4, 64), randn(gen, 2, 150, 2, 64), randn(gen, 2, 150, 2, 64)
    tensors = {"q": q, "k": k, "v": v}
    tensors[which] = poison(tensors[which], gen)
    q, k, v = (tensors[n].to(dtype) for n in "qkv")
    out, lse = attnkit.attention(q, k, v, causal=causal, window=window, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=causal, window=window)
    # A poisoned value can sit where no row looks (outside every window): then nothing is NaN.
    expect = bool(ref.isnan().any())
    assert_nan_like(out, ref, FWD_TOL[dtype], expect_nan=expect)
    assert_nan_like(lse, ref_lse, FWD_TOL[dtype], "lse", expect_nan=expect and which != "v")


@pytest.mark.parametrize("device", CUDA or [pytest.param("cuda", marks=pytest.mark.skip(reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("which", ["k", "v"])
def test_attention_cuda_visible(gen, device, which):
    """No mask: every key is visible to every row, so one poisoned key makes rows NaN."""
    q, k, v = randn(gen, 2, 77, 4, 64), randn(gen, 2, 150, 2, 64), randn(gen, 2, 150, 2, 64)
    tensors = {"q": q, "k": k, "v": v}
    tensors[which] = poison(tensors[which], gen)
    q, k, v = (tensors[n].to(torch.bfloat16) for n in "qkv")
    out, lse = attnkit.attention(q.to(device), k.to(device), v.to(device), return_lse=True)
    ref, ref_lse = reference.attention(q, k, v)
    assert_nan_like(out, ref, FWD_TOL[torch.bfloat16])
    assert_nan_like(lse, ref_lse, FWD_TOL[torch.bfloat16], "lse", expect_nan=which == "k")


@pytest.mark.parametrize("device", devices_for("attention"))
def test_varlen_other_sequence(gen, device):
    """NaN in sequence 1's keys and values: sequences 0 and 2 stay exact, 1 is NaN."""
    dtype = half_on_cuda(device)
    lens = [70, 65, 33]
    cu = cu_seqlens(lens)
    q, k, v = randn(gen, sum(lens), 4, 64), randn(gen, sum(lens), 2, 64), randn(gen, sum(lens), 2, 64)
    k[70:135], v[70:135] = NAN, NAN
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    args = (cu.to(device), cu.to(device), max(lens), max(lens))
    out, lse = attnkit.attention_varlen(q.to(device), k.to(device), v.to(device), *args, causal=True, return_lse=True)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu, cu, causal=True)
    assert ref[70:135].isnan().all() and not ref[:70].isnan().any()
    assert_nan_like(out, ref, FWD_TOL[dtype])
    assert_nan_like(lse, ref_lse, FWD_TOL[dtype], "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backward_masked_keys_cpu(gen, dtype):
    """Keys 0..59 are outside every row's window (seqlen_k - seqlen_q = 160, window 100) and
    hold NaN; keys 60..63 share their 64-key tile with them. Forward and gradients equal
    those of clean inputs; the masked keys' gradients are 0."""
    q, k, v = randn(gen, 1, 40, 4, 64), randn(gen, 1, 200, 2, 64), randn(gen, 1, 200, 2, 64)
    dout = randn(gen, 1, 40, 4, 64)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :60], v_bad[:, :60] = NAN, NAN
    leaves = [t.to(dtype).requires_grad_() for t in (q, k_bad, v_bad)]
    out = attnkit.attention(*leaves, causal=True, window=(100, -1))
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*ref_leaves, causal=True, window=(100, -1))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, FWD_TOL[dtype])
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, GRAD_TOL[dtype], f"d{name}")
    assert (grads[1][:, :60] == 0).all() and (grads[2][:, :60] == 0).all()


# ---- decode -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices_for("decode"))
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_past_length_and_unused_pages(gen, device, page_size):
    """Cache slots past cache_seqlens and pages the table does not use hold NaN: no effect."""
    dtype, lens = half_on_cuda(device), [37, 130, 5]
    if page_size is None:
        k, v = randn(gen, 3, 160, 2, 64), randn(gen, 3, 160, 2, 64)
        for b, n in enumerate(lens):
            k[b, n:], v[b, n:] = NAN, NAN
        table = None
    else:
        k, v, table, _ = paged(gen, lens, page_size, 2, 64, torch.float32, "cpu")
        used = {int(p) for b, n in enumerate(lens) for p in table[b, :(n + page_size - 1) // page_size]}
        for page in range(k.shape[0]):
            if page not in used:
                k[page], v[page] = NAN, NAN
        for b, n in enumerate(lens):  # the free slots of each last page
            last = int(table[b, (n - 1) // page_size])
            k[last, (n - 1) % page_size + 1:], v[last, (n - 1) % page_size + 1:] = NAN, NAN
    k, v = k.to(dtype), v.to(dtype)
    q = randn(gen, 3, 2, 8, 64, dtype=dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    to = (lambda t: None if t is None else t.to(device))
    out, lse = attnkit.decode(q.to(device), k.to(device), v.to(device), lens_t.to(device), block_table=to(table),
                              return_lse=True)
    ref, ref_lse = reference.decode(q, k, v, lens_t, block_table=table)
    assert_nan_like(out, ref, FWD_TOL[dtype], expect_nan=False)
    assert_nan_like(lse, ref_lse, FWD_TOL[dtype], "lse", expect_nan=False)


@pytest.mark.parametrize("device", devices_for("decode"))
@pytest.mark.parametrize("which", ["k", "v"])
def test_decode_visible_nan(gen, device, which):
    """A NaN at position 20 of sequence 1, which all of its queries see: its rows are NaN."""
    dtype, lens = half_on_cuda(device), [37, 130]
    k, v, table, lens_t = paged(gen, lens, 16, 2, 64, torch.float32, "cpu")
    cache = {"k": k, "v": v}[which]
    cache[int(table[1, 1]), 4, 1, 7] = NAN  # token 20, kv head 1, channel 7
    k, v = k.to(dtype), v.to(dtype)
    q = randn(gen, 2, 3, 8, 64, dtype=dtype)
    out, lse = attnkit.decode(q.to(device), k.to(device), v.to(device), lens_t.to(device),
                              block_table=table.to(device), return_lse=True)
    ref, ref_lse = reference.decode(q, k, v, lens_t, block_table=table)
    assert ref[1, :, 4:].isnan().any() and not ref[0].isnan().any()
    assert_nan_like(out, ref, FWD_TOL[dtype])
    assert_nan_like(lse, ref_lse, FWD_TOL[dtype], "lse", expect_nan=which == "k")


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("window", [-1, 50])
def test_decode_masked_in_tile_cpu(gen, which, window):
    """Three queries; the newest token (seen only by the last query) and, with a window, the
    token just outside it hold NaN in the same 64-key tile as visible keys: only the last
    query's rows are NaN."""
    k, v = randn(gen, 2, 100, 2, 64), randn(gen, 2, 100, 2, 64)
    lens = torch.tensor([100, 90], dtype=torch.int32)
    cache = {"k": k, "v": v}[which]
    cache[0, 99] = NAN                  # sequence 0's last token: only its last query sees it
    if window > 0:
        cache[1, 90 - 3 - window - 1] = NAN  # just left of the window of sequence 1's first query
    q = randn(gen, 2, 3, 4, 64)
    out, lse = attnkit.decode(q, k, v, lens, window=window, return_lse=True)
    ref, ref_lse = reference.decode(q, k, v, lens, window=window)
    assert ref[0, 2].isnan().all() and not ref[0, :2].isnan().any() and not ref[1].isnan().any()
    assert_nan_like(out, ref, 1e-5)
    assert_nan_like(lse, ref_lse, 1e-5, "lse", expect_nan=which == "k")


@pytest.mark.parametrize("device", devices_for("sparse_decode"))
@pytest.mark.parametrize("tokens", [False, True], ids=["pages", "tokens"])
def test_sparse_decode_unselected(gen, device, tokens):
    """Every page but the selected ones holds NaN in sequence 0: finite; then one NaN in a
    selected page of kv head 1: that head's rows are NaN."""
    dtype, lens, page_size = half_on_cuda(device), [130, 70], 16
    k, v, table, lens_t = paged(gen, lens, page_size, 2, 64, torch.float32, "cpu")
    selected = torch.tensor([[[0, 3, 8, -1], [1, 3, 5, 8]], [[0, 2, 4, -1], [4, 3, -1, -1]]], dtype=torch.int32)
    for logical in range(9):
        if logical not in (0, 1, 3, 5, 8):
            k[int(table[0, logical])], v[int(table[0, logical])] = NAN, NAN
    if tokens:  # the same selection as tokens: every token of each selected page
        per_page = torch.arange(page_size, dtype=torch.int32)
        indices = torch.where(selected[..., None] >= 0, selected[..., None] * page_size + per_page, -1).flatten(2)
    q = randn(gen, 2, 1, 8, 64, dtype=dtype)

    def run(k, v):
        k, v = k.to(dtype), v.to(dtype)
        args = (q.to(device), k.to(device), v.to(device), lens_t.to(device), table.to(device))
        if tokens:
            out = attnkit.sparse_decode_tokens(*args, indices.to(device))
            ref, _ = reference.sparse_decode(q, k, v, lens_t, table, indices, tokens_per_index=1)
        else:
            out = attnkit.sparse_decode(*args, selected.to(device))
            ref, _ = reference.sparse_decode(q, k, v, lens_t, table, selected, tokens_per_index=page_size)
        return out, ref

    out, ref = run(k, v)
    assert_nan_like(out, ref, FWD_TOL[dtype], expect_nan=False)
    k[int(table[0, 5]), 2, 1, 0] = NAN  # logical page 5: selected for kv head 1 only
    out, ref = run(k, v)
    assert ref[0, :, 4:].isnan().all() and not ref[0, :, :4].isnan().any()
    assert_nan_like(out, ref, FWD_TOL[dtype])


@pytest.mark.parametrize("device", devices_for("decode"))
@pytest.mark.parametrize("kv_format", ["int8", "int4", "fp8_e4m3"])
def test_decode_quantized(gen, device, kv_format):
    """A NaN key or value quantizes to a group of NaN scale: the rows that see it are NaN;
    one past cache_seqlens or outside the window is never read."""
    k, v = randn(gen, 2, 200, 2, 64), randn(gen, 2, 200, 2, 64)
    lens = torch.tensor([200, 150], dtype=torch.int32)
    k[0, 180, 0, 3] = NAN          # visible to sequence 0's query
    v[1, 170:, 1] = NAN            # past sequence 1's length
    k[1, 20, 0], v[1, 21, 1] = NAN, NAN  # outside its window of 100
    qk, qv = attnkit.quantize_kv(k, kv_format), attnkit.quantize_kv(v, kv_format)
    q = randn(gen, 2, 1, 4, 64)
    if device == "cuda":
        q, qk, qv, lens_d = q.bfloat16().cuda(), qk.to("cuda"), qv.to("cuda"), lens.cuda()
    else:
        lens_d = lens
    out, lse = attnkit.decode(q, qk, qv, lens_d, window=100, return_lse=True)
    ref, ref_lse = reference.decode(q.cpu(), attnkit.dequantize_kv(qk).cpu(), attnkit.dequantize_kv(qv).cpu(), lens,
                                    window=100)
    assert ref[0, :, :2].isnan().all() and not ref[1].isnan().any()
    tol = 1e-5 if device == "cpu" else FWD_TOL[torch.bfloat16]
    assert_nan_like(out, ref, tol)
    assert_nan_like(lse, ref_lse, tol, "lse")


# ---- neighborhood -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices_for("neighborhood_attention"))
@pytest.mark.parametrize("which", ["k", "v"])
def test_neighborhood(gen, device, which):
    """One NaN token of a 2-D grid: the queries whose neighbourhood holds it are NaN; on the
    CPU every other query is exact (on CUDA tiles are flat token ranges: see the module doc)."""
    dtype = half_on_cuda(device)
    q, k, v = randn(gen, 1, 12, 16, 2, 32), randn(gen, 1, 12, 16, 2, 32), randn(gen, 1, 12, 16, 2, 32)
    ({"k": k, "v": v}[which])[0, 5, 9, 1] = NAN
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = attnkit.neighborhood_attention(q.to(device), k.to(device), v.to(device), (5, 3), dilation=(1, 2),
                                              return_lse=True)
    ref, ref_lse = reference.neighborhood_attention(q, k, v, (5, 3), dilation=(1, 2))
    if device == "cpu":
        assert_nan_like(out, ref, FWD_TOL[dtype])
        assert_nan_like(lse, ref_lse, FWD_TOL[dtype], "lse", expect_nan=which == "k")
    else:
        assert out.cpu().isnan()[ref.isnan()].all()
