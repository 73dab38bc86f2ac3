"""attnkit.compat.natten (NATTEN 0.21's API) against real NATTEN where it is installed (forward:
NATTEN's CPU backend, Flex, has no backward) and everywhere against a float64 restatement of
NATTEN's rule: outputs, lse layout, additional keys / values, gradients (through lse too),
attention (top-left causal, varlen), merge_attentions, the modules, bad input, the example."""
import inspect
import os
import random
import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest
import torch

import attnkit.reference
from attnkit.compat import natten as compat

ROOT = Path(__file__).resolve().parents[1]


# --- NATTEN's rule, restated from NATTEN 0.21's Flex mask, and float64 references ------------

def natten_axis_mask(length, kernel_size, dilation, stride, is_causal):
    """bool (length, length) [query, key]: the keys a query sees along one axis in NATTEN 0.21."""
    seen = torch.zeros(length, length, dtype=torch.bool)
    for x in range(length):
        group, i = x % dilation, x // dilation
        n = len(range(group, length, dilation))  # positions in x's dilation group
        if is_causal:  # stride-group leader: its last query
            leader = min(i // stride * stride + stride - 1, n - 1)
            keys = [j for j in range(i + 1) if leader - j < kernel_size]
        else:  # leader: the centre query (the right one for even stride); window clamped inside
            leader = min(i // stride * stride + stride // 2, n - 1)
            left, right = kernel_size // 2, kernel_size - 1 - kernel_size // 2
            centre = min(max(leader, left), n - 1 - right)
            keys = range(centre - left, centre + right + 1)
        for j in keys:
            seen[x, group + j * dilation] = True
    return seen


def as_tuple(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def natten_mask(spatial, kernel_size, stride, dilation, is_causal):
    """The (tokens, tokens) mask of a grid, row-major: the product of the per-axis masks."""
    rank = len(spatial)
    axes = [natten_axis_mask(*a) for a in zip(spatial, as_tuple(kernel_size, rank), as_tuple(dilation, rank),
                                                as_tuple(stride, rank), as_tuple(is_causal, rank))]
    return reduce(lambda a, b: torch.kron(a.int(), b.int()).bool(), axes)


def dense(q, k, v, mask, scale=None):
    """float64 attention of q (B, Nq, H, D) over k, v (B, Nk, Hkv, D) where mask (Nq, Nk) allows
    -> out (B, Nq, H, D), lse (B, Nq, H)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k).mul(scale).masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)
    return torch.einsum("bhij,bjhd->bihd", (s - lse[..., None]).exp(), v), lse.transpose(1, 2)


def reference_na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, extra=None):
    """na{1,2,3}d in float64: attention over the neighbourhood (and the extra keys / values)."""
    spatial, (b, h, d) = q.shape[1:-2], (q.shape[0], q.shape[-2], q.shape[-1])
    mask = natten_mask(spatial, kernel_size, stride, dilation, is_causal)
    keys, values = k.flatten(1, -3), v.flatten(1, -3)
    if extra is not None:
        keys, values = torch.cat([keys, extra[0]], 1), torch.cat([values, extra[1]], 1)
        mask = torch.cat([mask, mask.new_ones(len(mask), extra[0].shape[1])], 1)
    out, lse = dense(q.flatten(1, -3), keys, values, mask, scale)
    return out.reshape(b, *spatial, h, d), lse.reshape(b, *spatial, h)


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def test_natten_rule_is_attnkit_rule():
    """NATTEN's per-axis rule and attnkit's (reference.neighborhood_axis_mask) agree on every
    valid (length <= 12, kernel_size, dilation, stride, is_causal)."""
    for length in range(2, 13):
        for kernel_size in range(2, length + 1):
            for dilation in range(1, length // kernel_size + 1):
                for stride in range(1, kernel_size + 1):
                    for causal in (False, True):
                        args = (length, kernel_size, dilation, stride, causal)
                        assert torch.equal(natten_axis_mask(*args),
                                           attnkit.reference.neighborhood_axis_mask(*args)), args


# --- against real NATTEN (forward) ------------------------------------------------------------

def quiet_flex(test):
    """NATTEN's CPU path runs FlexAttention eagerly, which warns about that (and its lse argument)."""
    for message in ("flex_attention called without torch.compile", "return_lse is deprecated"):
        test = pytest.mark.filterwarnings(f"ignore:{message}")(test)
    return test

# (spatial, heads, kv_heads, head_dim, kernel_size, stride, dilation, is_causal, extra tokens)
NATTEN_CASES = [
    ((10,), 2, 2, 16, 3, 1, 1, False, 0),
    ((13,), 4, 2, 8, 4, 2, 3, True, 0),
    ((16,), 2, 1, 16, 5, 5, 2, False, 3),
    ((10,), 2, 2, 16, 10, 1, 1, False, 0),  # kernel == layout: NATTEN's plain-attention path
    ((6, 7), 2, 2, 16, (3, 4), (1, 2), (2, 1), (False, True), 0),
    ((7, 9), 4, 2, 16, (3, 4), (2, 3), (2, 1), (True, False), 5),
    ((8, 8), 2, 2, 32, 8, 1, 1, False, 4),  # the same, with additional keys
    ((4, 5, 6), 2, 1, 16, (2, 3, 3), (2, 1, 3), (1, 1, 2), (True, False, True), 0),
    ((5, 4, 6), 4, 4, 8, 3, 1, 1, (False, True, False), 2),
]


@pytest.mark.parametrize("case", NATTEN_CASES, ids=lambda c: f"{len(c[0])}d-{c[0]}")
@quiet_flex
def test_na_matches_natten(case):
    natten = pytest.importorskip("natten")
    spatial, heads, kv_heads, head_dim, kernel_size, stride, dilation, is_causal, extra = case
    torch.manual_seed(len(spatial) * 100 + sum(spatial))
    q = rand(2, *spatial, heads, head_dim)
    k, v = rand(2, *spatial, kv_heads, head_dim), rand(2, *spatial, kv_heads, head_dim)
    kwargs = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal, return_lse=True)
    if extra:
        kwargs.update(additional_keys=rand(2, extra, kv_heads, head_dim),
                      additional_values=rand(2, extra, kv_heads, head_dim))
    name = f"na{len(spatial)}d"
    out, lse = getattr(compat, name)(q, k, v, **kwargs)
    want_out, want_lse = getattr(natten, name)(q, k, v, **kwargs)
    assert lse.shape == want_lse.shape == (2, *spatial, heads) and lse.dtype == want_lse.dtype
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)


@quiet_flex
def test_attention_merge_and_module_match_natten():
    natten = pytest.importorskip("natten")
    torch.manual_seed(1)
    q, k, v = rand(2, 5, 4, 16), rand(2, 7, 2, 16), rand(2, 7, 2, 16)
    out, lse = compat.attention(q, k, v, return_lse=True)
    want_out, want_lse = natten.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)
    out2, lse2 = compat.attention(q, rand(2, 3, 2, 16), rand(2, 3, 2, 16), return_lse=True)
    merged = compat.merge_attentions([out, out2], [lse, lse2])
    want = natten.merge_attentions([out, out2], [lse, lse2], torch_compile=False, use_autograd_fix=False)
    for got, expected in zip(merged, want):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    options = dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
    theirs, ours = natten.NeighborhoodAttention2D(64, 4, **options), compat.NeighborhoodAttention2D(64, 4, **options)
    ours.load_state_dict(theirs.state_dict())
    x = rand(2, 8, 11, 64)
    with torch.no_grad():  # NATTEN's CPU backend has no backward
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-5)
    assert repr(ours) == repr(theirs)


