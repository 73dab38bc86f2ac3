"""`make demo`: runs every public attnkit op on the best device present, checks it against the
float64 reference (attnkit.reference), then runs a quick benchmark against torch SDPA.

Each check prints one line: the op, the device it ran on, its case, and the relative error
||got - ref|| / ||ref|| of each output (and gradient) with its bound; integer outputs (page
indices, key min / max) must match exactly and print the number of differing entries.
Bounds are the tests' (tests/conftest.py FWD_TOL / GRAD_TOL for the input dtype; decode on
quantized K/V against the unquantized K/V: docs/quantization.md). An op runs on CUDA when a
GPU is present and its CUDA kernel is built (in bfloat16: the CUDA attention-family kernels
take fp16 / bf16 only), else on the CPU in float32. Any error above its bound makes the demo
exit with status 1 after all lines are printed, without the benchmark.

tests/test_demo.py runs check_all_ops("cpu")."""
import math
import subprocess
import sys
from functools import partial

import torch

import attnkit
from attnkit import reference
from attnkit._ops import CUDA_KERNELS  # the op names attnkit.has_cuda_kernel knows
from attnkit.testing import realistic_kv

# Relative-error bounds per input dtype (tests/conftest.py).
FWD = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GRAD = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Decode on quantized K/V against the float64 reference on the unquantized K/V
# (docs/quantization.md, "Accuracy of decode on quantized K/V").
QUANT_DECODE = {"int8": 2e-2, "fp8_e4m3": 2e-2, "int4": 8e-2}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


# ---- helpers ----------------------------------------------------------------------------------

def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    """Standard normal values drawn on the CPU from `gen`, then cast and moved."""
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def ref_input(t, grad=False):
    """A float64 CPU copy of t for the reference (a leaf requiring grad when asked)."""
    return t.detach().cpu().double().requires_grad_(grad)


def rel_err(got, want):
    """||got - want|| / ||want|| in float64 over the entries where want is finite; inf when the
    shapes or the positions of -inf (rows that see no key) differ; NaN stays NaN (fails)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        return math.inf
    empty = want == -math.inf
    if not torch.equal(got == -math.inf, empty):
        return math.inf
    got, want = got[~empty], want[~empty]
    return ((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def mismatches(got, want):
    """Entries of got that differ from want (all of them when the shapes differ)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    return int((got != want).sum()) if got.shape == want.shape else max(got.numel(), want.numel(), 1)


def fwd_bwd(op, ref_op, inputs, dtype, gen):
    """Forward out and lse and the gradients of q, k, v (from a random dout) of `op` on
    `inputs` against `ref_op` in float64 -> measures."""
    out, lse = op(*inputs)
    dout = randn(gen, *out.shape, dtype=dtype, device=out.device)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_inputs = [ref_input(t, grad=True) for t in inputs]
    ref, ref_lse = ref_op(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.cpu().double())
    return ([("out", rel_err(out, ref), FWD[dtype]), ("lse", rel_err(lse, ref_lse), FWD[dtype])]
            + [(f"d{n}", rel_err(g, r), GRAD[dtype]) for n, g, r in zip("qkv", grads, ref_grads)])


