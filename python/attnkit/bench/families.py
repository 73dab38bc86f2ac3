"""The benchmark cases of each family: shapes, the attnkit calls, the peers, work counts
(FLOPs or bytes) and the error against attnkit.reference."""
import contextlib
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import reference

from .context_parallel import run_context_parallel
from .runner import Row, dtype_name, rel_err
from .timing import rotation

# ------------------------------------------------------------------------------------
# peers shared by the families


def _sdpa_backends(device):
    """SDPA peers: name -> context manager factory forcing the backend."""
    if device == "cpu":
        return {"sdpa_cpu": contextlib.nullcontext}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    out = {}
    for name, attr in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                       ("sdpa_cudnn", "CUDNN_ATTENTION")):
        backend = getattr(SDPBackend, attr, None)
        if backend is not None:
            out[name] = (lambda b: (lambda: sdpa_kernel(b)))(backend)
    return out


def _sdpa(q, k, v, causal, ctx):
    """torch SDPA on (batch, seq, heads, dim) tensors, as transposed views (no copy: the
    flash-attn kernels' own layout)."""
    kw = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    with ctx():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, **kw)
    return out.transpose(1, 2)


_FLEX = {}


def _flex():
    """torch.compile'd flex_attention (raises when FlexAttention is missing)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # One compile per shape, mask and grad mode: more than dynamo's default limit of 8,
        # past which flex_attention would silently run eagerly (and slowly).
        import torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        _FLEX["mask"] = create_block_mask
    return _FLEX["fn"], _FLEX["mask"]


def _grad_fn(forward, q, k, v, dout):
    def run():
        out = forward(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)
    return run


def _no_grad_fn(forward, q, k, v):
    def run():
        with torch.no_grad():
            return forward(q, k, v)
    return run


def _randn(shape, dtype, device, requires_grad=False):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def _ref_device(r):
    return r.device  # float64 reference on the GPU when benchmarking CUDA (fast), else CPU


def _on_ref(fn, r):
    """Runs fn(device) on the GPU when benchmarking CUDA, falling back to the CPU."""
    dev = _ref_device(r)
    if dev == "cuda":
        try:
            return fn("cuda")
        except RuntimeError:  # out of memory, ...
            torch.cuda.empty_cache()
    return fn("cpu")


def _kernel_missing(r, op):
    if r.device == "cuda" and not attnkit.has_cuda_kernel(op):
        return f"attnkit.{op} has no CUDA kernel in this build (attnkit.has_cuda_kernel({op!r}) is False)"
    return None


# ------------------------------------------------------------------------------------
# prefill


def _not_run(r, case_id, op):
    """True (after recording why, where it is a skip) when case_id is not selected, op has no
    kernel on the device, or the time budget is spent."""
    if not r.selected(case_id):
        return True
    missing = _kernel_missing(r, op) or ("time budget (--budget-s) spent" if r.over_budget() else None)
    if missing:
        r.skip(case_id, missing)
    return bool(missing)


def prefill_configs(device, quick):
    if device == "cpu":
        if quick:
            return [dict(B=1, S=256, H=4, Hkv=4, D=64, dtype=torch.float32)]
        return [dict(B=1, S=S, H=8, Hkv=8, D=64, dtype=dt) for dt in (torch.float32, torch.bfloat16)
                for S in (512, 1024)]
    # TARGETS.md: bf16, head_dim 128, 16k tokens per batch, seqlen 512..16k (16 heads = 2048
    # hidden); then head_dim 64 (32 heads) and 256 (8 heads) at the same hidden size, after the
    # head_dim 128 rows so that a --budget-s run keeps those first.
    seqs = (2048, 8192) if quick else (512, 2048, 8192, 16384)
    other_seqs = (8192,) if quick else (2048, 8192)
    cfgs = [dict(B=16384 // S, S=S, H=16, Hkv=16, D=128, dtype=torch.bfloat16) for S in seqs]
    for D, H in ((64, 32), (256, 8)):
        cfgs += [dict(B=16384 // S, S=S, H=H, Hkv=H, D=D, dtype=torch.bfloat16) for S in other_seqs]
    return cfgs


def _prefill_shape_str(c):
    return f"B{c['B']} S{c['S']} Hq{c['H']} Hkv{c['Hkv']} D{c['D']}"


# Above these element counts of the (batch, heads, seqlen_q, seqlen_k) score matrix the
# float64 reference runs on a slice (forward) or on a smaller same-config shape (backward).
_REF_FWD_MAX = 1 << 27
_REF_BWD_MAX = 1 << 24


def _prefill_err_fwd(r, c, causal, q, k, v):
    B, S, H, Hkv = c["B"], c["S"], c["H"], c["Hkv"]
    with torch.no_grad():
        out = attnkit.attention(q, k, v, causal=causal)
    if B * H * S * S <= _REF_FWD_MAX:
        sl_q = sl_kv = sl_out = (slice(None),)
        err_on = "all"
    else:
        g = H // Hkv
        nq = min(S, 1024)
        # Bottom-right causal alignment: the last nq queries against all keys give exactly
        # the last nq rows of the full result.
        sl_q, sl_kv = (slice(0, 1), slice(S - nq, S), slice(0, g)), (slice(0, 1), slice(None), slice(0, 1))
        sl_out = sl_q
        err_on = f"batch 0, kv head 0 (q heads 0-{g - 1}), last {nq} queries"

    def run(dev):
        qs, ks, vs = (t.detach()[sl].to(dev, torch.float64) for t, sl in ((q, sl_q), (k, sl_kv), (v, sl_kv)))
        ref, _ = reference.attention(qs, ks, vs, causal=causal)
        return rel_err(out[sl_out], ref)
    return _on_ref(run, r), err_on


def _prefill_err_bwd(r, c, causal, q, k, v, dout):
    B, S, H, Hkv, D = c["B"], c["S"], c["H"], c["Hkv"], c["D"]
    err_on = "all (out, dq, dk, dv)"
    if B * H * S * S > _REF_BWD_MAX:
        g, S2 = H // Hkv, min(S, 2048)
        q = _randn((1, S2, g, D), c["dtype"], r.device, True)
        k = _randn((1, S2, 1, D), c["dtype"], r.device, True)
        v = _randn((1, S2, 1, D), c["dtype"], r.device, True)
        dout = _randn((1, S2, g, D), c["dtype"], r.device)
        err_on = f"fresh inputs B1 S{S2} Hq{g} Hkv1 (same dtype, head_dim, causal); out, dq, dk, dv"
    out = attnkit.attention(q, k, v, causal=causal)
    got = (out.detach(),) + torch.autograd.grad(out, (q, k, v), dout)

    def run(dev):
        qd, kd, vd = (t.detach().to(dev, torch.float64).requires_grad_() for t in (q, k, v))
        ref, _ = reference.attention(qd, kd, vd, causal=causal)
        refs = (ref.detach(),) + torch.autograd.grad(ref, (qd, kd, vd), dout.to(dev, torch.float64))
        return max(rel_err(a, b) for a, b in zip(got, refs))
    return _on_ref(run, r), err_on


def run_prefill(r):
    flex_budget_s = 40.0 if r.quick else 90.0  # compile time of flex per head_dim
    for c in prefill_configs(r.device, r.quick):
        shape_str = _prefill_shape_str(c)
        dt = dtype_name(c["dtype"])
        cases = [(d, causal) for d in ("fwd", "fwd_bwd") for causal in (False, True)]
        ids = {}
        for d, causal in cases:
            name = d + ("_causal" if causal else "")
            ids[(d, causal)] = (name, f"prefill/{name}/{dt}/{shape_str}")
        todo = [key for key in cases if r.selected(ids[key][1])]
        if not todo:
            continue
        missing = _kernel_missing(r, "attention")
        if missing:
            for key in todo:
                r.skip(ids[key][1], missing)
            continue
        B, S, H, Hkv, D, dtype = c["B"], c["S"], c["H"], c["Hkv"], c["D"], c["dtype"]
        set_bytes = (2 * B * S * H * D + 2 * B * S * Hkv * D) * torch.empty(0, dtype=dtype).element_size()
        nbuf = rotation(r.device, set_bytes, max_sets=4)
        bufs = [(_randn((B, S, H, D), dtype, r.device, True), _randn((B, S, Hkv, D), dtype, r.device, True),
                 _randn((B, S, Hkv, D), dtype, r.device, True), _randn((B, S, H, D), dtype, r.device))
                for _ in range(nbuf)]
        peers = dict(_sdpa_backends(r.device))
        for d, causal in todo:
            name, case_id = ids[(d, causal)]
            if r.over_budget():
                r.skip(case_id, "time budget (--budget-s) spent")
                continue
            print(f"{case_id} ({nbuf} buffer sets)", flush=True)

            def fns_for(forward):
                if d == "fwd":
                    return [_no_grad_fn(forward, q, k, v) for q, k, v, _ in bufs]
                return [_grad_fn(forward, q, k, v, dout) for q, k, v, dout in bufs]

            ak = r.time_attnkit(case_id, fns_for(lambda q, k, v: attnkit.attention(q, k, v, causal=causal)))
            if ak is None:
                continue
            stats = {}
            for peer, ctx in peers.items():
                stats[peer], _ = r.time_peer(case_id, peer, lambda ctx=ctx: fns_for(
                    lambda q, k, v: _sdpa(q, k, v, causal, ctx)))
            if r.device == "cuda":
                if D in _FLEX.get("failed", ()):
                    r.note_once(f"flex-failed-{D}", f"flex skipped for head_dim {D} from here on: it failed once "
                                                    f"at that head_dim in this run")
                elif _FLEX.setdefault("spent", {}).get(D, 0.0) > flex_budget_s:
                    r.note_once(f"flex-budget-{D}", f"flex skipped for head_dim {D} from here on: its compile time "
                                                    f"at that head_dim passed {flex_budget_s:.0f} s")
                else:
                    def make_flex():
                        fa, create_block_mask = _flex()
                        bm = None
                        if causal:
                            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=r.device)
                        kw = {"enable_gqa": True} if H != Hkv else {}
                        fwd = (lambda q, k, v: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  block_mask=bm, **kw).transpose(1, 2))
                        return fns_for(fwd)
                    t_flex = time.perf_counter()
                    stats["flex"], first_s = r.time_peer(case_id, "flex", make_flex)
                    if stats["flex"] is None:  # a failed compile is not retried at every shape of that head_dim
                        _FLEX.setdefault("failed", set()).add(D)
                        first_s = time.perf_counter() - t_flex
                    _FLEX["spent"][D] = _FLEX["spent"].get(D, 0.0) + first_s
            flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0) * (3.5 if d == "fwd_bwd" else 1.0)
            tflops = flops / (ak.median * 1e-3) / 1e12
            q, k, v, dout = bufs[0]
            try:
                if d == "fwd":
                    err, err_on = _prefill_err_fwd(r, c, causal, q, k, v)
                else:
                    err, err_on = _prefill_err_bwd(r, c, causal, q, k, v, dout)
            except Exception as e:  # keep the timing; say why there is no error figure
                err, err_on = None, f"reference failed: {type(e).__name__}: {e}"[:200]
            shape = {"batch": B, "seqlen_q": S, "seqlen_k": S, "heads_q": H, "heads_kv": Hkv, "head_dim": D,
                     "causal": causal, "err_on": err_on}
            r.add_row(Row("prefill", name, dt, shape, ak, tflops=tflops,
                          pct_of_ceiling=100.0 * tflops / r.ceilings.matmul_tflops, max_rel_err=err,
                          shape_str=shape_str, id=case_id), stats)
        del bufs
        r.free()


# ------------------------------------------------------------------------------------
# decode

PAGE = 16


def decode_configs(device, quick):
    if device == "cpu":
        if quick:
            return [dict(B=1, ctx=4096, dtype=torch.float32)]
        return [dict(B=1, ctx=ctx, dtype=dt) for dt in (torch.float32, torch.bfloat16) for ctx in (8192, 32768)]
    if quick:
        shapes = [(1, 8192), (1, 131072), (32, 8192)]
    else:
        shapes = [(1, 8192), (1, 32768), (1, 131072), (1, 524288), (8, 8192), (8, 32768), (32, 8192),
                  (32, 32768), (64, 8192), (64, 32768)]
    return [dict(B=b, ctx=ctx, dtype=torch.bfloat16) for b, ctx in shapes]


def _decode_peers(contig, lens, Hq, Hkv):
    """CUDA decode peers on the contiguous cache, name -> callables factory (each raises
    when its library is missing, and the runner skips it): FlexAttention (its decoding
    path for one query), flash-attn's flash_attn_with_kvcache, FlashInfer's single-request
    decode (batch 1 only)."""
    def flex():
        fa, _ = _flex()
        kw = {"enable_gqa": True} if Hq != Hkv else {}
        return [(lambda q=q, k=k, v=v: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw))
                for q, k, v in contig]

    def flash_attn():
        from flash_attn import flash_attn_with_kvcache
        return [(lambda q=q, k=k, v=v: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)) for q, k, v in contig]

    def flashinfer():
        import flashinfer
        if contig[0][0].shape[0] != 1:
            raise ValueError("single-request decode peer: batch 1 only")
        return [(lambda q=q, k=k, v=v: flashinfer.single_decode_with_kv_cache(q[0, 0], k[0], v[0]))
                for q, k, v in contig]

    return {"flex": flex, "flash_attn": flash_attn, "flashinfer": flashinfer}


_REF_DECODE_MAX = 1 << 25  # elements of one cache above which the reference runs on one kv head


def _decode_err(r, c, q, kc, vc, lens, bt, out):
    B, Hq, Hkv = c["B"], c["Hq"], c["Hkv"]
    full = B * c["ctx"] * Hkv * c["D"] <= _REF_DECODE_MAX
    g = Hq // Hkv

    def run(dev):
        lens_d = lens.to(dev)
        if full:
            bt_d = None if bt is None else bt.to(dev)
            ref, _ = reference.decode(q.to(dev, torch.float64), kc.to(dev, torch.float64),
                                      vc.to(dev, torch.float64), lens_d, block_table=bt_d)
            return rel_err(out, ref)
        qs = q[0:1, :, 0:g].to(dev, torch.float64)
        if bt is None:
            ks, vs, bts = kc[0:1, :, 0:1], vc[0:1, :, 0:1], None
        else:  # batch 0's pages only, compacted, still read through a block table
            n = (int(lens[0]) + PAGE - 1) // PAGE
            pages = bt[0, :n].long()
            ks, vs = kc[pages][:, :, 0:1], vc[pages][:, :, 0:1]
            bts = torch.arange(n, dtype=torch.int32, device=dev).view(1, n)
        ref, _ = reference.decode(qs, ks.to(dev, torch.float64), vs.to(dev, torch.float64), lens_d[0:1],
                                  block_table=bts)
        return rel_err(out[0:1, :, 0:g], ref)
    err = _on_ref(run, r)
    return err, ("all" if full else f"batch 0, kv head 0 (q heads 0-{g - 1})")


def run_decode(r):
    Hq, Hkv, D = 32, 8, 128
    for c in decode_configs(r.device, r.quick):
        c = dict(c, Hq=Hq, Hkv=Hkv, D=D)
        B, ctx, dtype = c["B"], c["ctx"], c["dtype"]
        dt = dtype_name(dtype)
        shape_str = f"B{B} ctx{ctx} Hq{Hq} Hkv{Hkv} D{D}"
        id_contig = f"decode/contiguous/{dt}/{shape_str}"
        id_paged = f"decode/paged{PAGE}/{dt}/{shape_str} page{PAGE}"
        todo = [i for i in (id_contig, id_paged) if r.selected(i)]
        if not todo:
            continue
        missing = _kernel_missing(r, "decode")
        if missing:
            for i in todo:
                r.skip(i, missing)
            continue
        if r.over_budget():
            for i in todo:
                r.skip(i, "time budget (--budget-s) spent")
            continue
        elt = torch.empty(0, dtype=dtype).element_size()
        kv_bytes = 2 * B * ctx * Hkv * D * elt
        nbuf = rotation(r.device, kv_bytes)
        dev = r.device
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        npages = B * ctx // PAGE
        try:
            contig = [(_randn((B, 1, Hq, D), dtype, dev), _randn((B, ctx, Hkv, D), dtype, dev),
                       _randn((B, ctx, Hkv, D), dtype, dev)) for _ in range(nbuf)]
            paged = []
            if id_paged in todo:
                for _ in range(nbuf):
                    bt = torch.randperm(npages, device=dev).to(torch.int32).view(B, ctx // PAGE)
                    paged.append((_randn((B, 1, Hq, D), dtype, dev), _randn((npages, PAGE, Hkv, D), dtype, dev),
                                  _randn((npages, PAGE, Hkv, D), dtype, dev), bt))
        except RuntimeError as err:  # out of memory
            for i in todo:
                r.skip(i, f"inputs do not fit: {err}"[:200])
            contig = paged = None
            r.free()
            continue
        graph = r.device == "cuda"
        gbps = lambda ms: kv_bytes / (ms * 1e-3) / 1e9  # noqa: E731
        shape = {"batch": B, "seqlen_q": 1, "context": ctx, "heads_q": Hq, "heads_kv": Hkv, "head_dim": D,
                 "kv_bytes": kv_bytes}

        print(f"{id_contig} ({nbuf} buffer sets, {kv_bytes / 2**20:.0f} MiB of KV each)", flush=True)
        ak_contig = r.time_attnkit(id_contig, [lambda q=q, k=k, v=v: attnkit.decode(q, k, v, lens)
                                               for q, k, v in contig], graph=graph)
        peer_stats = {}
        for peer, pctx in _sdpa_backends(r.device).items():
            peer_stats[peer], _ = r.time_peer(id_contig, peer, lambda pctx=pctx: [
                (lambda q=q, k=k, v=v: _sdpa(q, k, v, False, pctx)) for q, k, v in contig], graph=graph)
        if r.device == "cuda":
            for peer, make in _decode_peers(contig, lens, Hq, Hkv).items():
                peer_stats[peer], _ = r.time_peer(id_contig, peer, make)
        if ak_contig is not None and id_contig in todo:
            q, k, v = contig[0]
            out = attnkit.decode(q, k, v, lens)
            err, err_on = _decode_err(r, c, q, k, v, lens, None, out)
            r.add_row(Row("decode", "contiguous", dt, dict(shape, err_on=err_on), ak_contig,
                          gbps=gbps(ak_contig.median),
                          pct_of_ceiling=100.0 * gbps(ak_contig.median) / r.ceilings.copy_gbps,
                          max_rel_err=err, shape_str=shape_str, id=id_contig), peer_stats)
        if id_paged in todo:
            print(f"{id_paged} ({nbuf} buffer sets; peers timed on the contiguous cache)", flush=True)
            ak = r.time_attnkit(id_paged, [lambda q=q, k=k, v=v, bt=bt: attnkit.decode(q, k, v, lens, block_table=bt)
                                           for q, k, v, bt in paged], graph=graph)
            if ak is not None:
                q, k, v, bt = paged[0]
                out = attnkit.decode(q, k, v, lens, block_table=bt)
                err, err_on = _decode_err(r, c, q, k, v, lens, bt, out)
                stats = dict(peer_stats, contiguous_decode=ak_contig)
                r.add_row(Row("decode", f"paged{PAGE}", dt, dict(shape, page_size=PAGE, err_on=err_on), ak,
                              gbps=gbps(ak.median), pct_of_ceiling=100.0 * gbps(ak.median) / r.ceilings.copy_gbps,
                              max_rel_err=err, shape_str=f"{shape_str} page{PAGE}", id=id_paged), stats)
        del contig, paged
        r.free()


# ------------------------------------------------------------------------------------
# sparse: Quest-style page selection and sparse decode against dense decode

SPARSE_FRACTION = 16  # select 1/16 of the pages (sink 1 + recent 1 + top-k)


def sparse_configs(device, quick):
    if device == "cpu":
        return [dict(B=1, ctx=8192 if quick else 32768, dtype=torch.float32)]
    shapes = [(1, 131072)] if quick else [(1, 32768), (1, 131072), (8, 32768), (1, 524288)]
    return [dict(B=b, ctx=ctx, dtype=torch.bfloat16) for b, ctx in shapes]


def _sparse_err(r, q, k, v, lens, bt, pages, out, g):
    """Error of sparse_decode on batch 0, kv head 0 (its q heads), against the float64
    reference; the cache of that sequence and head only is gathered."""
    def run(dev):
        n = (int(lens[0]) + PAGE - 1) // PAGE
        ks, vs = k[bt[0, :n].long()][:, :, 0:1], v[bt[0, :n].long()][:, :, 0:1]
        ref, _ = reference.sparse_decode(q[0:1, :, 0:g].to(dev, torch.float64), ks.to(dev, torch.float64),
                                         vs.to(dev, torch.float64), lens[0:1].to(dev),
                                         torch.arange(n, dtype=torch.int32, device=dev).view(1, n),
                                         pages[0:1, 0:1].to(dev), tokens_per_index=PAGE)
        return rel_err(out[0:1, :, 0:g], ref)
    return _on_ref(run, r), f"batch 0, kv head 0 (q heads 0-{g - 1})"


def _flex_sparse(q, k_contig, v_contig, pages, Hq, Hkv, ctx, device):
    """FlexAttention over the contiguous copy of the cache with the block mask that keeps
    exactly the selected pages (kv blocks of PAGE tokens) per (sequence, kv head)."""
    fa, create_block_mask = _flex()
    B, g = q.shape[0], Hq // Hkv
    selected = torch.zeros(B, Hkv, ctx // PAGE, dtype=torch.bool, device=device)
    selected.scatter_(2, pages.clamp(min=0).long(), pages >= 0)
    bm = create_block_mask(lambda b, h, qi, ki: selected[b, h // g, ki // PAGE], B, Hq, 1, ctx, device=device,
                           BLOCK_SIZE=(1, PAGE))
    kw = {"enable_gqa": True} if Hq != Hkv else {}
    return [lambda: fa(q.transpose(1, 2), k_contig.transpose(1, 2), v_contig.transpose(1, 2), block_mask=bm, **kw)]


def _selection(r, q, key_min, key_max, bt, lens, keep):
    """The pipeline's selection (page_scores + select_pages) where both run on this device;
    else `keep` random pages per (sequence, kv head), sorted, as the same amount of work."""
    if _kernel_missing(r, "page_scores") is None and _kernel_missing(r, "select_pages") is None:
        scores = attnkit.page_scores(q, key_min, key_max, bt, lens, page_size=PAGE)
        return attnkit.select_pages(scores, keep - 2, sink_pages=1, recent_pages=1)
    B, Hkv, npages = q.shape[0], key_min.shape[1], bt.shape[1]
    ranks = torch.rand(B, Hkv, npages, device=q.device).argsort(dim=-1)[..., :keep]
    return ranks.sort(dim=-1).values.to(torch.int32).contiguous()


def run_sparse(r):
    """Rows: sparse_decode alone (GB/s of the selected K/V, vs dense attnkit.decode on the
    same cache and FlexAttention with the equivalent block mask), and the whole pipeline
    page_scores + select_pages + sparse_decode (vs dense attnkit.decode)."""
    Hq, Hkv, D = 32, 8, 128
    g = Hq // Hkv
    for c in sparse_configs(r.device, r.quick):
        B, ctx, dtype = c["B"], c["ctx"], c["dtype"]
        dt = dtype_name(dtype)
        npages = ctx // PAGE
        keep = npages // SPARSE_FRACTION
        shape_str = f"B{B} ctx{ctx} Hq{Hq} Hkv{Hkv} D{D} page{PAGE} keep1/{SPARSE_FRACTION}"
        id_decode = f"sparse/sparse_decode/{dt}/{shape_str}"
        id_pipe = f"sparse/pipeline/{dt}/{shape_str}"
        todo = [i for i in (id_decode, id_pipe) if r.selected(i)]
        if not todo:
            continue
        missing = _kernel_missing(r, "sparse_decode")
        if missing or r.over_budget():
            for i in todo:
                r.skip(i, missing or "time budget (--budget-s) spent")
            continue
        dev = r.device
        elt = torch.empty(0, dtype=dtype).element_size()
        try:
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            bt = torch.randperm(B * npages, device=dev).to(torch.int32).view(B, npages)
            q = _randn((B, 1, Hq, D), dtype, dev)
            k = _randn((B * npages, PAGE, Hkv, D), dtype, dev)
            v = _randn((B * npages, PAGE, Hkv, D), dtype, dev)
            kf = k.float()
            key_min = kf.amin(dim=1).contiguous()
            key_max = kf.amax(dim=1).contiguous()
            del kf
        except RuntimeError as err:  # out of memory
            for i in todo:
                r.skip(i, f"inputs do not fit: {err}"[:200])
            r.free()
            continue
        pages = _selection(r, q, key_min, key_max, bt, lens, keep)
        graph = dev == "cuda"
        sel_bytes = 2 * B * Hkv * keep * PAGE * D * elt
        dense_bytes = 2 * B * ctx * Hkv * D * elt
        shape = {"batch": B, "seqlen_q": 1, "context": ctx, "heads_q": Hq, "heads_kv": Hkv, "head_dim": D,
                 "page_size": PAGE, "pages_kept": keep, "selected_kv_bytes": sel_bytes, "dense_kv_bytes": dense_bytes}
        print(f"{id_decode} ({sel_bytes / 2**20:.0f} of {dense_bytes / 2**20:.0f} MiB of KV selected)", flush=True)
        dense = r.time_attnkit(id_decode + " [dense]", [lambda: attnkit.decode(q, k, v, lens, block_table=bt)],
                               graph=graph)
        ak = r.time_attnkit(id_decode, [lambda: attnkit.sparse_decode(q, k, v, lens, bt, pages)], graph=graph)
        gbps = lambda ms: sel_bytes / (ms * 1e-3) / 1e9  # noqa: E731
        if ak is not None and id_decode in todo:
            peers = {"dense_decode": dense}
            if dev == "cuda":
                contig = (k[bt.view(-1).long()].view(B, ctx, Hkv, D), v[bt.view(-1).long()].view(B, ctx, Hkv, D))
                peers["flex"], _ = r.time_peer(id_decode, "flex", lambda: _flex_sparse(q, *contig, pages, Hq, Hkv,
                                                                                      ctx, dev))
                del contig
            out = attnkit.sparse_decode(q, k, v, lens, bt, pages)
            err, err_on = _sparse_err(r, q, k, v, lens, bt, pages, out, g)
            r.add_row(Row("sparse", "sparse_decode", dt, dict(shape, err_on=err_on), ak, gbps=gbps(ak.median),
                          pct_of_ceiling=100.0 * gbps(ak.median) / r.ceilings.copy_gbps, max_rel_err=err,
                          shape_str=shape_str, id=id_decode), peers)
        if id_pipe in todo:
            missing = _kernel_missing(r, "page_scores") or _kernel_missing(r, "select_pages")
            if missing:
                r.skip(id_pipe, missing)
            else:
                def pipeline():
                    scores = attnkit.page_scores(q, key_min, key_max, bt, lens, page_size=PAGE)
                    chosen = attnkit.select_pages(scores, keep - 2, sink_pages=1, recent_pages=1)
                    return attnkit.sparse_decode(q, k, v, lens, bt, chosen)
                ak_pipe = r.time_attnkit(id_pipe, [pipeline], graph=graph)
                if ak_pipe is not None:
                    out = pipeline()
                    err, err_on = _sparse_err(r, q, k, v, lens, bt, pages, out, g)
                    r.add_row(Row("sparse", "pipeline", dt, dict(shape, err_on=err_on), ak_pipe,
                                  gbps=gbps(ak_pipe.median),
                                  pct_of_ceiling=100.0 * gbps(ak_pipe.median) / r.ceilings.copy_gbps,
                                  max_rel_err=err, shape_str=shape_str, id=id_pipe), {"dense_decode": dense})
        del q, k, v, key_min, key_max
        r.free()


# ------------------------------------------------------------------------------------
# quant: decode on quantized pages (docs/quantization.md) against bf16 decode

# (kv_format, group_size, rotated keys): int4 per row with rotated keys is PagedKVCache's
# default int4 (the rotation costs decode a transform of each query row).
QUANT_FORMATS = [("int8", None, False), ("fp8_e4m3", None, False), ("int4", None, False), ("int4", None, True),
                 ("int4", 32, False)]


def quant_configs(device, quick):
    if device == "cpu":
        return [dict(B=1, ctx=8192 if quick else 32768)]
    shapes = [(1, 131072)] if quick else [(1, 32768), (1, 131072), (8, 32768), (32, 32768)]
    return [dict(B=b, ctx=ctx) for b, ctx in shapes]


def _quant_err(r, q, k, v, lens, bt, out, g):
    """Error of decode on the quantized pages, batch 0 and kv head 0 (its q heads), against
    the float64 reference on the unquantized K/V of that sequence and head."""
    def run(dev):
        n = (int(lens[0]) + PAGE - 1) // PAGE
        ks, vs = k[bt[0, :n].long()][:, :, 0:1], v[bt[0, :n].long()][:, :, 0:1]
        ref, _ = reference.decode(q[0:1, :, 0:g].to(dev, torch.float64), ks.to(dev, torch.float64),
                                  vs.to(dev, torch.float64), lens[0:1].to(dev),
                                  block_table=torch.arange(n, dtype=torch.int32, device=dev).view(1, n))
        return rel_err(out[0:1, :, 0:g], ref)
    return _on_ref(run, r), f"batch 0, kv head 0 (q heads 0-{g - 1}), vs unquantized K/V"


def run_quant(r):
    """Rows: attnkit.decode reading int8 / fp8 / int4 pages (GB/s of the quantized bytes read),
    against bf16 attnkit.decode on the same K/V (peer "bf16_decode"); the shape dict carries
    the bytes per token of each and the bytes saved."""
    Hq, Hkv, D = 32, 8, 128
    dtype = torch.bfloat16 if r.device == "cuda" else torch.float32
    dt = dtype_name(dtype)
    for c in quant_configs(r.device, r.quick):
        B, ctx = c["B"], c["ctx"]
        npages = B * ctx // PAGE
        shape_str = f"B{B} ctx{ctx} Hq{Hq} Hkv{Hkv} D{D} page{PAGE}"
        ids = [f"quant/decode_{f}{'_g' + str(gs) if gs else ''}{'_rot' if rot else ''}/{dt}/{shape_str}"
               for f, gs, rot in QUANT_FORMATS]
        todo = [i for i in ids if r.selected(i)]
        if not todo:
            continue
        missing = _kernel_missing(r, "decode") or _kernel_missing(r, "quantize_kv")
        if missing or r.over_budget():
            for i in todo:
                r.skip(i, missing or "time budget (--budget-s) spent")
            continue
        dev = r.device
        graph = dev == "cuda"
        try:
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            bt = torch.randperm(npages, device=dev).to(torch.int32).view(B, ctx // PAGE)
            q = _randn((B, 1, Hq, D), dtype, dev)
            k = _randn((npages, PAGE, Hkv, D), dtype, dev)
            v = _randn((npages, PAGE, Hkv, D), dtype, dev)
        except RuntimeError as err:  # out of memory
            for i in todo:
                r.skip(i, f"inputs do not fit: {err}"[:200])
            r.free()
            continue
        plain_bytes = 2 * Hkv * D * k.element_size()  # K and V per token
        base = r.time_attnkit(f"quant/{dt}/{shape_str} [bf16_decode]",
                              [lambda: attnkit.decode(q, k, v, lens, block_table=bt)], graph=graph)
        for (fmt, gs, rot), case_id in zip(QUANT_FORMATS, ids):
            if case_id not in todo:
                continue
            qk = attnkit.quantize_kv(k, fmt, group_size=gs, rotate=rot)
            qv = attnkit.quantize_kv(v, fmt, group_size=gs)
            token_bytes = 2 * Hkv * sum(t[0, 0, 0].numel() * t.element_size() for t in qk[:3] if t is not None)
            print(f"{case_id} ({token_bytes} bytes per token vs {plain_bytes})", flush=True)
            ak = r.time_attnkit(case_id, [lambda: attnkit.decode(q, qk, qv, lens, block_table=bt)], graph=graph)
            if ak is not None:
                out = attnkit.decode(q, qk, qv, lens, block_table=bt)
                err, err_on = _quant_err(r, q, k, v, lens, bt, out, Hq // Hkv)
                gbps = B * ctx * token_bytes / (ak.median * 1e-3) / 1e9
                shape = {"batch": B, "seqlen_q": 1, "context": ctx, "heads_q": Hq, "heads_kv": Hkv, "head_dim": D,
                         "page_size": PAGE, "kv_format": fmt, "group_size": gs, "rotated_keys": rot,
                         "bytes_per_token": token_bytes,
                         "peer_bytes_per_token": plain_bytes, "bytes_saved_per_token": plain_bytes - token_bytes,
                         "err_on": err_on}
                r.add_row(Row("quant", case_id.split("/")[1], dt, shape, ak, gbps=gbps,
                              pct_of_ceiling=100.0 * gbps / r.ceilings.copy_gbps, max_rel_err=err,
                              shape_str=shape_str, id=case_id), {"bf16_decode": base})
            del qk, qv
        del q, k, v
        r.free()


# ------------------------------------------------------------------------------------
# merge_attention_states


def merge_configs(device, quick):
    if device == "cpu":
        if quick:
            return [(1, 1024, 32, 128, torch.float32)]
        return [(64, 1, 32, 128, torch.float32), (4, 1024, 32, 128, torch.float32),
                (4, 1024, 32, 128, torch.bfloat16)]
    if quick:
        return [(4, 4096, 32, 128, torch.bfloat16)]
    return [(64, 1, 32, 128, torch.bfloat16), (4, 4096, 32, 128, torch.bfloat16),
            (4, 4096, 32, 128, torch.float16)]


def torch_merge(out_a, lse_a, out_b, lse_b):
    """The plain torch peer: the same formula in eager torch ops, fp32 math."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).transpose(-1, -2).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).transpose(-1, -2).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse


