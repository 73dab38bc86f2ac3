"""attnkit.merge_attention_states against the float64 reference, both layouts, -inf LSE
rows, strided and unaligned inputs, CPU and CUDA; split-then-merge equals attention over
the whole key set; opcheck; bad input."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import FWD_TOL, assert_close, assert_lse_close, cu_seqlens, devices_for, randn

DEVICES = devices_for("merge_attention_states")
ATTENTION_DEVICES = devices_for("attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")
LAYOUTS = {"batched": lambda d: ((2, 9, 4, d), (2, 4, 9)), "varlen": lambda d: ((13, 4, d), (4, 13))}


def check(oa, la, ob, lb):
    out, lse = attnkit.merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = reference.merge_attention_states(oa.cpu(), la.cpu(), ob.cpu(), lb.cpu())
    assert out.dtype == oa.dtype and out.device == oa.device and out.shape == oa.shape
    assert lse.device == oa.device
    assert_close(out, ref, FWD_TOL[oa.dtype], "out")
    assert_lse_close(lse, ref_lse, 1e-6)
    both_empty = (ref_lse == NEG_INF).transpose(-1, -2)
    assert (out.cpu()[both_empty] == 0).all(), "rows where both sides saw no key must be exactly 0"
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.keys())
@pytest.mark.parametrize("head_dim", [3, 40, 64, 128])
def test_merge(head_dim, layout, dtype, device, gen):
    out_shape, lse_shape = LAYOUTS[layout](head_dim)
    oa, ob = randn(gen, *out_shape, dtype=dtype, device=device), randn(gen, *out_shape, dtype=dtype, device=device)
    la, lb = randn(gen, *lse_shape, device=device) * 3, randn(gen, *lse_shape, device=device) * 3
    la.view(-1)[::5] = NEG_INF   # side a saw no key
    lb.view(-1)[::7] = NEG_INF   # side b saw no key; both where the two strides meet
    lb.view(-1)[1] = la.view(-1)[1] + 80.0  # one side dominates by far
    check(oa, la, ob, lb)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_all_empty_and_large_lse(device, gen):
    oa, ob = randn(gen, 1, 4, 2, 16, device=device), randn(gen, 1, 4, 2, 16, device=device)
    inf = torch.full((1, 2, 4), NEG_INF, device=device)
    out, lse = check(oa, inf, ob, inf.clone())
    assert (out == 0).all() and (lse == NEG_INF).all()
    big = torch.full((1, 2, 4), 1e4, device=device)  # exp would overflow without the max shift
    out, lse = check(oa, big, ob, big + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_strided_and_unaligned(dtype, device, gen):
    base = randn(gen, 2, 6, 3, 2, 32, dtype=dtype, device=device)
    oa, ob = base[:, :, :, 0], base[:, :, :, 1]  # non-contiguous views
    la, lb = randn(gen, 2, 6, 3, device=device).transpose(1, 2), randn(gen, 2, 3, 6, device=device)
    check(oa, la, ob, lb)
    # Rows that start at an odd element offset (not 16-byte aligned).
    wide = randn(gen, 2, 6, 3, 33, dtype=dtype, device=device)
    check(wide[..., 1:], lb, oa, la)
    flat = randn(gen, 7 * 3 * 41, dtype=dtype, device=device)
    oa_v = flat[1:1 + 7 * 3 * 40].view(7, 3, 40)
    check(oa_v, randn(gen, 3, 7, device=device), randn(gen, 7, 3, 40, dtype=dtype, device=device),
          randn(gen, 3, 7, device=device))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_keys_then_merge_equals_whole(dtype, device, gen):
    """Attention over two halves of the keys (with LSE), merged, equals attention over all
    of them: dense (batch, seqlen, heads, head_dim) layout with GQA and softcap."""
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention kernels take fp16 / bf16 only")
    q = randn(gen, 2, 20, 4, 64, dtype=dtype, device=device)
    k, v = randn(gen, 2, 90, 2, 64, dtype=dtype, device=device), randn(gen, 2, 90, 2, 64, dtype=dtype, device=device)
    oa, la = attnkit.attention(q, k[:, :37], v[:, :37], softcap=8.0, return_lse=True)
    ob, lb = attnkit.attention(q, k[:, 37:], v[:, 37:], softcap=8.0, return_lse=True)
    out, lse = attnkit.merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), softcap=8.0)
    # Two roundings of the partial outputs to the input dtype: twice the budget.
    assert_close(out, ref, 2 * FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[torch.float32])


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
def test_split_keys_then_merge_equals_whole_varlen(device, gen):
    """Varlen (tokens, heads, head_dim) layout; the second half of sequence 1 and all of
    sequence 2 are empty, so their LSE is -inf and the merge must keep 0 / -inf."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens_q, lens_a, lens_b = [5, 9, 3], [11, 4, 0], [20, 0, 0]
    q = randn(gen, sum(lens_q), 4, 32, dtype=dtype, device=device)
    ka, va = randn(gen, sum(lens_a), 1, 32, dtype=dtype, device=device), randn(gen, sum(lens_a), 1, 32, dtype=dtype,
                                                                               device=device)
    kb, vb = randn(gen, sum(lens_b), 1, 32, dtype=dtype, device=device), randn(gen, sum(lens_b), 1, 32, dtype=dtype,
                                                                               device=device)
    cu_q, cu_a, cu_b = (cu_seqlens(x, device) for x in (lens_q, lens_a, lens_b))
    oa, la = attnkit.attention_varlen(q, ka, va, cu_q, cu_a, 9, 11, return_lse=True)
    ob, lb = attnkit.attention_varlen(q, kb, vb, cu_q, cu_b, 9, 20, return_lse=True)
    out, lse = attnkit.merge_attention_states(oa, la, ob, lb)
    # The whole key set of each sequence: its a-keys then its b-keys.
    k_parts, v_parts = [], []
    for b in range(3):
        sa, sb = slice(int(cu_a[b]), int(cu_a[b + 1])), slice(int(cu_b[b]), int(cu_b[b + 1]))
        k_parts += [ka[sa], kb[sb]]
        v_parts += [va[sa], vb[sb]]
    k, v = torch.cat(k_parts), torch.cat(v_parts)
    cu_k = cu_seqlens([a + b for a, b in zip(lens_a, lens_b)])
    ref, ref_lse = reference.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k)
    assert_close(out, ref, 2 * FWD_TOL[dtype], "out")
    assert_lse_close(lse, ref_lse, FWD_TOL[torch.float32])
    assert (out[14:] == 0).all() and (lse[:, 14:] == NEG_INF).all()