def filled_cache(gen, dev, dtype, lens, kv_heads=2, head_dim=64, page_size=16, **cache_kwargs):
    """A PagedKVCache holding random k, v (len(lens), max(lens), kv_heads, head_dim) (also
    returned): per sequence its prompt as one chunk, then its last 5 tokens one step at a time,
    one token for every sequence per append."""
    batch, longest = len(lens), max(lens)
    k = randn(gen, batch, longest, kv_heads, head_dim, dtype=dtype, device=dev)
    v = randn(gen, batch, longest, kv_heads, head_dim, dtype=dtype, device=dev)
    num_pages = sum(-(-n // page_size) for n in lens) + 3
    cache = attnkit.PagedKVCache(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=dev,
                                 max_seqs=batch, **cache_kwargs)
    for s, n in enumerate(lens):
        cache.append(s, k[s, :n - 5], v[s, :n - 5])
    for step in range(5, 0, -1):
        cache.append(list(range(batch)), torch.stack([k[s, n - step] for s, n in enumerate(lens)]),
                     torch.stack([v[s, n - step] for s, n in enumerate(lens)]))
    return cache, k, v


def cache_reference(cache):
    """The reference's view of a cache: (k_pages, v_pages, cache_seqlens, block_table) on the CPU."""
    return (ref_input(cache.k_pages), ref_input(cache.v_pages), cache.cache_seqlens.cpu(), cache.block_table.cpu())


# ---- the checks: each takes (device, dtype, generator) -> (case, [(what, error, bound), ...]) ----

def check_attention(dev, dtype, gen):
    shapes = ((2, 300, 8, 64), (2, 300, 2, 64), (2, 300, 2, 64))
    q, k, v = (randn(gen, *s, dtype=dtype, device=dev).requires_grad_() for s in shapes)
    opts = dict(causal=True, window=(200, -1), softcap=30.0)
    measures = fwd_bwd(lambda *x: attnkit.attention(*x, return_lse=True, **opts),
                       lambda *x: reference.attention(*x, **opts), (q, k, v), dtype, gen)
    return "(2, 300, 8, 64) GQA 4:1, causal, window (200, -1), softcap 30", measures


def check_attention_varlen(dev, dtype, gen):
    lens_q, lens_k = [100, 0, 250, 37], [120, 30, 250, 60]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lens_q, lens_k))
    q = randn(gen, sum(lens_q), 8, 64, dtype=dtype, device=dev).requires_grad_()
    k, v = (randn(gen, sum(lens_k), 2, 64, dtype=dtype, device=dev).requires_grad_() for _ in "kv")
    measures = fwd_bwd(
        lambda *x: attnkit.attention_varlen(*x, cu_q.to(dev), cu_k.to(dev), max(lens_q), max(lens_k), causal=True,
                                            return_lse=True),
        lambda *x: reference.attention_varlen(*x, cu_q, cu_k, causal=True), (q, k, v), dtype, gen)
    return f"q lengths {lens_q}, k lengths {lens_k}, 8:2 heads, causal", measures


def check_decode_contiguous(dev, dtype, gen):
    k, v = (randn(gen, 2, 600, 2, 64, dtype=dtype, device=dev) for _ in "kv")
    q = randn(gen, 2, 2, 8, 64, dtype=dtype, device=dev)
    lens = torch.tensor([300, 511], dtype=torch.int32)
    out, lse = attnkit.decode(q, k, v, lens.to(dev), window=128, return_lse=True)
    ref, ref_lse = reference.decode(ref_input(q), ref_input(k), ref_input(v), lens, window=128)
    return f"cache (2, 600, 2, 64), 2 queries, lengths {lens.tolist()}, window 128", [
        ("out", rel_err(out, ref), FWD[dtype]), ("lse", rel_err(lse, ref_lse), FWD[dtype])]


def check_decode_paged(dev, dtype, gen):
    k, v = (randn(gen, 64, 16, 2, 64, dtype=dtype, device=dev) for _ in "kv")
    table = torch.randperm(64, generator=gen).int().view(2, 32)
    lens = torch.tensor([300, 511], dtype=torch.int32)
    q = randn(gen, 2, 2, 8, 64, dtype=dtype, device=dev)
    out, lse = attnkit.decode(q, k, v, lens.to(dev), block_table=table.to(dev), softcap=20.0, return_lse=True)
    ref, ref_lse = reference.decode(ref_input(q), ref_input(k), ref_input(v), lens, block_table=table, softcap=20.0)
    return f"page 16, shuffled pages, 2 queries, lengths {lens.tolist()}, softcap 20", [
        ("out", rel_err(out, ref), FWD[dtype]), ("lse", rel_err(lse, ref_lse), FWD[dtype])]


def check_paged_prefill(dev, dtype, gen):
    k, v = (randn(gen, 64, 16, 2, 64, dtype=dtype, device=dev) for _ in "kv")
    table = torch.randperm(64, generator=gen).int().view(2, 32)
    lens_q, lens_k = [200, 33], [300, 511]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lens_q, lens_k))
    q = randn(gen, sum(lens_q), 8, 64, dtype=dtype, device=dev)
    out, lse = attnkit.attention_varlen(q, k, v, cu_q.to(dev), cu_k.to(dev), 200, 511, causal=True,
                                        block_table=table.to(dev), return_lse=True)
    ref, ref_lse = reference.attention_varlen(ref_input(q), ref_input(k), ref_input(v), cu_q, cu_k, causal=True,
                                              block_table=table)
    return f"chunks of {lens_q} new tokens over {lens_k} paged keys (page 16, shuffled), causal", [
        ("out", rel_err(out, ref), FWD[dtype]), ("lse", rel_err(lse, ref_lse), FWD[dtype])]


