"""attnkit.distributed (context parallelism) on the CPU with gloo.

Groups of 2, 3 and 4 processes (torch.multiprocessing, start method spawn) each run a batch
of cases on their shards and send the unsharded results back through a Queue; the parent
compares them with single-process attnkit.attention / attention_varlen / decode over the
whole sequence: out, lse and dq, dk, dv within fp32 relative error 1e-5 (conftest's
assert_close), for ring and all-gather, zigzag and contiguous layouts, causal / full /
windows / softcap, GQA, lengths that need padding, varlen batches with empty and one-token
sequences; padding rows exactly 0 / -inf / no gradient; bitwise determinism; bytes sent per
rank against the analytic ring volume; sharded_decode (contiguous and paged, 1 and 3
queries); a crashed peer and a silent peer end every other rank with attnkit's error, never a
hang. In the parent process: the per-pair mask rule against brute force, shard / unshard
round trips, the local step under torch.compile, and bad input on a 1-rank group.
"""
import datetime
import io
import os
import queue
import random
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit import distributed as cp
from conftest import FWD_TOL, GRAD_TOL, assert_close, assert_lse_close, cu_seqlens

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TOL = 1e-5             # fp32 relative error against single-process attnkit
GROUP_TIMEOUT_S = 60   # the process groups' timeout: bounds every wait
SILENT_TIMEOUT_S = 3   # the subgroup of the silent-peer case
DEADLINE_S = 120       # the parent gives up on a group after this long (a failure, not a hang)
NEG_INF = float("-inf")
MASKS = {"full": dict(), "causal": dict(causal=True), "win3_2": dict(window=(3, 2)),
         "causal_win5": dict(causal=True, window=(5, -1)), "win0_4_softcap": dict(window=(0, 4), softcap=3.0),
         "diag_only": dict(window=(0, 0)), "win7_1": dict(window=(7, 1), softcap=2.0)}


# ------------------------------------------------------------------------------------------
# cases: built identically in the parent and in every worker (seeded)


def _attn_cases(world):
    """(world 2): every function x layout x mask on a dense length that needs padding, plus
    even dense lengths and varlen batches; (3, 4): a cross-section."""
    cases = []
    masks = list(MASKS) if world == 2 else ["full", "causal", "win3_2", "win7_1"]
    shapes = [("dense_pad", dict(B=2, S=11)), ("varlen", dict(lengths=[5, 0, 13, 1, 8]))]
    if world == 2:
        shapes.append(("dense_even", dict(B=1, S=16)))
    for fn in ("ring", "all_gather"):
        for layout in cp.LAYOUTS:
            for mask in masks:
                for sname, shape in shapes:
                    if sname == "dense_even" and mask not in ("causal", "win3_2"):
                        continue
                    heads = (2, 2) if mask == "full" else (4, 2)  # GQA 2:1 everywhere but "full"
                    cases.append(dict(kind="attn", id=f"w{world}/{fn}/{layout}/{mask}/{sname}", fn=fn, layout=layout,
                                      opts=MASKS[mask], heads=heads, D=8, seed=len(cases), **shape))
    if world == 2:  # bf16 inputs (float32 accumulators and dK/dV): bf16's budget against fp32 attnkit
        for fn in ("ring", "all_gather"):
            cases.append(dict(kind="attn", id=f"w2/{fn}/zigzag/causal_win5/dense_pad/bf16", fn=fn, layout="zigzag",
                              opts=MASKS["causal_win5"], heads=(4, 2), D=8, seed=len(cases), B=2, S=11,
                              dtype="bfloat16"))
    return cases


def _decode_cases(world):
    out = []
    for seqlen_q in (1, 3):
        for page_size in (None, 4):
            out.append(dict(kind="decode", id=f"w{world}/decode/q{seqlen_q}/{'paged' if page_size else 'contig'}",
                            seqlen_q=seqlen_q, page_size=page_size, query_rank=None, seed=100 + len(out)))
    if world == 2:
        out.append(dict(kind="decode", id="w2/decode/q2/query_rank0", seqlen_q=2, page_size=None, query_rank=0,
                        seed=200, softcap=4.0))
    return out


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def _attn_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    h, hkv = c["heads"]
    if "lengths" in c:
        cu = cu_seqlens(c["lengths"])
        rows, lse_shape = (sum(c["lengths"]),), (h, sum(c["lengths"]))
    else:
        cu, rows, lse_shape = None, (c["B"], c["S"]), (c["B"], h, c["S"])
    dt = getattr(torch, c.get("dtype", "float32"))
    q, k, v = _randn(gen, *rows, h, c["D"]), _randn(gen, *rows, hkv, c["D"]), _randn(gen, *rows, hkv, c["D"])
    return q.to(dt), k.to(dt), v.to(dt), _randn(gen, *rows, h, c["D"]).to(dt), _randn(gen, *lse_shape), cu


