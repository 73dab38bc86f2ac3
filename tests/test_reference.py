"""The float64 oracle itself (attnkit.reference), checked against torch's SDPA, explicit
loops and torch.autograd.gradcheck, so that every kernel test stands on a verified base.
Needs no compiled kernel beyond importing attnkit."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnkit import reference
from conftest import randn, rel_err

F64 = torch.float64


def mask_by_loops(sq, sk, causal, window):
    left, right = window
    if causal:
        right = 0
    m = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        d = i + sk - sq
        for j in range(sk):
            m[i, j] = (left == -1 or j >= d - left) and (right == -1 or j <= d + right)
    return m


@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 5), (3, 9), (9, 3), (1, 7), (7, 1), (0, 4), (4, 0)])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, -1)), (False, (-1, 1)),
                                           (False, (1, 2)), (True, (3, -1)), (True, (0, 5)), (False, (0, 0))])
def test_mask_rules(sq, sk, causal, window):
    assert torch.equal(reference.mask(sq, sk, causal, window), mask_by_loops(sq, sk, causal, window))


def test_mask_causal_is_window_right_zero():
    for sq, sk in [(4, 9), (9, 4), (6, 6)]:
        assert torch.equal(reference.mask(sq, sk, True, (-1, -1)), reference.mask(sq, sk, False, (-1, 0)))
        assert torch.equal(reference.mask(sq, sk, True, (2, 7)), reference.mask(sq, sk, False, (2, 0)))
    # Bottom-right: the last query always sees the last key (when it sees anything on the diagonal).
    assert reference.mask(3, 8, True)[-1, -1] and not reference.mask(3, 8, True)[0, -1]
    assert reference.mask(3, 8, True)[0].sum() == 6
    with pytest.raises(ValueError, match="window"):
        reference.mask(3, 3, False, (-2, 0))


def sdpa(q, k, v, visible, scale=None):
    """torch SDPA (math backend, float64) in our (batch, seqlen, heads, head_dim) layout."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("b,sq,sk,h,hkv,d", [(2, 17, 17, 4, 4, 16), (1, 9, 33, 4, 2, 40), (3, 1, 100, 4, 1, 64),
                                             (1, 70, 70, 2, 2, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(b, sq, sk, h, hkv, d, causal, gen):
    q, k, v = randn(gen, b, sq, h, d, dtype=F64), randn(gen, b, sk, hkv, d, dtype=F64), randn(gen, b, sk, hkv, d, dtype=F64)
    out, lse = reference.attention(q, k, v, causal=causal)
    if causal and sq == sk:  # SDPA's is_causal is top-left aligned, the same as ours when sq == sk
        rep = h // hkv
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                              v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True)
        assert rel_err(out, want.transpose(1, 2)) < 1e-12
    want = sdpa(q, k, v, reference.mask(sq, sk, causal))
    assert out.dtype == F64 and out.shape == q.shape and lse.shape == (b, h, sq) and lse.dtype == F64
    assert rel_err(out, want) < 1e-12
    # lse = logsumexp of the visible scaled logits.
    logits = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(h // hkv, 2)) / math.sqrt(d)
    logits = logits.masked_fill(~reference.mask(sq, sk, causal), float("-inf"))
    assert rel_err(lse, logits.logsumexp(-1)) < 1e-12


def test_attention_scale_window_softcap_by_loops(gen):
    b, sq, sk, h, hkv, d = 2, 6, 11, 4, 2, 8
    q, k, v = randn(gen, b, sq, h, d, dtype=F64), randn(gen, b, sk, hkv, d, dtype=F64), randn(gen, b, sk, hkv, d, dtype=F64)
    scale, softcap, window = 0.7, 1.5, (2, 1)
    out, lse = reference.attention(q, k, v, scale=scale, softcap=softcap, window=window)
    visible = mask_by_loops(sq, sk, False, window)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                js = [j for j in range(sk) if visible[i, j]]
                s = torch.tensor([softcap * math.tanh(scale * float(q[bi, i, hi] @ k[bi, j, hi // 2]) / softcap)
                                  for j in js], dtype=F64)
                p = torch.softmax(s, 0)
                want = sum(p[n] * v[bi, j, hi // 2] for n, j in enumerate(js))
                assert torch.allclose(out[bi, i, hi], want, rtol=1e-12, atol=1e-12)
                assert math.isclose(lse[bi, hi, i], torch.logsumexp(s, 0), rel_tol=1e-12, abs_tol=1e-12)


def test_fully_masked_rows_forward_and_backward(gen):
    # seqlen_q > seqlen_k with causal: the first sq - sk queries see no key.
    q = randn(gen, 1, 7, 2, 8, dtype=F64).requires_grad_()
    k = randn(gen, 1, 3, 1, 8, dtype=F64).requires_grad_()
    v = randn(gen, 1, 3, 1, 8, dtype=F64).requires_grad_()
    out, lse = reference.attention(q, k, v, causal=True, softcap=3.0)
    assert (out[:, :4] == 0).all() and (lse[:, :, :4] == float("-inf")).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 4:]).all()
    (out * randn(gen, *out.shape, dtype=F64)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :4] == 0).all()
    # No key at all.
    out, lse = reference.attention(q, k[:, :0], v[:, :0])
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_gradcheck_with_masked_rows(gen):
    q = randn(gen, 1, 5, 2, 4, dtype=F64).requires_grad_()
    k = randn(gen, 1, 3, 1, 4, dtype=F64).requires_grad_()
    v = randn(gen, 1, 3, 1, 4, dtype=F64).requires_grad_()
    f = lambda q, k, v: reference.attention(q, k, v, causal=True, window=(1, -1), softcap=2.0)[0]
    assert torch.autograd.gradcheck(f, (q, k, v))
    g = lambda q, k, v: reference.attention(q, k, v, scale=0.3)[0]
    assert torch.autograd.gradcheck(g, (q, k, v))


def test_varlen_is_per_sequence(gen):
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 0, 1]
    cu_q = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6, 7], dtype=torch.int32)
    q, k, v = randn(gen, 9, 4, 8, dtype=F64), randn(gen, 7, 2, 8, dtype=F64), randn(gen, 7, 2, 8, dtype=F64)
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, softcap=4.0)
    assert out.shape == (9, 4, 8) and lse.shape == (4, 9)
    for b in range(4):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = reference.attention(q[None, qs], k[None, ks], v[None, ks], causal=True, softcap=4.0)
        assert torch.equal(out[qs], want[0]) and torch.equal(lse[:, qs], want_lse[0])
    assert (out[3:8] == 0).all() and (lse[:, 3:8] == float("-inf")).all()  # sequence 2 has no key