def check_merge(dev, dtype, gen):
    out_a, out_b = (randn(gen, 2, 5, 8, 64, dtype=dtype, device=dev) for _ in "ab")
    lse_a, lse_b = (randn(gen, 2, 8, 5, device=dev) for _ in "ab")
    lse_b[0, 0] = -math.inf  # side b saw no key in these rows
    out, lse = attnkit.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = reference.merge_attention_states(*(ref_input(t) for t in (out_a, lse_a, out_b, lse_b)))
    return "(2, 5, 8, 64), a side with lse -inf", [("out", rel_err(out, ref), FWD[dtype]),
                                                  ("lse", rel_err(lse, ref_lse), FWD[torch.float32])]


def check_paged_cache(dev, dtype, gen):
    lens = [150, 37, 90]
    cache, k, v = filled_cache(gen, dev, dtype, lens)
    # key_min / key_max of every page against the keys appended to it.
    pages = [(p, k[s, 16 * j:min(16 * j + 16, n)].float()) for s, n in enumerate(lens)
             for j, p in enumerate(cache.pages(s))]
    got = torch.stack([cache.key_min[p] for p, _ in pages] + [cache.key_max[p] for p, _ in pages])
    want = torch.stack([keys.amin(0) for _, keys in pages] + [keys.amax(0) for _, keys in pages])
    q = randn(gen, 3, 1, 8, 64, dtype=dtype, device=dev)
    out = attnkit.decode(q, cache.k_pages, cache.v_pages, cache.cache_seqlens, block_table=cache.block_table)
    ref, _ = reference.decode(ref_input(q), ref_input(k), ref_input(v), torch.tensor(lens, dtype=torch.int32))
    return f"chunks + 5 single-token steps, lengths {lens}, page 16; decode on it vs the appended rows", [
        ("key min/max", mismatches(got, want), 0),
        ("decode out", rel_err(out, ref), FWD[dtype])]


def sparse_setup(gen, dev, dtype):
    cache, _, _ = filled_cache(gen, dev, dtype, [700, 300])
    q = randn(gen, 2, 2, 8, 64, dtype=dtype, device=dev)
    return cache, q, cache.cache_seqlens, cache.block_table


def check_page_scores(dev, dtype, gen):
    cache, q, lens, table = sparse_setup(gen, dev, dtype)
    scores = attnkit.page_scores(q, cache.key_min, cache.key_max, table, lens, page_size=16)
    ref = reference.page_scores(ref_input(q), cache.key_min.cpu(), cache.key_max.cpu(), table.cpu(), lens.cpu(),
                                page_size=16)
    return "Quest bounds of a PagedKVCache, lengths [700, 300], 2 queries, 8:2 heads", [
        ("scores", rel_err(scores, ref), FWD[torch.float32])]  # float32 arithmetic on any q dtype


def check_select_pages(dev, dtype, gen):
    cache, q, lens, table = sparse_setup(gen, dev, dtype)
    scores = attnkit.page_scores(q, cache.key_min, cache.key_max, table, lens, page_size=16)
    pages = attnkit.select_pages(scores, 8, sink_pages=1, recent_pages=2)
    ref = reference.select_pages(scores.cpu(), 8, sink_pages=1, recent_pages=2)
    return "top 8 + 1 sink + 2 recent of the page_scores above", [("pages", mismatches(pages, ref), 0)]


def check_sparse_decode(dev, dtype, gen):
    cache, q, lens, table = sparse_setup(gen, dev, dtype)
    scores = attnkit.page_scores(q, cache.key_min, cache.key_max, table, lens, page_size=16)
    pages = attnkit.select_pages(scores, 8, sink_pages=1, recent_pages=2)
    out, lse = attnkit.sparse_decode(q, cache.k_pages, cache.v_pages, lens, table, pages, return_lse=True)
    ref, ref_lse = reference.sparse_decode(ref_input(q), *cache_reference(cache), pages.cpu(), tokens_per_index=16)
    return "the 11 selected pages above, 2 queries", [("out", rel_err(out, ref), FWD[dtype]),
                                                    ("lse", rel_err(lse, ref_lse), FWD[dtype])]