def run_merge(r):
    for B, S, H, D, dtype in merge_configs(r.device, r.quick):
        dt = dtype_name(dtype)
        shape_str = f"B{B} S{S} H{H} D{D}"
        case_id = f"merge/merge/{dt}/{shape_str}"
        if _not_run(r, case_id, "merge_attention_states"):
            continue
        elt = torch.empty(0, dtype=dtype).element_size()
        n_out, n_lse = B * S * H * D, B * H * S
        nbytes = 3 * n_out * elt + 3 * n_lse * 4  # read 2 outs + 2 lses, write 1 + 1
        nbuf = rotation(r.device, nbytes)
        dev = r.device
        bufs = [(_randn((B, S, H, D), dtype, dev), _randn((B, H, S), torch.float32, dev),
                 _randn((B, S, H, D), dtype, dev), _randn((B, H, S), torch.float32, dev)) for _ in range(nbuf)]
        print(f"{case_id} ({nbuf} buffer sets)", flush=True)
        graph = r.device == "cuda"
        ak = r.time_attnkit(case_id, [lambda t=t: attnkit.merge_attention_states(*t) for t in bufs], graph=graph)
        if ak is None:
            continue
        st, _ = r.time_peer(case_id, "torch_merge", lambda: [lambda t=t: torch_merge(*t) for t in bufs],
                            graph=graph)
        oa, la, ob, lb = bufs[0]
        out, lse = attnkit.merge_attention_states(oa, la, ob, lb)

        def run(dev):
            ref, ref_lse = reference.merge_attention_states(*(t.to(dev, torch.float64) for t in bufs[0]))
            return max(rel_err(out, ref), rel_err(lse, ref_lse))
        err = _on_ref(run, r)
        gbps = nbytes / (ak.median * 1e-3) / 1e9
        shape = {"batch": B, "seqlen": S, "heads": H, "head_dim": D, "bytes": nbytes, "err_on": "all (out, lse)"}
        r.add_row(Row("merge", "merge", dt, shape, ak, gbps=gbps, pct_of_ceiling=100.0 * gbps / r.ceilings.copy_gbps,
                      max_rel_err=err, shape_str=shape_str, id=case_id), {"torch_merge": st})
        del bufs
        r.free()