def _decode_inputs(c, world):
    """q, the whole cache in concatenation order (the other ranks' parts in rank order, then
    query_rank's part, which ends with the seqlen_q new tokens), and each rank's token range."""
    gen = torch.Generator().manual_seed(c["seed"])
    rnd = random.Random(c["seed"])
    B, H, HKV, D, sq = 3, 4, 2, 8, c["seqlen_q"]
    qr = world - 1 if c["query_rank"] is None else c["query_rank"]
    order = [r for r in range(world) if r != qr] + [qr]
    parts = []  # parts[b][r] = (start, length) in the concatenated cache
    for _ in range(B):
        sizes = {r: rnd.choice([0, 1, 5, 9]) for r in order}
        sizes[qr] += sq
        start, ranges = 0, {}
        for r in order:
            ranges[r] = (start, sizes[r])
            start += sizes[r]
        parts.append(ranges)
    lens = [sum(n for _, n in p.values()) for p in parts]
    smax = max(lens)
    q, k, v = _randn(gen, B, sq, H, D), _randn(gen, B, smax, HKV, D), _randn(gen, B, smax, HKV, D)
    return q, k, v, torch.tensor(lens, dtype=torch.int32), parts


def _bytes_case(world):
    return dict(kind="bytes", id=f"w{world}/bytes", B=1, S=4 * world, heads=(4, 2), D=8, seed=300)


def _cases(world):
    cases = _attn_cases(world) + _decode_cases(world) + [_bytes_case(world)]
    if world == 3:
        cases.append(dict(kind="crash", id="w3/crash", failing_rank=2))
    if world == 4:
        cases.append(dict(kind="silent", id="w4/silent", failing_rank=3))
    return cases


# ------------------------------------------------------------------------------------------
# worker side


FNS = {("ring", False): cp.ring_attention, ("all_gather", False): cp.all_gather_attention,
       ("ring", True): cp.ring_attention_varlen, ("all_gather", True): cp.all_gather_attention_varlen}


def _run_attn(c, rank, world):
    q, k, v, dout, dlse, cu = _attn_inputs(c)
    varlen = cu is not None
    layout = c["layout"]

    def shard(x, dim=None):
        return cp.shard_sequence(x, rank, world, layout=layout, dim=dim, cu_seqlens=cu)

    def unshard(x, dim=None):
        return cp.unshard_sequence(x, layout=layout, dim=dim, seqlen=None if varlen else c["S"], cu_seqlens=cu)

    fn = FNS[c["fn"], varlen]
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    extra = (cu,) if varlen else ()
    kw = dict(layout=layout, return_lse=True, **c["opts"]) | ({} if varlen else dict(seqlen=c["S"]))

    def run():
        out, lse = fn(ql, kl, vl, *extra, **kw)
        grads = torch.autograd.grad((out, lse), (ql, kl, vl), (shard(dout), shard(dlse, dim=-1)))
        return out.detach(), lse.detach(), *grads

    res = run()
    deterministic = all(torch.equal(a, b) for a, b in zip(res, run()))
    # padding rows (0 in a sharded tensor of ones): out 0, lse -inf, no gradient
    pad = shard(torch.ones(q.shape[:-2] if not varlen else q.shape[:1]), dim=-1) == 0
    out, lse, dq, dk, dv = res
    pad_ok = bool((out[pad] == 0).all() and (lse.transpose(-1, -2)[pad] == NEG_INF).all()
                  and all((g[pad] == 0).all() for g in (dq, dk, dv)))
    gathered = [unshard(t, dim=-1 if i == 1 else None) for i, t in enumerate(res)]
    return dict(res=gathered, deterministic=deterministic, pad_ok=pad_ok)