def test_decode_contiguous_and_paged_agree(gen):
    page_size, lens = 4, torch.tensor([1, 4, 9, 2], dtype=torch.int32)
    q = randn(gen, 4, 3, 4, 8, dtype=F64)
    k, v = randn(gen, 4, 12, 2, 8, dtype=F64), randn(gen, 4, 12, 2, 8, dtype=F64)
    table = torch.randperm(16, generator=gen)[:12].view(4, 3).int()
    k_pages, v_pages = torch.zeros(16, page_size, 2, 8, dtype=F64), torch.zeros(16, page_size, 2, 8, dtype=F64)
    for b in range(4):
        for t in range(12):
            k_pages[table[b, t // page_size], t % page_size] = k[b, t]
            v_pages[table[b, t // page_size], t % page_size] = v[b, t]
    for opts in ({}, {"window": 1, "softcap": 2.0, "scale": 0.5}):
        out, lse = reference.decode(q, k, v, lens, **opts)
        out_p, lse_p = reference.decode(q, k_pages, v_pages, lens, block_table=table, **opts)
        assert torch.equal(out, out_p) and torch.equal(lse, lse_p)
    # Query s of sequence b sits at position lens[b] - 3 + s, causal: = attention over the prefix.
    out, lse = reference.decode(q, k, v, lens)
    for b in range(4):
        n = int(lens[b])
        want, want_lse = reference.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
        assert torch.equal(out[b], want[0]) and torch.equal(lse[b], want_lse[0])
    assert (out[0, :2] == 0).all() and (out[3, :1] == 0).all()  # queries before the first key
    assert (lse[0, :, :2] == float("-inf")).all() and torch.isfinite(lse[0, :, 2]).all()


def test_merge_of_split_keys_equals_whole(gen):
    q, k, v = randn(gen, 2, 5, 4, 8, dtype=F64), randn(gen, 2, 13, 2, 8, dtype=F64), randn(gen, 2, 13, 2, 8, dtype=F64)
    whole, whole_lse = reference.attention(q, k, v, softcap=5.0)
    a, la = reference.attention(q, k[:, :6], v[:, :6], softcap=5.0)
    b, lb = reference.attention(q, k[:, 6:], v[:, 6:], softcap=5.0)
    out, lse = reference.merge_attention_states(a, la, b, lb)
    assert rel_err(out, whole) < 1e-12 and rel_err(lse, whole_lse) < 1e-12
    # An empty side (lse -inf) contributes nothing; both empty gives 0 and -inf.
    e, le = reference.attention(q, k[:, :0], v[:, :0])
    out, lse = reference.merge_attention_states(whole, whole_lse, e, le)
    assert torch.equal(out, whole) and torch.equal(lse, whole_lse)
    out, lse = reference.merge_attention_states(e, le, e, le)
    assert (out == 0).all() and (lse == float("-inf")).all()
    # Varlen layout: out (tokens, heads, head_dim) with lse (heads, tokens).
    out, lse = reference.merge_attention_states(a[0], la[0], b[0], lb[0])
    assert rel_err(out, whole[0]) < 1e-12 and rel_err(lse, whole_lse[0]) < 1e-12