def check_sparse_decode_tokens(dev, dtype, gen):
    cache, q, lens, table = sparse_setup(gen, dev, dtype)
    tokens = torch.randint(-3, 720, (2, 2, 100), generator=gen, dtype=torch.int32)  # with -1s and past-the-end
    out, lse = attnkit.sparse_decode_tokens(q, cache.k_pages, cache.v_pages, lens, table, tokens.to(dev),
                                            return_lse=True)
    ref, ref_lse = reference.sparse_decode(ref_input(q), *cache_reference(cache), tokens, tokens_per_index=1)
    return "100 random token indices per (sequence, kv head), 2 queries", [
        ("out", rel_err(out, ref), FWD[dtype]), ("lse", rel_err(lse, ref_lse), FWD[dtype])]


def streaming_rows(lens, streaming, page_size, max_pages, sink_pages, recent_pages):
    """streaming_page_indices by plain Python: a streaming head's sink and recent pages, a
    retrieval head's every page, ascending, -1 padded."""
    rows = torch.full((len(lens), len(streaming), max_pages), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        pages = -(-n // page_size)
        for g, is_streaming in enumerate(streaming):
            keep = sorted(set(range(min(sink_pages, pages))) | set(range(max(pages - recent_pages, 0), pages))
                          if is_streaming else range(pages))
            rows[b, g, :len(keep)] = torch.tensor(keep, dtype=torch.int32)
    return rows


def check_streaming_page_indices(dev, dtype, gen):
    cache, q, lens, table = sparse_setup(gen, dev, dtype)
    streaming = [True, False]
    pages = attnkit.streaming_page_indices(lens, torch.tensor(streaming, device=dev), page_size=16,
                                           max_pages=table.shape[1], sink_pages=1, recent_pages=3)
    want = streaming_rows(lens.tolist(), streaming, 16, table.shape[1], 1, 3)
    out = attnkit.sparse_decode(q, cache.k_pages, cache.v_pages, lens, table, pages)
    ref, _ = reference.sparse_decode(ref_input(q), *cache_reference(cache), want, tokens_per_index=16)
    return "kv head 0 streaming (1 sink + 3 recent pages), head 1 retrieval; sparse_decode on them", [
        ("pages", mismatches(pages, want), 0), ("out", rel_err(out, ref), FWD[dtype])]


def check_neighborhood(dev, dtype, gen):
    q = randn(gen, 1, 12, 14, 4, 32, dtype=dtype, device=dev).requires_grad_()
    k, v = (randn(gen, 1, 12, 14, 2, 32, dtype=dtype, device=dev).requires_grad_() for _ in "kv")
    opts = dict(kernel_size=(5, 3), dilation=(1, 2), stride=(2, 1), is_causal=(False, True))
    measures = fwd_bwd(lambda *x: attnkit.neighborhood_attention(*x, return_lse=True, **opts),
                       lambda *x: reference.neighborhood_attention(*x, **opts), (q, k, v), dtype, gen)
    return "2-D 12x14, 4:2 heads, kernel (5, 3), dilation (1, 2), stride (2, 1), causal (no, yes)", measures


def block_sparse_inputs(gen, dev, dtype, seqlen=300):
    q = randn(gen, 1, seqlen, 4, 32, dtype=dtype, device=dev).requires_grad_()
    k, v = (randn(gen, 1, seqlen, 2, 32, dtype=dtype, device=dev).requires_grad_() for _ in "kv")
    return q, k, v


def block_sparse_fwd_bwd(inputs, indices, counts, dtype, gen, given=None):
    """fwd_bwd of block_sparse_attention (causal) on the lists `given` (default: indices,
    counts) against the reference on (indices, counts)."""
    given = given or (indices, counts)
    return fwd_bwd(lambda *x: attnkit.block_sparse_attention(*x, *given, causal=True, return_lse=True),
                   lambda *x: reference.block_sparse_attention(*x, indices.cpu(), counts.cpu(), causal=True),
                   inputs, dtype, gen)


def check_block_sparse(dev, dtype, gen):
    q, k, v = block_sparse_inputs(gen, dev, dtype)
    indices, counts = attnkit.block_topk_indices(attnkit.pooled_block_scores(q, k, 64), 2, causal=True,
                                                 local_blocks=1, sink_blocks=1)
    # The same sets given messily: each list twice, the second time reversed with its padding.
    messy, messy_counts = torch.cat([indices, indices.flip(-1)], dim=-1), 2 * counts + 1
    canonical, canonical_counts = attnkit.canonical_block_lists(messy, messy_counts, 5)
    width = indices.shape[-1]
    lists = mismatches(canonical[..., :width], indices) + mismatches(canonical_counts, counts) \
        + int((canonical[..., width:] != -1).sum())
    return "300 tokens causal, 4:2 heads, top-2 of pooled 64 x 64 block scores + sink + local; lists given " \
           "unsorted with repeats", [("lists", lists, 0)] + block_sparse_fwd_bwd(
               (q, k, v), indices, counts, dtype, gen, given=(messy, messy_counts))


def check_block_sparse_shards(dev, dtype, gen):
    q, k, v = block_sparse_inputs(gen, dev, dtype, seqlen=320)
    indices, counts = attnkit.strided_shard_indices(320, 4, stride=4, local_window=64, block_size=64, device=dev)
    block_mask = torch.zeros(1, 4, 5, 6, dtype=torch.bool, device=dev)
    block_mask.scatter_(-1, torch.where(indices >= 0, indices, 5).long(), True)
    again, again_counts = attnkit.lists_from_block_mask(block_mask[..., :5])
    lists = mismatches(again, indices) + mismatches(again_counts, counts)
    return "320 tokens causal, S2 shards (stride 4, local 64) over 4:2 heads, batch-1 lists", \
        [("lists", lists, 0)] + block_sparse_fwd_bwd((q, k, v), indices, counts, dtype, gen)


def check_vertical_slash(dev, dtype, gen):
    q, k, v = block_sparse_inputs(gen, dev, dtype)
    indices, counts = attnkit.vertical_slash_indices(q, k, last_q=32, vertical=10, slash=20, block_size=64)
    return "300 tokens causal, MInference lines (last 32 queries, 10 vertical, 20 slash) as 64-blocks", \
        block_sparse_fwd_bwd((q, k, v), indices, counts, dtype, gen)


def check_vertical_slash_columns(dev, dtype, gen):
    q, k, v = block_sparse_inputs(gen, dev, dtype)
    indices, counts, columns, column_counts = attnkit.vertical_slash_indices(
        q, k, last_q=32, vertical=10, slash=20, block_size=64, exact_columns=True)
    # The kernels' form of the columns: ascending, none inside a listed block.
    canonical, canonical_counts = attnkit.canonical_column_lists(columns, column_counts, indices, counts, 300, 64)
    listed = torch.zeros(*canonical.shape[:3], 5, dtype=torch.bool, device=dev)
    listed.scatter_(-1, torch.where(indices >= 0, indices, 0).long(), indices >= 0)
    kept = canonical >= 0
    inside = listed.gather(-1, torch.where(kept, canonical // 64, 0).long()) & kept
    lists = int(inside.sum()) + int((kept.sum(-1) != canonical_counts).sum())
    opts = dict(column_indices=columns, column_counts=column_counts)
    ref_opts = {name: t.cpu() for name, t in opts.items()}
    return "300 tokens causal, MInference lines with the 10 vertical ones as exact columns", [("lists", lists, 0)] + \
        fwd_bwd(lambda *x: attnkit.block_sparse_attention(*x, indices, counts, causal=True, return_lse=True, **opts),
                lambda *x: reference.block_sparse_attention(*x, indices.cpu(), counts.cpu(), causal=True, **ref_opts),
                (q, k, v), dtype, gen)


def check_block_sparse_varlen(dev, dtype, gen):
    lens = [130, 61, 200]
    cu = torch.tensor([0] + lens, device=dev).cumsum(0).int()
    q = randn(gen, sum(lens), 4, 32, dtype=dtype, device=dev).requires_grad_()
    k, v = (randn(gen, sum(lens), 2, 32, dtype=dtype, device=dev).requires_grad_() for _ in "kv")
    blocks = torch.arange(4, dtype=torch.int32, device=dev)
    indices = torch.stack([blocks, torch.zeros_like(blocks)], dim=-1).expand(3, 4, 4, 2)  # diagonal + first block
    counts = torch.full((3, 4, 4), 2, dtype=torch.int32, device=dev)
    return "3 packed sequences (130, 61, 200 tokens) causal, 4:2 heads, diagonal + first key block", fwd_bwd(
        lambda *x: attnkit.block_sparse_attention_varlen(*x, cu, cu, 200, 200, indices, counts, causal=True,
                                                         return_lse=True),
        lambda *x: reference.block_sparse_attention_varlen(*x, cu.cpu(), cu.cpu(), indices.cpu(), counts.cpu(),
                                                           causal=True),
        (q, k, v), dtype, gen)


def check_block_attention_map(dev, dtype, gen):
    q, k, _ = block_sparse_inputs(gen, dev, dtype, seqlen=200)
    got = attnkit.block_attention_map(q.detach(), k.detach(), block_size=64, causal=True)
    want = reference.block_attention_map(ref_input(q), ref_input(k), block_size=64, causal=True)
    return "200 tokens causal, 4:2 heads, 64 x 64 max-pooled softmax map", [("map", rel_err(got, want), FWD[dtype])]


def check_quantize(kv_format, group_size, dev, dtype, gen):
    x = (randn(gen, 300, 2, 64) * 3 + randn(gen, 300, 2, 1)).to(dtype=dtype, device=dev)  # off-centre rows
    got = attnkit.dequantize_kv(attnkit.quantize_kv(x, kv_format, group_size=group_size))
    data, scale, zero = reference.quantize_kv(x.cpu(), kv_format, group_size=group_size)
    ref = reference.dequantize_kv(data, scale, zero, kv_format, group_size=group_size)
    return f"(300, 2, 64), {'one scale per row' if group_size is None else f'groups of {group_size}'}; " \
           "dequantize_kv(quantize_kv(x))", [("values", rel_err(got, ref), FWD[torch.float32])]


def check_quantized_decode(kv_format, group_size, dev, dtype, gen):
    q, k, v = realistic_kv(gen, 1, 2048, 4, 128, dtype=dtype, device=dev)
    cache = attnkit.PagedKVCache(2048 // 16, 16, 4, 128, dtype=dtype, device=dev, kv_format=kv_format,
                                 group_size=group_size)
    cache.append(0, k[0, :256], v[0, :256])  # the prompt: sets the key offset
    for t in range(256, 260):
        cache.append([0], k[:, t], v[:, t])
    cache.append(0, k[0, 260:], v[0, 260:])
    lens, table = cache.cache_seqlens, cache.block_table
    out = attnkit.decode(q, cache.k_cache, cache.v_cache, lens, block_table=table)
    # The kernel dequantizes as dequantize_kv does: the reference on the stored values ...
    deq_k, deq_v = (ref_input(attnkit.dequantize_kv(c)) for c in (cache.k_cache, cache.v_cache))
    exact, _ = reference.decode(ref_input(q), deq_k, deq_v, lens.cpu(), block_table=table.cpu())
    # ... and the format's accuracy: the reference on the unquantized K/V.
    ref, _ = reference.decode(ref_input(q), ref_input(k), ref_input(v), lens.cpu())
    layout = f"group_size={group_size}, keys centred{' and rotated' if cache.rotate_keys else ''}"
    return f"PagedKVCache(kv_format={kv_format!r}, {layout}), 2048 K/V drawn like real ones, 16:4 heads, D 128", [
        ("out vs dequantized K/V", rel_err(out, exact), FWD[dtype]),
        ("vs unquantized", rel_err(out, ref), QUANT_DECODE[kv_format])]


# (printed name, the has_cuda_kernel names it needs for CUDA, check)
CHECKS = [
    ("attention", ("attention",), check_attention),
    ("attention_varlen", ("attention",), check_attention_varlen),
    ("decode contiguous", ("decode",), check_decode_contiguous),
    ("decode paged", ("decode",), check_decode_paged),
    ("attention_varlen paged prefill", ("attention",), check_paged_prefill),
    ("merge_attention_states", ("merge_attention_states",), check_merge),
    ("PagedKVCache.append", ("paged_cache_append", "decode"), check_paged_cache),
    ("page_scores", ("paged_cache_append", "page_scores"), check_page_scores),
    ("select_pages", ("paged_cache_append", "page_scores", "select_pages"), check_select_pages),
    ("sparse_decode", ("paged_cache_append", "page_scores", "select_pages", "sparse_decode"), check_sparse_decode),
    ("sparse_decode_tokens", ("paged_cache_append", "sparse_decode"), check_sparse_decode_tokens),
    ("streaming_page_indices", ("paged_cache_append", "sparse_decode"), check_streaming_page_indices),
    ("neighborhood_attention", ("neighborhood_attention",), check_neighborhood),
    ("block_sparse_attention pooled_block_scores block_topk_indices canonical_block_lists",
     ("block_sparse_attention",), check_block_sparse),
    ("block_sparse_attention strided_shard_indices lists_from_block_mask", ("block_sparse_attention",),
     check_block_sparse_shards),
    ("vertical_slash_indices", ("block_sparse_attention",), check_vertical_slash),
    ("vertical_slash_indices canonical_column_lists (exact columns)", ("block_sparse_attention",),
     check_vertical_slash_columns),
    ("block_sparse_attention_varlen", ("block_sparse_attention",), check_block_sparse_varlen),
    ("block_attention_map", ("attention",), check_block_attention_map),
    *[(f"quantize_kv {f}", ("quantize_kv", "dequantize_kv"), partial(check_quantize, f, g))
      for f, g in (("int8", None), ("int4", None), ("int4", 32), ("fp8_e4m3", None))],
    # int4 with groups of 32: one scale per row meets its bound on the docs' larger data but
    # not at every seed of this smaller one (docs/quantization.md).
    *[(f"decode {f} cache", ("paged_cache_append_quantized", "dequantize_kv", "decode"),
       partial(check_quantized_decode, f, g)) for f, g in (("int8", None), ("int4", 32))],
]


def format_measures(measures):
    """'what err, what err (bound b); ...': consecutive measures with the same bound share it;
    a measure over its bound is marked FAIL."""
    parts, groups = [], []
    for what, err, bound in measures:
        text = f"{what} {err} differ" if isinstance(err, int) else f"{what} {err:.1e}"
        if not err <= bound:
            text += " FAIL"
        if groups and groups[-1][0] == bound:
            groups[-1][1].append(text)
        else:
            groups.append((bound, [text]))
    for bound, texts in groups:
        parts.append(", ".join(texts) + (" (must be exact)" if bound == 0 else f" (bound {bound:.0e})"))
    return "; ".join(parts)


def check_all_ops(device, checks=CHECKS, out=print):
    """Runs every check on `device` ("cpu" or "cuda"; an op whose CUDA kernel this build lacks
    runs on the CPU), prints one line per op and returns the failures (an empty list when
    every error is within its bound)."""
    failures = []
    for name, kernels, check in checks:
        dev = device if device == "cpu" or all(attnkit.has_cuda_kernel(k) for k in kernels) else "cpu"
        head = f"{name:<24} [{dev}]"
        try:
            case, measures = check(dev, DTYPE[dev], torch.Generator().manual_seed(0))
        except Exception as err:  # a crash is a failure of that op; the others still run
            out(f"{head} FAILED: {type(err).__name__}: {err}")
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        out(f"{head} {case}: {format_measures(measures)}")
        failures += [f"{name}: {what} {err} > {bound}" for what, err, bound in measures if not err <= bound]
    return failures


def main():
    device = "cuda" if attnkit.cuda_available() else "cpu"
    print(f"attnkit {attnkit.__version__} on {device}; CUDA kernels built: "
          f"{[k for k, built in CUDA_KERNELS.items() if built]}")
    print("relative error ||out - ref|| / ||ref|| against the float64 reference (attnkit.reference):")
    failures = check_all_ops(device)
    if failures:
        print(f"\n{len(failures)} failure(s); no benchmark:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print(f"all {len(CHECKS)} checks within their bounds")
    print("\nquick benchmark (python -m attnkit.bench --quick):", flush=True)
    sys.exit(subprocess.call([sys.executable, "-m", "attnkit.bench", "--quick", "--device", device]))


if __name__ == "__main__":
    main()