def _run_decode(c, rank, world):
    q, k, v, lens, parts = _decode_inputs(c, world)
    B, _, hkv, D = k.shape
    mine = [parts[b][rank] for b in range(B)]
    tmax = max(max(n for _, n in mine), 1)
    ks, vs = k.new_zeros(B, tmax, hkv, D), v.new_zeros(B, tmax, hkv, D)
    for b, (start, n) in enumerate(mine):
        ks[b, :n], vs[b, :n] = k[b, start:start + n], v[b, start:start + n]
    seqlens = torch.tensor([n for _, n in mine], dtype=torch.int32)
    table = None
    if c["page_size"]:  # the same tokens as pages of a shuffled page table
        ps = c["page_size"]
        per_seq = -(-tmax // ps)
        perm = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(c["seed"] + rank))
        table = perm.view(B, per_seq).int()
        kp, vp = k.new_zeros(B * per_seq, ps, hkv, D), v.new_zeros(B * per_seq, ps, hkv, D)
        padded = per_seq * ps
        kpad = torch.cat([ks, ks.new_zeros(B, padded - tmax, hkv, D)], 1).view(B, per_seq, ps, hkv, D)
        vpad = torch.cat([vs, vs.new_zeros(B, padded - tmax, hkv, D)], 1).view(B, per_seq, ps, hkv, D)
        kp[table.long()], vp[table.long()] = kpad, vpad
        ks, vs = kp, vp
    out, lse = cp.sharded_decode(q, ks, vs, seqlens, block_table=table, query_rank=c["query_rank"],
                                 softcap=c.get("softcap", 0.0), return_lse=True)
    return dict(res=[out, lse])


def _run_bytes(c, rank, world):
    """comm_stats of forward and backward of both paths, bf16 inputs (dK/dV travel in fp32)."""
    q, k, v, dout, _, _ = _attn_inputs(c)
    shard = lambda x: cp.shard_sequence(x, rank, world, layout="zigzag").bfloat16()  # noqa: E731
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    got = {}
    for name, fn in (("ring", cp.ring_attention), ("all_gather", cp.all_gather_attention)):
        cp.reset_comm_stats()
        out = fn(ql, kl, vl, causal=True)
        got[name + ".fwd"] = (cp.comm_stats.sent_bytes, cp.comm_stats.recv_bytes, cp.comm_stats.messages)
        cp.reset_comm_stats()
        out.backward(shard(dout))
        got[name + ".bwd"] = (cp.comm_stats.sent_bytes, cp.comm_stats.recv_bytes, cp.comm_stats.messages)
    return dict(got=got, kv_numel=2 * kl.numel())


def _run_failure(c, rank, world):
    """The failing rank raises (crash: the process dies) or sleeps past the timeout (silent);
    every other rank must get attnkit's RuntimeError, within the timeout."""
    group = None
    if c["kind"] == "silent":
        group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=SILENT_TIMEOUT_S))
        dist.barrier(group)
    x = torch.randn(1, 4, 2, 8)
    if rank == c["failing_rank"]:
        if c["kind"] == "silent":
            time.sleep(SILENT_TIMEOUT_S + 2)
            return dict(role="silent")
        raise RuntimeError("injected failure of this rank (expected by the test)")
    t0 = time.perf_counter()
    try:
        cp.ring_attention(x, x, x, group=group, causal=True)
    except RuntimeError as err:
        return dict(role="survivor", error=str(err), elapsed=time.perf_counter() - t0)
    return dict(role="survivor", error=None, elapsed=time.perf_counter() - t0)


RUNNERS = {"attn": _run_attn, "decode": _run_decode, "bytes": _run_bytes, "crash": _run_failure,
           "silent": _run_failure}


def _worker(rank, world, port, results):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        for c in _cases(world):
            results.put((c["id"], rank, _to_bytes(RUNNERS[c["kind"]](c, rank, world))))
    except BaseException:
        results.put(("__error__", rank, traceback.format_exc()))
        _exit(results, 1)  # a failed rank ends at once: its peers see the connection close
    results.put(("__done__", rank, None))
    _exit(results, 0)