def test_signatures_match_natten():
    """Same parameters, order and defaults as NATTEN 0.21 (attnkit's only take **legacy besides)."""
    natten = pytest.importorskip("natten")
    for name in ("na1d", "na2d", "na3d", "attention", "merge_attentions", "NeighborhoodAttention1D",
                 "NeighborhoodAttention2D", "NeighborhoodAttention3D"):
        ours = [(p.name, p.default) for p in inspect.signature(getattr(compat, name)).parameters.values()
                if p.kind is not p.VAR_KEYWORD]
        theirs = [(p.name, p.default) for p in inspect.signature(getattr(natten, name)).parameters.values()]
        assert ours == theirs, name


# --- against the float64 reference: forward, lse layout, gradients ----------------------------

def random_case(rng, rank):
    spatial = [rng.randint(3, 6 if rank == 3 else 9) for _ in range(rank)]
    kernel_size = [rng.randint(2, n) for n in spatial]
    dilation = [rng.randint(1, n // k) for n, k in zip(spatial, kernel_size)]
    stride = [rng.randint(1, k) for k in kernel_size]
    is_causal = [rng.random() < 0.4 for _ in spatial]
    heads, kv_heads = rng.choice([(2, 2), (4, 2), (3, 1)])
    return spatial, heads, kv_heads, rng.choice([8, 12, 16]), kernel_size, stride, dilation, is_causal


@pytest.mark.parametrize("seed", range(12))
def test_na_forward_and_gradients_vs_reference(seed):
    """Random 1-D / 2-D / 3-D cases, GQA, with and without additional keys / values; a loss on
    output and lse, so the gradients also cover lse (which NATTEN users merge with)."""
    rng = random.Random(seed)
    rank = seed % 3 + 1
    spatial, heads, kv_heads, head_dim, kernel_size, stride, dilation, is_causal = random_case(rng, rank)
    torch.manual_seed(seed)
    q = rand(2, *spatial, heads, head_dim, grad=True)
    k, v = rand(2, *spatial, kv_heads, head_dim, grad=True), rand(2, *spatial, kv_heads, head_dim, grad=True)
    n_extra = rng.randint(1, 6)
    extra = [rand(2, n_extra, kv_heads, head_dim, grad=True) for _ in range(2)] if seed % 2 else []
    scale = rng.choice([None, 0.3])
    options = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal, scale=scale)
    additional_keys, additional_values = extra or (None, None)
    out, lse = getattr(compat, f"na{rank}d")(q, k, v, **options, return_lse=True, additional_keys=additional_keys,
                                             additional_values=additional_values)
    leaves = [q, k, v] + extra
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    want_out, want_lse = reference_na(*doubles[:3], **options, extra=doubles[3:] or None)
    assert lse.shape == (2, *spatial, heads) and lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-5)
    w_out, w_lse = torch.randn_like(want_out), torch.randn_like(want_lse)
    ((out * w_out).sum() + (lse * w_lse).sum()).backward()
    ((want_out * w_out).sum() + (want_lse * w_lse).sum()).backward()
    for name, got, want in zip(["query", "key", "value", "additional_keys", "additional_values"], leaves, doubles):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_na_bf16_gradients_with_additional_kv():
    torch.manual_seed(3)
    q, k, v = (rand(1, 6, 7, 2, 16, dtype=torch.bfloat16, grad=True) for _ in range(3))
    ak, av = (rand(1, 4, 2, 16, dtype=torch.bfloat16, grad=True) for _ in range(2))
    out, lse = compat.na2d(q, k, v, kernel_size=3, dilation=(1, 2), return_lse=True,
                           additional_keys=ak, additional_values=av)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    (out.float().sum() + lse.sum()).backward()
    doubles = [t.detach().double().requires_grad_() for t in (q, k, v, ak, av)]
    want_out, want_lse = reference_na(*doubles[:3], kernel_size=3, dilation=(1, 2), extra=doubles[3:])
    (want_out.sum() + want_lse.sum()).backward()
    torch.testing.assert_close(out.double(), want_out, atol=3e-2, rtol=3e-2)
    for got, want in zip((q, k, v, ak, av), doubles):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.double(), want.grad, atol=6e-2, rtol=5e-2)