# ------------------------------------------------------------------------------------
# neighborhood attention (forward, and forward + backward)


def neighborhood_configs(device, quick):
    """(name, batch, spatial, heads, head_dim, kernel_size, dilation, stride, is_causal); the
    issue's shapes on CUDA, small ones on the CPU."""
    if device == "cpu":
        cfgs = [("1d", 1, (2048,), 4, 64, 129, 1, 1, False), ("2d", 1, (32, 32), 4, 64, 7, 1, 1, False)]
        return cfgs[:1] if quick else cfgs
    cfgs = []
    for D in (128, 64):
        H = 2048 // (8 * D)  # same hidden size for both head dims
        cfgs += [("1d", 4, (32768,), H, D, 2049, 1, 1, False),
                 ("2d", 4, (128, 128), H, D, 13, 1, 1, False),
                 ("2d_dilated", 16, (64, 64), H, D, 13, 2, 1, False),
                 ("3d", 1, (16, 32, 32), H, D, 7, 1, 1, False),
                 ("3d_strided", 1, (16, 32, 32), H, D, 7, 1, 2, False)]
    return cfgs[:2] if quick else cfgs


# The CUDA neighborhood kernels' tiles (csrc/cuda/neighborhood/fwd.cuh): kBlockM x kBlockN
# consecutive tokens; the CPU kernel works row by row and is compared with the same tiles.
_NA_TILE = (64, 64)