def _to_bytes(payload):
    """torch.save'd bytes: a tensor put on the queue as is would be shared through its sending
    process, which may have exited by the time the parent reads it."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _exit(results, code):
    """Flushes the queue, then exits without destroy_process_group (the peers of the failure
    cases may already be gone, and a clean shutdown would wait for them)."""
    results.close()
    results.join_thread()
    os._exit(code)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GROUPS = {}


def run_group(world):
    """Spawns `world` workers once per test session; returns {(case id, rank): result}."""
    if world in _GROUPS:
        return _GROUPS[world]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got, done, errors = {}, set(), []
    deadline = time.monotonic() + DEADLINE_S
    expected_fail = {c["failing_rank"] for c in _cases(world) if c["kind"] in ("crash", "silent")}
    while len(done | expected_fail) < world and time.monotonic() < deadline:
        try:
            cid, rank, payload = results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if cid == "__done__":
            done.add(rank)
        elif cid == "__error__":
            errors.append((rank, payload))
            if rank not in expected_fail:
                done.add(rank)
        else:
            got[cid, rank] = torch.load(io.BytesIO(payload))
    for p in procs:  # our own workers; the silent rank of the failure case may still be asleep
        p.join(timeout=0.5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    unexpected = [e for e in errors if "injected failure" not in e[1]]
    assert time.monotonic() < deadline, f"group of {world} did not finish within {DEADLINE_S} s (a hang)"
    assert not unexpected, f"worker errors in the group of {world}:\n" + "\n".join(f"rank {r}:\n{tb}"
                                                                                   for r, tb in unexpected)
    _GROUPS[world] = got
    return got


# ------------------------------------------------------------------------------------------
# parent-side checks of the multi-process results


def _reference(c):
    """Single-process attnkit over the whole sequence, in float32 (also for bf16 cases)."""
    q, k, v, dout, dlse, cu = _attn_inputs(c)
    q, k, v, dout = (x.float() for x in (q, k, v, dout))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if cu is None:
        out, lse = attnkit.attention(q, k, v, return_lse=True, **c["opts"])
    else:
        n = max(c["lengths"])
        out, lse = attnkit.attention_varlen(q, k, v, cu, cu, n, n, return_lse=True, **c["opts"])
    return [out.detach(), lse.detach(), *torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))]


def _check_attn(c, got):
    r = got[c["id"], 0]
    want = _reference(c)
    dt = getattr(torch, c.get("dtype", "float32"))
    fwd_tol, grad_tol = (TOL, TOL) if dt == torch.float32 else (FWD_TOL[dt], GRAD_TOL[dt])
    assert_close(r["res"][0], want[0], fwd_tol, f"{c['id']} out")
    assert_lse_close(r["res"][1], want[1], fwd_tol)
    for name, g, w in zip(("dq", "dk", "dv"), r["res"][2:], want[2:]):
        assert_close(g, w, grad_tol, f"{c['id']} {name}")
    assert r["deterministic"], f"{c['id']}: a second call gave different bits"
    assert r["pad_ok"], f"{c['id']}: padding rows must have out 0, lse -inf and zero gradients"


def _check_decode(c, got, world):
    q, k, v, lens, _ = _decode_inputs(c, world)
    want_out, want_lse = attnkit.decode(q, k, v, lens, softcap=c.get("softcap", 0.0), return_lse=True)
    first = got[c["id"], 0]["res"]
    assert_close(first[0], want_out, TOL, f"{c['id']} out")
    assert_lse_close(first[1], want_lse, TOL)
    for r in range(1, world):  # every rank merged the same results in the same order
        other = got[c["id"], r]["res"]
        assert torch.equal(other[0], first[0]) and torch.equal(other[1], first[1]), f"{c['id']}: rank {r} differs"


def _check_bytes(c, got, world):
    h, hkv = c["heads"]
    local = c["S"] // world  # rows per rank (S is a multiple of 2 * world: no padding)
    kv_bf16 = 2 * c["B"] * local * hkv * c["D"] * 2
    kv_fp32 = kv_bf16 * 2
    R = world
    want = {"ring.fwd": ((R - 1) * kv_bf16, R - 1),                      # K/V: R - 1 hops
            "ring.bwd": ((R - 1) * kv_bf16 + R * kv_fp32, 2 * R - 1),    # + dK/dV (fp32): R hops home
            "all_gather.fwd": ((R - 1) * kv_bf16, 1),                    # one all-gather
            "all_gather.bwd": ((R - 1) * kv_bf16 + (R - 1) * kv_fp32, 2)}  # gathered again + reduce-scatter
    for r in range(world):
        g = got[c["id"], r]["got"]
        for key, (nbytes, messages) in want.items():
            assert g[key] == (nbytes, nbytes, messages), f"rank {r} {key}: (sent, recv, messages) {g[key]}, " \
                                                         f"expected {(nbytes, nbytes, messages)}"


def _check_failure(c, got, world):
    for r in range(world):
        if r == c["failing_rank"]:
            continue
        res = got.get((c["id"], r))
        assert res is not None, f"rank {r} reported nothing for {c['id']}"
        assert res["error"] is not None, f"rank {r}: ring_attention returned although rank {c['failing_rank']} failed"
        assert f"attnkit.distributed.ring_attention: rank {r} of {world}" in res["error"], res["error"]
        limit = (SILENT_TIMEOUT_S if c["kind"] == "silent" else GROUP_TIMEOUT_S) + 10
        assert res["elapsed"] < limit, f"rank {r}: the error took {res['elapsed']:.1f} s (limit {limit} s)"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_multiprocess(world):
    """Everything a group of `world` ranks computes (one spawn per group): see the module doc."""
    got = run_group(world)
    failures = []
    for c in _cases(world):
        try:
            if c["kind"] == "attn":
                _check_attn(c, got)
            elif c["kind"] == "decode":
                _check_decode(c, got, world)
            elif c["kind"] == "bytes":
                _check_bytes(c, got, world)
            else:
                _check_failure(c, got, world)
        except (AssertionError, KeyError) as err:
            failures.append(f"{c['id']}: {type(err).__name__}: {err}")
    assert not failures, f"{len(failures)} of {len(_cases(world))} cases failed:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------
# in-process tests


def _mask(sq, sk, left, right, q_start=0, k_start=0, seqlen=None):
    """Global rule (brute force) on positions, or the local bottom-right rule when q_start,
    k_start are None."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    if q_start is None:  # attnkit's local call
        d = i + sk - sq
    else:
        i, j, d = i + q_start, j + k_start, i + q_start
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        vis &= j >= d - left
    if right >= 0:
        vis &= j <= d + right
    if seqlen is not None:
        vis &= (i < seqlen) & (j < seqlen)
    return vis