def test_opcheck(gen):
    batched = (randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5), randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5))
    torch.library.opcheck(torch.ops.attnkit.merge_attention_states.default, batched)
    varlen = (randn(gen, 7, 3, 16), randn(gen, 3, 7), randn(gen, 7, 3, 16), randn(gen, 3, 7))
    torch.library.opcheck(torch.ops.attnkit.merge_attention_states.default, varlen)


def test_torch_compile_fullgraph(gen):
    args = (randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5), randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5))
    compiled = torch.compile(attnkit.merge_attention_states, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), attnkit.merge_attention_states(*args)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def bad_args(gen):
    """{case: (argument the message must name, (out_a, lse_a, out_b, lse_b))}"""
    oa, la = randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5)
    ov, lv = randn(gen, 5, 3, 16), randn(gen, 3, 5)
    stride = oa.transpose(2, 3).contiguous().transpose(2, 3)
    return {
        "out_b-shape": ("out_b", (oa, la, oa[:1], la)),
        "out_b-head_dim": ("out_b", (oa, la, oa[..., :8], la)),
        "out_b-dtype": ("out_b", (oa, la, oa.half(), la)),
        "out_a-int": ("out_a", (oa.int(), la, oa.int(), la)),
        "out_a-rank": ("out_a", (oa[0, 0], la, oa[0, 0], la)),
        "out_a-head_dim-stride": ("out_a", (stride, la, oa, la)),
        "lse_a-dtype": ("lse_a", (oa, la.double(), oa, la)),
        "lse_a-shape": ("lse_a", (oa, la[:, :2], oa, la)),
        "lse_b-shape": ("lse_b", (oa, la, oa, la.transpose(1, 2))),
        "lse_b-varlen-shape": ("lse_b", (ov, lv, ov, lv.t())),
        "lse_b-dtype": ("lse_b", (ov, lv, ov, lv.half())),
    }


@pytest.mark.parametrize("case", list(bad_args(torch.Generator())))
def test_bad_input(case, gen):
    name, args = bad_args(gen)[case]
    with pytest.raises((ValueError, RuntimeError), match=name):
        attnkit.merge_attention_states(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not attnkit.cuda_available(), reason="needs a CUDA GPU and the CUDA kernels")
def test_device_mismatch(gen):
    oa, la = randn(gen, 2, 5, 3, 16, device="cuda"), randn(gen, 2, 3, 5, device="cuda")
    for name, args in (("out_b", (oa, la, oa.cpu(), la)), ("lse_a", (oa, la.cpu(), oa, la)),
                       ("lse_b", (oa, la, oa, la.cpu()))):
        with pytest.raises((ValueError, RuntimeError), match=name):
            attnkit.merge_attention_states(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_backward(device, layout, gen):
    """Gradients of a loss on out and lse, for all four inputs, equal the float64
    reference's; rows where one side (or both) saw no key included."""
    out_shape, lse_shape = LAYOUTS[layout](64)
    oa, ob = randn(gen, *out_shape), randn(gen, *out_shape)
    la, lb = randn(gen, *lse_shape), randn(gen, *lse_shape)
    la.view(-1)[:3] = NEG_INF
    lb.view(-1)[1:5] = NEG_INF
    w_out, w_lse = randn(gen, *out_shape), randn(gen, *lse_shape)
    leaves = [t.to(device).requires_grad_() for t in (oa, la, ob, lb)]
    out, lse = attnkit.merge_attention_states(*leaves)
    loss = (out * w_out.to(device)).sum() + (lse.masked_fill(lse == NEG_INF, 0) * w_lse.to(device)).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.double().requires_grad_() for t in (oa, la, ob, lb)]
    ref, ref_lse = reference.merge_attention_states(*ref_leaves)
    ref_loss = (ref * w_out.double()).sum() + (ref_lse.masked_fill(ref_lse == NEG_INF, 0) * w_lse.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, g, r in zip(("out_a", "lse_a", "out_b", "lse_b"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == (torch.float32 if "lse" in name else oa.dtype)
        assert_close(g, torch.nan_to_num(r), 1e-5, f"d {name}")