def _na_axis_masks(spatial, ks, dil, st, causal, device):
    return [reference.neighborhood_axis_mask(*a).to(device) for a in zip(spatial, ks, dil, st, causal)]


def _na_mask_rows(masks, spatial, rows, device):
    """Rows `rows` (flattened query tokens) of the N-D mask, bool (len(rows), tokens)."""
    keys = torch.arange(int(torch.tensor(spatial).prod()), device=device)
    out = torch.ones(len(rows), len(keys), dtype=torch.bool, device=device)
    q_rest, k_rest = rows.clone(), keys.clone()
    for m, n in zip(reversed(masks), reversed(spatial)):
        out &= m[(q_rest % n)[:, None], (k_rest % n)[None, :]]
        q_rest, k_rest = q_rest // n, k_rest // n
    return out


def _na_tile_fraction(masks, spatial, block_m, block_n, device):
    """Fraction of (query tile, key tile) pairs of flattened tokens holding any neighbour."""
    tokens = int(torch.tensor(spatial).prod())
    n_kt = -(-tokens // block_n)
    hits = 0
    chunk = block_m * max(1, (1 << 24) // (tokens * block_m))
    for q0 in range(0, tokens, chunk):
        rows = torch.arange(q0, min(tokens, q0 + chunk), device=device)
        m = _na_mask_rows(masks, spatial, rows, device)
        m = torch.nn.functional.pad(m, (0, n_kt * block_n - tokens, 0, -len(rows) % block_m))
        hits += int(m.view(-1, block_m, n_kt, block_n).any(dim=3).any(dim=1).sum())
    return hits / (-(-tokens // block_m) * n_kt)


def _na_err(masks, spatial, q, k, v, out, device, n_rows=512):
    """Relative error of out against a float64 computation from the reference's mask, on
    batch 0, q head 0 and n_rows query tokens spread over the grid."""
    tokens = int(torch.tensor(spatial).prod())
    rows = torch.linspace(0, tokens - 1, min(n_rows, tokens), device=device).long().unique()
    flat = lambda t: t[0].reshape(tokens, t.shape[-2], t.shape[-1])[:, 0].to(device, torch.float64)
    qs, ks, vs = flat(q)[rows], flat(k), flat(v)
    s = (qs @ ks.T) / q.shape[-1] ** 0.5
    s = s.masked_fill(~_na_mask_rows(masks, spatial, rows, device), float("-inf"))
    ref = torch.softmax(s, dim=-1) @ vs
    return rel_err(flat(out)[rows], ref)


def run_neighborhood(r):
    """Rows "<shape>" (forward) and "<shape>_fwd_bwd" (forward + backward) per shape."""
    dtype = torch.float32 if r.device == "cpu" else torch.bfloat16
    dt = dtype_name(dtype)
    for shape_name, B, spatial, H, D, ks, dil, st, causal in neighborhood_configs(r.device, r.quick):
        shape_str = f"B{B} {'x'.join(map(str, spatial))} H{H} D{D} k{ks} d{dil} s{st}"
        ids = {d: (shape_name + ("" if d == "fwd" else "_fwd_bwd"),) for d in ("fwd", "fwd_bwd")}
        ids = {d: (name, f"neighborhood/{name}/{dt}/{shape_str}") for d, (name,) in ids.items()}
        todo = [d for d in ids if r.selected(ids[d][1])]
        if not todo:
            continue
        missing = _kernel_missing(r, "neighborhood_attention")
        if missing:
            for d in todo:
                r.skip(ids[d][1], missing)
            continue
        rank = len(spatial)
        ks_t, dil_t, st_t, causal_t = ((x,) * rank for x in (ks, dil, st, causal))
        tokens = int(torch.tensor(spatial).prod())
        set_bytes = 4 * B * tokens * H * D * torch.empty(0, dtype=dtype).element_size()
        nbuf = rotation(r.device, set_bytes, max_sets=4)
        bufs = [tuple(_randn((B, *spatial, H, D), dtype, r.device, i < 3) for i in range(4)) for _ in range(nbuf)]
        opts = dict(dilation=dil, stride=st, is_causal=causal)
        flat = lambda t: t.view(B, tokens, H, D)
        masks = _na_axis_masks(spatial, ks_t, dil_t, st_t, causal_t, r.device)
        pairs = 1
        for m in masks:
            pairs *= int(m.sum())
        block_m, block_n = _NA_TILE
        fraction = _na_tile_fraction(masks, spatial, block_m, block_n, r.device)
        for d in todo:
            name, case_id = ids[d]
            if r.over_budget():
                r.skip(case_id, "time budget (--budget-s) spent")
                continue
            print(f"{case_id} ({nbuf} buffer sets)", flush=True)

            def fns_for(forward):
                if d == "fwd":
                    return [_no_grad_fn(forward, q, k, v) for q, k, v, _ in bufs]
                return [_grad_fn(forward, q, k, v, dout) for q, k, v, dout in bufs]

            ak = r.time_attnkit(case_id, fns_for(lambda q, k, v: attnkit.neighborhood_attention(q, k, v, ks, **opts)))
            if ak is None:
                continue
            stats = {}
            stats["dense_prefill"], _ = r.time_peer(case_id, "dense_prefill", lambda: fns_for(
                lambda q, k, v: attnkit.attention(flat(q), flat(k), flat(v)).view(q.shape)))
            if r.device == "cuda":
                def make_flex():
                    fa, create_block_mask = _flex()

                    def mask_mod(b, h, qi, ki):
                        visible = qi >= 0
                        for m, n in zip(reversed(masks), reversed(spatial)):
                            visible = visible & m[qi % n, ki % n]
                            qi, ki = qi // n, ki // n
                        return visible
                    bm = create_block_mask(mask_mod, None, None, tokens, tokens, device=r.device)
                    return fns_for(lambda q, k, v: fa(flat(q).transpose(1, 2), flat(k).transpose(1, 2),
                                                      flat(v).transpose(1, 2), block_mask=bm).transpose(1, 2).reshape(q.shape))
                stats["flex"], _ = r.time_peer(case_id, "flex", make_flex)

                def make_natten():
                    import natten
                    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]
                    return fns_for(lambda q, k, v: fn(q, k, v, kernel_size=ks, dilation=dil, stride=st,
                                                      is_causal=causal))
                stats["natten"], _ = r.time_peer(case_id, "natten", make_natten)
            tflops = 4.0 * B * H * D * pairs * (3.5 if d == "fwd_bwd" else 1.0) / (ak.median * 1e-3) / 1e12
            sol_ms = stats["dense_prefill"].median * fraction if stats["dense_prefill"] is not None else None
            err, err_on = None, "the forward row's (tests/test_neighborhood_cuda.py checks the gradients)"
            if d == "fwd":
                q, k, v, _ = bufs[0]
                with torch.no_grad():
                    out = attnkit.neighborhood_attention(q, k, v, ks, **opts)
                err_on = "batch 0, head 0, 512 query tokens spread over the grid"
                try:
                    err = _na_err(masks, spatial, q, k, v, out, r.device)
                except Exception as e:  # keep the timing; say why there is no error figure
                    r.note_once(f"na-err-{case_id}", f"reference failed: {type(e).__name__}: {e}"[:200])
            shape = {"batch": B, "spatial": list(spatial), "heads": H, "head_dim": D, "kernel_size": ks,
                     "dilation": dil, "stride": st, "is_causal": causal, "tile_fraction": fraction,
                     "ceiling": f"speed of light = dense attnkit.attention time ({d}) x fraction of "
                                f"{block_m}x{block_n} token tile pairs holding a neighbour",
                     "err_on": err_on}
            pct = 100.0 * sol_ms / ak.median if sol_ms is not None else float("nan")
            r.add_row(Row("neighborhood", name, dt, shape, ak, tflops=tflops, pct_of_ceiling=pct, max_rel_err=err,
                          shape_str=shape_str, id=case_id), stats)
        del bufs
        r.free()


# ------------------------------------------------------------------------------------
# paged prefill (chunked prefill over a paged KV cache)


def paged_prefill_configs(device, quick):
    """(new tokens per sequence, cached tokens before them, page_size, batch, heads_q, heads_kv, head_dim)."""
    if device == "cpu":
        if quick:
            return [(256, 2048, 16, 1, 8, 2, 64)]
        return [(512, 4096, 16, 1, 8, 2, 64), (512, 4096, 256, 1, 8, 2, 64), (1024, 8192, 64, 1, 8, 2, 128)]
    if quick:
        return [(2048, 16384, 64, 2, 32, 8, 128)]
    return [(c, n, p, 2, 32, 8, 128) for c, n in ((512, 4096), (2048, 32768), (8192, 131072)) for p in (16, 64, 256)]


def run_paged_prefill(r):
    """Rows: attention_varlen over a paged cache (a new chunk, causal, against its sequence's
    cached tokens and itself), TFLOP/s of the causal work; peers: the same attention over keys
    already contiguous (dense varlen, no gather: the target is within 1.1x), and a gather of
    the pages into a contiguous copy followed by it (gather time included), SDPA and
    FlexAttention (on the gathered keys) on CUDA; and the same chunk over int8 pages."""
    for chunk, cached, page, B, H, Hkv, D in paged_prefill_configs(r.device, r.quick):
        dtype = torch.float32 if r.device == "cpu" else torch.bfloat16
        dt = dtype_name(dtype)
        shape_str = f"B{B} new{chunk} cached{cached} page{page} Hq{H} Hkv{Hkv} D{D}"
        case_id = f"paged_prefill/chunk_causal/{dt}/{shape_str}"
        if _not_run(r, case_id, "attention"):
            continue
        dev, total = r.device, cached + chunk
        pages_per_seq = (total + page - 1) // page
        table = torch.randperm(B * pages_per_seq, device=dev).int().view(B, pages_per_seq)
        k_pages, v_pages = (_randn((B * pages_per_seq, page, Hkv, D), dtype, dev) for _ in "kv")
        q = _randn((B * chunk, H, D), dtype, dev)
        cu_q = torch.arange(0, (B + 1) * chunk, chunk, dtype=torch.int32, device=dev)
        cu_k = torch.arange(0, (B + 1) * total, total, dtype=torch.int32, device=dev)
        opts = dict(causal=True)

        def contiguous(pages):
            return pages[table.long()].view(B, pages_per_seq * page, Hkv, D)[:, :total].reshape(B * total, Hkv, D)
        k_dense, v_dense = contiguous(k_pages), contiguous(v_pages)

        def over_pages(keys, values):  # the chunk's attention over pages of the table
            return attnkit.attention_varlen(q, keys, values, cu_q, cu_k, chunk, total, block_table=table, **opts)
        print(case_id, flush=True)
        ak = r.time_attnkit(case_id, [lambda: over_pages(k_pages, v_pages)])
        if ak is None:
            continue
        stats = {}
        stats["dense_varlen"], _ = r.time_peer(case_id, "dense_varlen", lambda: [
            lambda: attnkit.attention_varlen(q, k_dense, v_dense, cu_q, cu_k, chunk, total, **opts)])
        stats["gather_varlen"], _ = r.time_peer(case_id, "gather_varlen", lambda: [
            lambda: attnkit.attention_varlen(q, contiguous(k_pages), contiguous(v_pages), cu_q, cu_k, chunk, total,
                                             **opts)])
        if dev == "cuda":
            for name, ctx in _sdpa_backends(dev).items():
                def make(ctx=ctx):
                    qd, kd, vd = q.view(B, chunk, H, D), k_dense.view(B, total, Hkv, D), v_dense.view(B, total, Hkv, D)
                    group = H // Hkv
                    kd, vd = kd.repeat_interleave(group, 2), vd.repeat_interleave(group, 2)
                    mask = reference.mask(chunk, total, causal=True, device=dev)
                    return [lambda: _sdpa_masked(qd, kd, vd, mask, ctx)]
                stats[name], _ = r.time_peer(case_id, name, make)

            def make_flex():  # FlexAttention over the gathered keys, bottom-right causal block mask
                fa, create_block_mask = _flex()
                shift = total - chunk
                bm = create_block_mask(lambda b, h, qi, ki: qi + shift >= ki, None, None, chunk, total, device=dev)
                qd, kd, vd = (t.view(B, -1, t.shape[1], D).transpose(1, 2) for t in (q, k_dense, v_dense))
                return [lambda: fa(qd, kd, vd, block_mask=bm, enable_gqa=True)]
            stats["flex"], _ = r.time_peer(case_id, "flex", make_flex)
        out = over_pages(k_pages, v_pages)
        want = attnkit.attention_varlen(q, k_dense, v_dense, cu_q, cu_k, chunk, total, **opts)
        err = rel_err(out, want.double())  # the paged read against the same kernel on contiguous keys
        flops = 4.0 * B * H * D * (chunk * cached + chunk * (chunk + 1) / 2)
        tflops = flops / (ak.median * 1e-3) / 1e12
        shape = {"batch": B, "new_tokens": chunk, "cached_tokens": cached, "page_size": page, "heads_q": H,
                 "heads_kv": Hkv, "head_dim": D,
                 "err_on": "all rows, against attnkit's dense varlen on the gathered keys (tests check the reference)"}
        r.add_row(Row("paged_prefill", "chunk_causal", dt, shape, ak, tflops=tflops,
                      pct_of_ceiling=100.0 * tflops / r.ceilings.matmul_tflops, max_rel_err=err,
                      shape_str=shape_str, id=case_id), stats)
        r.free()

        # The same chunk over int8 pages (one scale and zero per row), read and dequantized by
        # the kernel; peers: the unquantized pages, and dequantize_kv of the pages first.
        qcase_id = f"paged_prefill/chunk_causal_int8/{dt}/{shape_str}"
        if _not_run(r, qcase_id, "attention"):
            continue
        k_int8, v_int8 = attnkit.quantize_kv(k_pages, "int8"), attnkit.quantize_kv(v_pages, "int8")
        print(qcase_id, flush=True)
        ak = r.time_attnkit(qcase_id, [lambda: over_pages(k_int8, v_int8)])
        if ak is None:
            continue

        def dequantize_then_paged():
            return over_pages(attnkit.dequantize_kv(k_int8).to(dtype), attnkit.dequantize_kv(v_int8).to(dtype))
        stats = {}
        stats["unquantized_pages"], _ = r.time_peer(qcase_id, "unquantized_pages",
                                                    lambda: [lambda: over_pages(k_pages, v_pages)])
        stats["dequantize_then_paged"], _ = r.time_peer(qcase_id, "dequantize_then_paged",
                                                        lambda: [dequantize_then_paged])
        err = rel_err(over_pages(k_int8, v_int8), dequantize_then_paged().double())
        tflops = flops / (ak.median * 1e-3) / 1e12
        r.add_row(Row("paged_prefill", "chunk_causal_int8", dt,
                      dict(shape, kv_format="int8",
                           err_on="all rows, against attnkit's paged prefill on the dequantized pages"),
                      ak, tflops=tflops, pct_of_ceiling=100.0 * tflops / r.ceilings.matmul_tflops, max_rel_err=err,
                      shape_str=shape_str, id=qcase_id), stats)
        r.free()


def _sdpa_masked(q, k, v, mask, ctx):
    with ctx():
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


# ------------------------------------------------------------------------------------
# score modifiers: sink tokens and ALiBi


def score_mods_configs(device, quick):
    """(batch, seqlen, heads_q, heads_kv, head_dim, window_left, sink_tokens)."""
    if device == "cpu":
        return [(1, 1024, 4, 2, 64, 128, 4)] if quick else [(1, 2048, 8, 2, 64, 256, 4)]
    return [(2, 4096, 32, 8, 128, 1024, 4)] if quick else [(2, 8192, 32, 8, 128, 1024, 4)]


def run_score_mods(r):
    """Rows (forward, causal): "streaming_sinks" (a left window plus sink tokens, StreamingLLM)
    and "alibi" (FlashAttention's ALiBi slopes per head), TFLOP/s of the visible logits; peers:
    attnkit on the same call without the modifier (its overhead) and SDPA with the equivalent
    bool mask or float bias (how such models run without a fused kernel)."""
    for B, S, H, Hkv, D, window, sinks in score_mods_configs(r.device, r.quick):
        dtype = torch.float32 if r.device == "cpu" else torch.bfloat16
        dt, dev, group = dtype_name(dtype), r.device, H // Hkv
        q, k, v = (_randn((B, S, h, D), dtype, dev) for h in (H, Hkv, Hkv))
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=dev)
        cases = {
            "streaming_sinks": (dict(causal=True, window=(window, 0), sink_tokens=sinks),
                                dict(causal=True, window=(window, 0)),
                                reference.mask(S, S, causal=True, window=(window, 0), device=dev, sink_tokens=sinks)),
            "alibi": (dict(causal=True, alibi_slopes=slopes), dict(causal=True), None),
        }
        for name, (opts, plain, visible) in cases.items():
            shape_str = f"B{B} S{S} Hq{H} Hkv{Hkv} D{D}" + (f" window{window} sinks{sinks}" if visible is not None else "")
            case_id = f"score_mods/{name}/{dt}/{shape_str}"
            if _not_run(r, case_id, "attention"):
                continue
            print(case_id, flush=True)
            ak = r.time_attnkit(case_id, [lambda: attnkit.attention(q, k, v, **opts)])
            if ak is None:
                continue
            stats = {}
            stats["attnkit_without"], _ = r.time_peer(case_id, "attnkit_without",
                                                      lambda: [lambda: attnkit.attention(q, k, v, **plain)])
            if visible is None:  # ALiBi as an additive float mask, -inf above the diagonal
                causal_mask = reference.mask(S, S, causal=True, device=dev)
                positions = torch.arange(S, device=dev)
                distance = (positions[:, None] - positions[None, :]).abs().to(dtype)  # (S, S), built in dtype
                sdpa_mask = (-slopes.to(dtype)[:, None, None] * distance).masked_fill(~causal_mask, float("-inf"))[None]
                pairs = int(causal_mask.sum())
            else:
                sdpa_mask, pairs = visible, int(visible.sum())
            for peer, ctx in _sdpa_backends(dev).items():
                def make(ctx=ctx):
                    kd, vd = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
                    return [lambda: _sdpa_masked(q, kd, vd, sdpa_mask, ctx)]
                stats[peer], _ = r.time_peer(case_id, peer, make)
            out = attnkit.attention(q, k, v, **opts)
            # Error on the first kv head's group of q heads of sequence 0, against the float64 reference.
            ref_opts = dict(opts, alibi_slopes=slopes[:group]) if "alibi_slopes" in opts else opts
            want, _ = reference.attention(q[:1, :, :group], k[:1, :, :1], v[:1, :, :1], **ref_opts)
            err = rel_err(out[:1, :, :group], want)
            tflops = 4.0 * B * H * D * pairs / (ak.median * 1e-3) / 1e12
            shape = {"batch": B, "seqlen": S, "heads_q": H, "heads_kv": Hkv, "head_dim": D, "causal": True,
                     "window_left": window if visible is not None else -1,
                     "sink_tokens": sinks if visible is not None else 0, "alibi": visible is None,
                     "err_on": "sequence 0, q heads of kv head 0, against the float64 reference"}
            r.add_row(Row("score_mods", name, dt, shape, ak, tflops=tflops,
                          pct_of_ceiling=100.0 * tflops / r.ceilings.matmul_tflops, max_rel_err=err,
                          shape_str=shape_str, id=case_id), stats)
            r.free()


# ------------------------------------------------------------------------------------
# block-sparse prefill


def block_sparse_configs(device, quick):
    """(batch, seqlen, heads, kv_heads, head_dim, block_size, densities): the issue's 8k tokens
    on the CPU (densities 1/2 .. 1/64 of the causal pairs), 8k-128k on CUDA."""
    densities = (2, 4, 8, 16, 32, 64)
    if device == "cpu":
        return [(1, 8192, 4, 4, 64, 64, (16,) if quick else densities)]
    cfgs = [(1, 8192, 32, 8, 128, 64, densities), (1, 32768, 32, 8, 128, 64, densities)]
    if not quick:
        cfgs.append((1, 131072, 32, 8, 128, 64, (16, 64)))
    return cfgs[:1] if quick else cfgs


BLOCK_SPARSE_PATTERNS = ("topk", "s2", "streaming", "vslash")


def block_sparse_pattern(pattern, inv_density, q, k, heads, blocks, block_size):
    """(block lists, column keyword arguments) of one of the benchmarked patterns at about
    1 / inv_density of the causal pairs: "topk" (MInference's block-sparse heads /
    SeerAttention: top-k of mean-pooled block scores, one sink and one local block), "s2"
    (S2-Attention: strided shards, head h offset by h, plus the diagonal block), "streaming"
    (sink block + local window: the slash lines of a dense diagonal band, as block lists),
    "vslash" (MInference's vertical-slash heads: vertical_slash_indices with exact columns,
    half the kept pairs from each kind of line)."""
    seqlen = q.shape[1]
    if pattern == "topk":
        scores = attnkit.pooled_block_scores(q, k, block_size)
        top_k = max(0, round(blocks / (2 * inv_density)) - 2)
        return attnkit.block_topk_indices(scores, top_k, causal=True, local_blocks=1, sink_blocks=1), {}
    if pattern == "s2":
        stride = inv_density
        indices, counts = attnkit.strided_shard_indices(seqlen, max(heads, stride), stride=stride,
                                                        local_window=block_size, block_size=block_size,
                                                        device=q.device)
        return (indices[:, :heads].contiguous(), counts[:, :heads].contiguous()), {}
    if pattern == "vslash":  # a column keeps ~seqlen / 2 pairs, a slash offset ~1.5 x seqlen (blocks it crosses)
        pairs = seqlen * seqlen / (2 * inv_density)
        vertical, slash = max(1, round(pairs / seqlen)), max(1, round(pairs / (2 * 1.5 * seqlen * block_size)))
        indices, counts, cols, col_counts = attnkit.vertical_slash_indices(
            q, k, vertical=vertical, slash=slash, block_size=block_size, exact_columns=True)
        return (indices, counts), {"column_indices": cols, "column_counts": col_counts}
    local = max(1, round(blocks / (2 * inv_density)) - 1)
    scores = torch.zeros(1, heads, blocks, blocks, device=q.device)
    return attnkit.block_topk_indices(scores, 0, causal=True, local_blocks=local, sink_blocks=1), {}


def _block_sparse_visible(indices, counts, columns, seqlen, block_size):
    """The reference's element mask of batch 0 (1, heads, seqlen, seqlen)."""
    columns = {name: t[:1] for name, t in columns.items()}
    return reference.block_sparse_mask(indices[:1], counts[:1], seqlen, seqlen, block_size_q=block_size,
                                       block_size_k=block_size, causal=True, **columns)


def _block_sparse_fraction(visible, seqlen):
    """Kept fraction of the causal (query, key) pairs, exact, from the element mask."""
    return visible.sum().item() / (visible.shape[1] * seqlen * (seqlen + 1) / 2)


def _block_sparse_tile_fraction(indices, counts, columns, seqlen, block_size, tile=64):
    """Tiles the forward computes over the causal 64 x 64 (query tile, key tile) pairs (batch
    0): the key tiles of listed blocks holding a pair a row sees (the walk visits exactly
    these, tests/cpp/test_block_sparse.cpp) plus, per query tile, its visible columns gathered
    64 to a tile."""
    blocks = _block_sparse_visible(indices, counts, {}, seqlen, block_size)[0]
    heads = blocks.shape[0]
    pad = (-seqlen) % tile
    tiles = (seqlen + pad) // tile
    visited = torch.nn.functional.pad(blocks, (0, pad, 0, pad)).reshape(heads, tiles, tile, tiles, tile)
    computed = visited.any(dim=4).any(dim=2).sum().item()
    del blocks, visited
    if columns:
        cols, col_counts = attnkit.canonical_column_lists(columns["column_indices"][:1], columns["column_counts"][:1],
                                                          *attnkit.canonical_block_lists(
                                                              indices[:1], counts[:1], -(-seqlen // block_size)),
                                                          seqlen, block_size)
        ends = torch.clamp((torch.arange(tiles) + 1) * tile, max=seqlen)           # a query tile's key end (causal)
        block_of = torch.arange(tiles) * tile // block_size
        tile_cols = cols[0][:, block_of].cpu()                                      # (heads, tiles, list_len)
        valid = torch.arange(cols.shape[-1]) < col_counts[0][:, block_of, None].cpu()
        seen = (valid & (tile_cols >= 0) & (tile_cols < ends[:, None])).sum(dim=-1)
        computed += (-(-seen // tile)).sum().item()
    return computed / (heads * tiles * (tiles + 1) / 2)


def _block_sparse_err(q, k, v, visible, out, rows=128):
    """Relative error of out (batch 0, every head) on `rows` query rows spread over the
    sequence against float64 attention under the reference's element mask."""
    seqlen = q.shape[1]
    picked = torch.linspace(0, seqlen - 1, rows).long().unique()
    visible = visible[0][:, picked]
    group = q.shape[2] // k.shape[2]
    qs = q[0, picked].cpu().double().transpose(0, 1)
    ks, vs = (t[0].cpu().double().repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    s = (qs @ ks.transpose(1, 2)) / q.shape[-1] ** 0.5
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    ref = torch.where(visible.any(dim=-1, keepdim=True), p, 0.0) @ vs  # a row that sees nothing: out 0
    return rel_err(out[0, picked].transpose(0, 1), ref)


def _flex_block_sparse(r, indices, counts, bufs, block_size, heads, kv_heads):
    """FlexAttention with the block mask of the same lists (BlockMask.from_kv_blocks, lists
    padded to every key block so every pattern shares one compiled shape; the causal rule as
    its mask_mod) over the same buffers. No columns: FlexAttention's block masks hold blocks."""
    fa, _ = _flex()
    from torch.nn.attention.flex_attention import BlockMask
    seqlen, blocks = bufs[0][0].shape[1], indices.shape[2]
    padded = torch.zeros(*indices.shape[:3], blocks, dtype=torch.int32, device=indices.device)
    padded[..., :indices.shape[3]] = indices.clamp(min=0)
    mask = BlockMask.from_kv_blocks(counts.contiguous(), padded, BLOCK_SIZE=block_size,
                                    mask_mod=lambda b, h, qi, ki: qi >= ki, seq_lengths=(seqlen, seqlen))
    kw = {"enable_gqa": True} if heads != kv_heads else {}
    fwd = (lambda q, k, v: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                              **kw).transpose(1, 2))
    return [_no_grad_fn(fwd, q, k, v) for q, k, v in bufs]


def run_block_sparse(r):
    """Rows "<pattern>_1/<n>" (forward, causal) per pattern and density; peers: dense
    attnkit.attention (causal), SDPA, and FlexAttention with the same block mask (block
    patterns only); % of speed of light = dense attnkit time x kept fraction of the causal
    pairs / attnkit time."""
    dtype = torch.float32 if r.device == "cpu" else torch.bfloat16
    dt = dtype_name(dtype)
    for B, S, H, Hkv, D, bs, densities in block_sparse_configs(r.device, r.quick):
        shape_str = f"B{B} S{S} Hq{H} Hkv{Hkv} D{D} block{bs}"
        cases = [(p, n, f"block_sparse/{p}_1/{n}/{dt}/{shape_str}") for p in BLOCK_SPARSE_PATTERNS
                 for n in densities]
        cases = [c for c in cases if r.selected(c[2])]
        if not cases:
            continue
        missing = _kernel_missing(r, "block_sparse_attention")
        if missing:
            for c in cases:
                r.skip(c[2], missing)
            continue
        set_bytes = 2 * B * S * (H + 2 * Hkv) * D * torch.empty(0, dtype=dtype).element_size()
        nbuf = rotation(r.device, set_bytes, max_sets=4)
        bufs = [tuple(_randn((B, S, h, D), dtype, r.device) for h in (H, Hkv, Hkv)) for _ in range(nbuf)]
        dense_id = f"block_sparse/dense/{dt}/{shape_str}"
        print(f"{dense_id} ({nbuf} buffer sets)", flush=True)
        dense, _ = r.time_peer(dense_id, "dense_attnkit", lambda: [
            _no_grad_fn(lambda q, k, v: attnkit.attention(q, k, v, causal=True), q, k, v) for q, k, v in bufs])
        sdpa = {name: r.time_peer(dense_id, name, lambda ctx=ctx: [
            _no_grad_fn(lambda q, k, v: _sdpa(q, k, v, True, ctx), q, k, v) for q, k, v in bufs])[0]
                for name, ctx in _sdpa_backends(r.device).items()}
        blocks = -(-S // bs)
        for pattern, inv_density, case_id in cases:
            if r.over_budget():
                r.skip(case_id, "time budget (--budget-s) spent")
                continue
            print(f"{case_id} ({nbuf} buffer sets)", flush=True)
            q0, k0, _ = bufs[0]
            (indices, counts), columns = block_sparse_pattern(pattern, inv_density, q0, k0, H, blocks, bs)
            visible = _block_sparse_visible(indices, counts, columns, S, bs)
            fraction = _block_sparse_fraction(visible, S)
            ak = r.time_attnkit(case_id, [_no_grad_fn(lambda q, k, v: attnkit.block_sparse_attention(
                q, k, v, indices, counts, block_size_q=bs, block_size_k=bs, causal=True, **columns), q, k, v)
                for q, k, v in bufs])
            if ak is None:
                continue
            with torch.no_grad():
                out = attnkit.block_sparse_attention(*bufs[0], indices, counts, block_size_q=bs, block_size_k=bs,
                                                     causal=True, **columns)
            err = _block_sparse_err(*bufs[0], visible, out)
            tile_fraction = _block_sparse_tile_fraction(indices, counts, columns, S, bs)
            del visible
            peers = {"dense_attnkit": dense, **sdpa}
            if not columns and "failed" not in _FLEX.get("block_sparse", ()):
                peers["flex"], _ = r.time_peer(case_id, "flex", lambda: _flex_block_sparse(
                    r, indices, counts, bufs, bs, H, Hkv))
                if peers["flex"] is None:  # a failed compile is not retried for every pattern
                    _FLEX.setdefault("block_sparse", set()).add("failed")
            pairs = fraction * H * S * (S + 1) / 2
            tflops = 4.0 * B * pairs * D / (ak.median * 1e-3) / 1e12
            sol_ms = dense.median * fraction if dense is not None else None
            pct = 100.0 * sol_ms / ak.median if sol_ms is not None else float("nan")
            shape = {"batch": B, "seqlen": S, "heads": H, "kv_heads": Hkv, "head_dim": D, "block_size": bs,
                     "pattern": pattern, "target_density": f"1/{inv_density}", "kept_fraction": fraction,
                     "tile_fraction": tile_fraction,
                     "ceiling": "speed of light = dense attnkit.attention (causal) time x kept fraction of the "
                                "causal pairs",
                     "err_on": "batch 0, every head, 128 query rows spread over the sequence"}
            r.add_row(Row("block_sparse", f"{pattern}_1/{inv_density}", dt, shape, ak, tflops=tflops,
                          pct_of_ceiling=pct, max_rel_err=err, shape_str=shape_str, id=case_id),
                      peers)
        del bufs
        r.free()


FAMILIES = {"prefill": run_prefill, "decode": run_decode, "sparse": run_sparse, "quant": run_quant,
            "merge": run_merge, "neighborhood": run_neighborhood, "paged_prefill": run_paged_prefill,
            "score_mods": run_score_mods,
            "block_sparse": run_block_sparse,
            "context_parallel": run_context_parallel}  # not in --family's default: it spawns processes