def test_pair_block_matches_global_mask():
    """pair_block's trimmed block with its (left, right), under attnkit's bottom-right rule,
    sees exactly the global mask of the pair (random sweep + the edge cases)."""
    rnd = random.Random(0)
    for trial in range(3000):
        m, n = rnd.randint(1, 9), rnd.randint(1, 9)
        q0, k0 = rnd.randint(0, 30), rnd.randint(0, 30)
        left, right = rnd.choice([-1, 0, 1, 2, 5, 13]), rnd.choice([-1, 0, 1, 3, 11])
        seqlen = rnd.choice([10 ** 6, rnd.randint(0, 40)])
        want = _mask(m, n, left, right, q0, k0, seqlen)
        blk = cp.pair_block(q0, m, k0, n, left, right, seqlen)
        got = torch.zeros(m, n, dtype=torch.bool)
        if blk is not None:
            assert blk.left >= -1 and blk.right >= -1
            assert (blk.left == -1) == (left == -1) and (blk.right == -1) == (right == -1)
            local = _mask(blk.q_hi - blk.q_lo, blk.k_hi - blk.k_lo, blk.left, blk.right, None, None)
            got[blk.q_lo:blk.q_hi, blk.k_lo:blk.k_hi] = local
            assert local.any(dim=1).all(), "every row of a block sees a key"
        assert torch.equal(got, want), (trial, q0, m, k0, n, left, right, seqlen, blk)


def test_pair_block_skips_masked_pairs():
    assert cp.pair_block(0, 4, 4, 4, -1, 0, 100) is None          # causal: keys after the queries
    assert cp.pair_block(8, 4, 0, 4, 3, 0, 100) is None           # window: keys too far back
    assert cp.pair_block(8, 4, 0, 4, -1, -1, 8) is None           # queries all padding
    assert cp.pair_block(4, 4, 0, 4, -1, 0, 100) == (0, 4, 0, 4, -1, 4)  # fully visible block
    assert cp.pair_block(0, 4, 0, 4, -1, 0, 100) == (0, 4, 0, 4, -1, 0)  # the causal diagonal