def test_manual_merge_equals_additional_kv():
    """NATTEN users' own cross-attention (na + attention + merge_attentions) trains like
    additional_keys / values: the lse of na1d and attention carry gradients."""
    torch.manual_seed(4)
    q, k, v = rand(2, 11, 4, 8, grad=True), rand(2, 11, 2, 8, grad=True), rand(2, 11, 2, 8, grad=True)
    ak, av = rand(2, 3, 2, 8, grad=True), rand(2, 3, 2, 8, grad=True)
    leaves = (q, k, v, ak, av)
    fused = compat.na1d(q, k, v, 5, stride=2, is_causal=True, additional_keys=ak, additional_values=av)
    fused_grads = torch.autograd.grad(fused.square().sum(), leaves)
    parts = [compat.na1d(q, k, v, 5, stride=2, is_causal=True, return_lse=True),
             compat.attention(q, ak, av, return_lse=True)]
    merged, _ = compat.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(merged, fused, atol=1e-6, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(merged.square().sum(), leaves), fused_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- attention and merge_attentions -----------------------------------------------------------

@pytest.mark.parametrize("seqlen_q,seqlen_kv", [(6, 6), (4, 9), (9, 4)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_vs_reference(seqlen_q, seqlen_kv, is_causal):
    """Causal is NATTEN's top-left mask (query i sees keys j <= i) for any lengths; GQA."""
    torch.manual_seed(seqlen_q * 10 + seqlen_kv)
    q = rand(2, seqlen_q, 4, 8, grad=True)
    k, v = rand(2, seqlen_kv, 2, 8, grad=True), rand(2, seqlen_kv, 2, 8, grad=True)
    out, lse = compat.attention(q, k, v, is_causal=is_causal, return_lse=True)
    doubles = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(seqlen_q, seqlen_kv, dtype=torch.bool)
    want_out, want_lse = dense(*doubles, mask.tril() if is_causal else mask)
    assert lse.shape == (2, seqlen_q, 4)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-5)
    w = torch.randn_like(want_lse)
    (out.sum() + (lse * w).sum()).backward()
    (want_out.sum() + (want_lse * w).sum()).backward()
    for got, want in zip((q, k, v), doubles):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["seqlens", "cumulative"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_varlen(form, is_causal):
    torch.manual_seed(5)
    lens_q = [3, 5, 2]
    lens_kv = lens_q if is_causal else [4, 1, 6]
    q, k, v = rand(1, sum(lens_q), 2, 8), rand(1, sum(lens_kv), 1, 8), rand(1, sum(lens_kv), 1, 8)
    seqlens = dict(seqlens_Q=torch.tensor(lens_q, dtype=torch.int32),
                   seqlens_KV=torch.tensor(lens_kv, dtype=torch.int32))
    if form == "cumulative":
        seqlens = dict(cumulative_seqlen_Q=torch.tensor([0, *torch.tensor(lens_q).cumsum(0)], dtype=torch.int32),
                       cumulative_seqlen_KV=torch.tensor([0, *torch.tensor(lens_kv).cumsum(0)], dtype=torch.int32),
                       max_seqlen_Q=max(lens_q), max_seqlen_KV=max(lens_kv))
    out, lse = compat.attention(q, k, v, is_causal=is_causal, return_lse=True, **seqlens)
    assert out.shape == q.shape and lse.shape == (1, sum(lens_q), 2)
    starts_q, starts_kv = [0, 3, 8], [0, 3, 8] if is_causal else [0, 4, 5]
    for sq, skv, nq, nkv in zip(starts_q, starts_kv, lens_q, lens_kv):
        mask = torch.ones(nq, nkv, dtype=torch.bool)
        want_out, want_lse = dense(q[:, sq:sq + nq], k[:, skv:skv + nkv], v[:, skv:skv + nkv],
                                   mask.tril() if is_causal else mask)
        torch.testing.assert_close(out[:, sq:sq + nq].double(), want_out, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, sq:sq + nq].double(), want_lse, atol=2e-5, rtol=1e-5)


def test_merge_attentions_three_way_vs_reference():
    """Attention over three disjoint key chunks, merged, is attention over all keys, with gradients."""
    torch.manual_seed(6)
    q, k, v = rand(2, 5, 4, 8, grad=True), rand(2, 12, 2, 8, grad=True), rand(2, 12, 2, 8, grad=True)
    parts = [compat.attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in ((0, 3), (3, 10), (10, 12))]
    out, lse = compat.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    doubles = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = dense(*doubles, torch.ones(5, 12, dtype=torch.bool))
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-5)
    (out.sum() + lse.sum()).backward()
    (want_out.sum() + want_lse.sum()).backward()
    for got, want in zip((q, k, v), doubles):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4)


# --- modules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,spatial,options", [
    (1, (12,), dict(kernel_size=5, stride=2, dilation=2, is_causal=True)),
    (2, (7, 8), dict(kernel_size=(3, 5), dilation=(2, 1), qkv_bias=False, qk_scale=0.2)),
    (3, (4, 5, 6), dict(kernel_size=(2, 3, 3), stride=(1, 3, 2), is_causal=(True, False, False))),
])
def test_modules_vs_reference(rank, spatial, options):
    torch.manual_seed(rank)
    layer = getattr(compat, f"NeighborhoodAttention{rank}D")(32, 4, **options)
    x = rand(2, *spatial, 32, grad=True)
    y = layer(x)
    assert y.shape == x.shape
    w = torch.randn_like(y)
    (y * w).sum().backward()

    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    xd = x.detach().double().requires_grad_()
    qkv = torch.nn.functional.linear(xd, params["qkv.weight"], params.get("qkv.bias"))
    q, k, v = qkv.unflatten(-1, (3, 4, 8)).unbind(-3)
    att, _ = reference_na(q, k, v, options["kernel_size"], options.get("stride", 1), options.get("dilation", 1),
                          options.get("is_causal", False), options.get("qk_scale"))
    want = torch.nn.functional.linear(att.flatten(-2), params["proj.weight"], params["proj.bias"])
    (want * w).sum().backward()
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=5e-5, rtol=1e-4)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[name].grad, atol=5e-5, rtol=1e-4, msg=name)
    assert (layer.qkv.bias is None) == (options.get("qkv_bias") is False)