@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_shard_unshard_round_trip(layout):
    x = torch.arange(2 * 11 * 3, dtype=torch.float32).view(2, 11, 3)
    for world in (1, 2, 3):
        shards = [cp.shard_sequence(x, r, world, layout=layout) for r in range(world)]
        assert all(s.shape[1] == cp.padded_seqlen(11, world, layout) // world for s in shards)
        assert torch.equal(cp.unshard_sequence(shards, layout=layout, seqlen=11), x)
    cu = cu_seqlens([5, 0, 13, 1])
    t = torch.arange(19 * 2, dtype=torch.float32).view(19, 2)
    shards = [cp.shard_sequence(t, r, 3, layout=layout, cu_seqlens=cu) for r in range(3)]
    assert torch.equal(cp.unshard_sequence(shards, layout=layout, cu_seqlens=cu), t)
    lse = torch.randn(2, 4, 11)
    assert torch.equal(cp.unshard_sequence([cp.shard_sequence(lse, r, 2, layout=layout, dim=2) for r in range(2)],
                                           layout=layout, dim=2, seqlen=11), lse)


def test_zigzag_ownership():
    """Rank r holds chunks r and 2R - 1 - r; padding at the end, zeros."""
    x = torch.arange(1, 8, dtype=torch.float32).view(1, 7)  # 7 tokens over 2 ranks: padded to 8, chunks of 2
    assert cp.padded_seqlen(7, 2, "zigzag") == 8 and cp.padded_seqlen(7, 2, "contiguous") == 8
    assert cp.padded_seqlen(7, 3, "zigzag") == 12 and cp.padded_seqlen(7, 3, "contiguous") == 9
    assert cp.shard_sequence(x, 0, 2, layout="zigzag").tolist() == [[1, 2, 7, 0]]
    assert cp.shard_sequence(x, 1, 2, layout="zigzag").tolist() == [[3, 4, 5, 6]]
    assert cp.shard_sequence(x, 1, 2, layout="contiguous").tolist() == [[5, 6, 7, 0]]


def test_local_step_under_torch_compile():
    """The local step (attention of a query shard to a K/V shard, merged into the
    accumulators) traces whole under torch.compile; communication stays eager around it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = _randn(gen, 1, 8, 4, 8), _randn(gen, 1, 8, 2, 8), _randn(gen, 1, 8, 2, 8)
    segs_q = cp._rank_segments(0, 2, "zigzag", [16])   # chunks 0 and 3 of 4
    segs_k = cp._rank_segments(1, 2, "zigzag", [16])   # chunks 1 and 2
    plan = cp._Plan("test", None, 0, 2, "zigzag", [16], segs_q, -1, 0, 0.35, 0.0)  # causal
    pairs = plan.pairs(segs_k)
    assert len(pairs) == 2  # chunk 0 sees neither chunk 1 nor 2 (causal); chunk 3 sees both

    def step(q, k, v, acc_out, acc_lse):
        cp._forward_step(q, k, v, pairs, acc_out, acc_lse, 0.35, 0.0)
        return acc_out, acc_lse

    def fresh():
        return torch.zeros(1, 8, 4, 8), torch.full((1, 4, 8), NEG_INF)
    eager = step(q, k, v, *fresh())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, *fresh())
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_equals_attention(one_rank_group):
    gen = torch.Generator().manual_seed(1)
    q, k, v = _randn(gen, 2, 6, 4, 8), _randn(gen, 2, 6, 2, 8), _randn(gen, 2, 6, 2, 8)
    for fn in (cp.ring_attention, cp.all_gather_attention):
        out, lse = fn(q, k, v, causal=True, window=(3, -1), return_lse=True)
        want, want_lse = attnkit.attention(q, k, v, causal=True, window=(3, -1), return_lse=True)
        assert_close(out, want, TOL)
        assert_lse_close(lse, want_lse, TOL)


def test_bad_input(one_rank_group):
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.ring_attention(q, k, k, layout="striped")
    with pytest.raises(ValueError, match="zigzag layout holds 2 equal chunks"):
        cp.ring_attention(q[:, :3], k[:, :3], k[:, :3])
    with pytest.raises(ValueError, match="local seqlen 4, but zigzag sharding"):
        cp.all_gather_attention(q, k, k, seqlen=9)
    with pytest.raises(ValueError, match="q heads"):
        cp.ring_attention(torch.randn(1, 4, 3, 8), k, k)
    with pytest.raises(ValueError, match="k must have q's batch, local seqlen"):
        cp.ring_attention(q, k[:, :2], k[:, :2])
    with pytest.raises(ValueError, match="seqlen must be None or an int"):
        cp.ring_attention(q, k, k, seqlen=-1)
    with pytest.raises(ValueError, match="window"):
        cp.ring_attention(q, k, k, window=(-2, 0))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        cp.ring_attention_varlen(q[0], k[0], k[0], torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="local seqlen 4, but contiguous sharding"):
        cp.ring_attention_varlen(q[0], k[0], k[0], cu_seqlens([3]), layout="contiguous")
    with pytest.raises(ValueError, match="query_rank must be"):
        cp.sharded_decode(q[:, :1], k, k, torch.tensor([4], dtype=torch.int32), query_rank=1)
    with pytest.raises(ValueError, match="rank must be an int in"):
        cp.shard_sequence(q, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an int"):
        cp.padded_seqlen(5, 0)


def test_not_initialized_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        cp.ring_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