# --- bad input --------------------------------------------------------------------------------

q2, k2 = torch.randn(1, 7, 7, 2, 8), torch.randn(1, 7, 7, 2, 8)
q1, kv1 = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 1, 8)
extra = torch.randn(1, 3, 2, 8)
BAD = [
    ("kernel_size", lambda: compat.na1d(q1, q1, q1, kernel_size=1)),
    ("kernel_size", lambda: compat.na2d(q2, k2, k2, kernel_size=(3, 3, 3))),
    ("kernel_size", lambda: compat.na2d(q2, k2, k2, kernel_size=4, dilation=2)),
    ("stride", lambda: compat.na2d(q2, k2, k2, kernel_size=3, stride=0)),
    ("stride", lambda: compat.na2d(q2, k2, k2, kernel_size=3, stride=4)),
    ("dilation", lambda: compat.na2d(q2, k2, k2, kernel_size=3, dilation=(1, 0))),
    ("is_causal", lambda: compat.na2d(q2, k2, k2, kernel_size=3, is_causal=1)),
    ("scale", lambda: compat.na2d(q2, k2, k2, kernel_size=3, scale="big")),
    ("query", lambda: compat.na2d(q1, q1, q1, kernel_size=3)),
    ("key", lambda: compat.na1d(q1, None, q1, kernel_size=3)),
    ("k must", lambda: compat.na2d(q2, k2[:, :6], k2[:, :6], kernel_size=3)),
    ("v must", lambda: compat.na1d(q1, q1, q1[..., :4], kernel_size=3)),
    ("additional_keys and additional_values", lambda: compat.na1d(q1, kv1, kv1, 3, additional_keys=extra[:, :, :1])),
    ("additional_keys", lambda: compat.na1d(q1, kv1, kv1, 3, additional_keys=extra, additional_values=extra)),
    ("additional_keys", lambda: compat.na2d(q2, k2, k2, 3, additional_keys=extra.half(), additional_values=extra)),
    ("additional_values", lambda: compat.na2d(q2, k2, k2, 3, additional_keys=extra, additional_values=extra[:, :2])),
    ("attention_kwargs", lambda: compat.na2d(q2, k2, k2, 3, attention_kwargs={"is_causal": True})),
    ("rpb", lambda: compat.na2d(q2, k2, k2, 3, rpb=torch.zeros(2, 5, 5))),
    ("xformers_kwargs", lambda: compat.na1d(q1, q1, q1, 3, xformers_kwargs={})),
    ("query", lambda: compat.attention(q2, k2, k2)),
    ("query must have batch 1", lambda: compat.attention(torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8),
                                                         torch.randn(2, 4, 2, 8), max_seqlen_Q=4, max_seqlen_KV=4)),
    ("seqlens_KV", lambda: compat.attention(q1, q1, q1, seqlens_Q=torch.tensor([6], dtype=torch.int32))),
    ("seqlens_Q", lambda: compat.attention(q1, q1, q1, seqlens_Q=torch.tensor([6]), seqlens_KV=torch.tensor([6]))),
    ("max_seqlen_Q", lambda: compat.attention(q1, q1, q1, cumulative_seqlen_Q=torch.tensor([0, 6], dtype=torch.int32),
                                              cumulative_seqlen_KV=torch.tensor([0, 6], dtype=torch.int32))),
    ("is_causal", lambda: compat.attention(q1, q1, q1, is_causal=True,
                                           seqlens_Q=torch.tensor([2, 4], dtype=torch.int32),
                                           seqlens_KV=torch.tensor([3, 3], dtype=torch.int32))),
    ("outputs", lambda: compat.merge_attentions([q1], [q1[..., 0]])),
    ("lse_tensors", lambda: compat.merge_attentions([q1, q1], [q1[..., 0]])),
    ("outputs\\[1\\]", lambda: compat.merge_attentions([q1, q1[:, :5]], [q1[..., 0], q1[:, :5, :, 0]])),
    ("lse_tensors\\[0\\]", lambda: compat.merge_attentions([q1, q1], [q1[..., 0].transpose(1, 2), q1[..., 0]])),
    ("lse_tensors\\[0\\] does not require grad",
     lambda: compat.merge_attentions([rand(1, 6, 2, 8, grad=True), rand(1, 6, 2, 8, grad=True)],
                                     [rand(1, 6, 2), rand(1, 6, 2, grad=True)])),
    ("num_heads", lambda: compat.NeighborhoodAttention2D(10, 3, kernel_size=3)),
    ("kernel_size", lambda: compat.NeighborhoodAttention2D(16, 2, kernel_size=1)),
    ("is_causal", lambda: compat.NeighborhoodAttention1D(16, 2, kernel_size=3, is_causal=(True, False))),
    ("attn_drop", lambda: compat.NeighborhoodAttention2D(16, 2, kernel_size=3, attn_drop=0.1)),
    ("rel_pos_bias", lambda: compat.NeighborhoodAttention3D(16, 2, kernel_size=3, rel_pos_bias=True)),
    ("x must", lambda: compat.NeighborhoodAttention2D(16, 2, kernel_size=3)(torch.randn(1, 5, 5, 8))),
    ("x must", lambda: compat.NeighborhoodAttention2D(16, 2, kernel_size=3)(torch.randn(1, 5, 16))),
]


@pytest.mark.parametrize("match,call", BAD, ids=[f"{i}-{m.split()[0]}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_raises_value_error_naming_the_argument(match, call):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="kernal_size"):
        compat.na1d(q1, q1, q1, 3, kernal_size=3)


def test_tuning_arguments_are_accepted_and_ignored():
    out = compat.na2d(q2, k2, k2, 3, backend="cutlass-fna", q_tile_shape=(8, 8), kv_tile_shape=(8, 8),
                      torch_compile=True, kernel_schedule="coop", attention_kwargs={"backend": "flex-fmha"})
    torch.testing.assert_close(out, compat.na2d(q2, k2, k2, 3))
    torch.testing.assert_close(compat.na2d(q2, k2, k2, 3, scale=0.0), out)  # NATTEN: scale or default


def test_example_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "natten_2d_module.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line, = result.stdout.splitlines()
    assert line.startswith("NeighborhoodAttention2D") and "nan" not in line and "inf" not in line, line
