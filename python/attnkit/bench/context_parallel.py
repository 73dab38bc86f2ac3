"""The context_parallel family: attnkit.distributed over 2 gloo ranks on the CPU.

Spawns 2 processes (1 thread each) once per config; each times its own calls with a fixed
number of repetitions (collectives need every rank to make the same calls), a barrier
before every sample, and rank 0's samples become the rows:
- ring_fwd, ring_fwd_bwd, all_gather_fwd, all_gather_fwd_bwd: one whole call (causal, zigzag);
- ring_{fwd,bwd}_step{s}_compute / _wait: from attnkit.distributed.record_steps, the time of
  ring step s spent computing the block in hand, then still waiting for the next shard (the
  communication the compute did not hide);
- ring_pass_comm: one K/V shard exchange alone (send to rank + 1, receive from rank - 1).
Peer "single_process": attnkit.attention over the whole sequence in one process with as
many threads as there are ranks. max_rel_err: out vs attnkit.reference (float64).
Not run on CUDA (NCCL needs a GPU per rank; untested here): docs/context_parallel.md.
"""
import datetime
import queue
import socket
import time
import traceback

import torch

from .runner import Row, dtype_name
from .timing import _stat

WORLD = 2


def configs(quick):
    return [dict(B=1, S=1024 if quick else 2048, H=4, Hkv=4, D=64, dtype=torch.float32)]


def _shape_str(c):
    return f"B{c['B']} S{c['S']} H{c['H']} Hkv{c['Hkv']} D{c['D']} R{WORLD} causal zigzag"


def _case_names():
    names = ["ring_fwd", "ring_fwd_bwd", "all_gather_fwd", "all_gather_fwd_bwd", "ring_pass_comm"]
    for d in ("fwd", "bwd"):
        for s in range(WORLD):
            names += [f"ring_{d}_step{s}_compute", f"ring_{d}_step{s}_wait"]
    return names


def _timed(fn, reps, warmup, sync=True):
    """Samples in ms; sync: rank-synchronous (a barrier before each call)."""
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if sync:
            dist.barrier()
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _worker(rank, port, c, reps, results):
    try:
        import torch.distributed as dist

        import attnkit
        from attnkit import distributed as cp
        from attnkit import reference
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=120))
        gen = torch.Generator().manual_seed(0)
        B, S, H, Hkv, D, dtype = c["B"], c["S"], c["H"], c["Hkv"], c["D"], c["dtype"]
        q, k, v, dout = (torch.randn(B, S, h, D, generator=gen).to(dtype) for h in (H, Hkv, Hkv, H))
        ql, kl, vl, dl = (cp.shard_sequence(x, rank, WORLD, layout="zigzag") for x in (q, k, v, dout))
        ql, kl, vl = (x.requires_grad_() for x in (ql, kl, vl))
        samples, steps = {}, {}
        for name, fn in (("ring", cp.ring_attention), ("all_gather", cp.all_gather_attention)):
            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(ql, kl, vl, causal=True)

            def fwd_bwd(fn=fn):
                return torch.autograd.grad(fn(ql, kl, vl, causal=True), (ql, kl, vl), dl)
            samples[name + "_fwd"] = _timed(fwd, reps, 2)
            if name == "ring":
                with cp.record_steps() as log:
                    _timed(fwd_bwd, reps, 0)
                for e in log:  # e["op"] is ring_attention.fwd / .bwd
                    d = e["op"].rsplit(".", 1)[1]
                    steps.setdefault(f"ring_{d}_step{e['step']}_compute", []).append(e["compute_s"] * 1e3)
                    steps.setdefault(f"ring_{d}_step{e['step']}_wait", []).append(e["wait_s"] * 1e3)
            samples[name + "_fwd_bwd"] = _timed(fwd_bwd, reps, 1)
        samples.update(steps)
        # one K/V shard exchange alone, through the module's own send path
        kv = torch.stack([kl.detach(), vl.detach()])
        recv = torch.empty_like(kv)
        plan = cp._Plan("bench", None, rank, WORLD, "zigzag", [S], [], -1, 0, 1.0, 0.0)
        samples["ring_pass_comm"] = _timed(lambda: plan.wait(plan.exchange(kv, recv, 1), "bench"), reps, 2)
        with torch.no_grad():
            out = cp.unshard_sequence(cp.ring_attention(ql, kl, vl, causal=True), layout="zigzag")
        extra = {}
        if rank == 0:
            ref = reference.attention(q.double(), k.double(), v.double(), causal=True)[0]
            extra["err"] = ((out.double() - ref).norm() / ref.norm()).item()
            torch.set_num_threads(WORLD)  # the peer gets as many cores as the ranks together
            with torch.no_grad():
                samples["single_process"] = _timed(lambda: attnkit.attention(q, k, v, causal=True), reps, 1,
                                                    sync=False)
            torch.set_num_threads(1)
            extra["kv_shard_bytes"] = kv.nbytes
        dist.barrier()
        if rank == 0:
            results.put(("ok", samples, extra))
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}", None))


def _run_ranks(c, reps, timeout_s=300):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, c, reps, results), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    errors, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status, payload, extra = results.get(timeout=1.0)
        except queue.Empty:
            if any(p.is_alive() for p in procs):
                continue
            errors.append("the ranks exited without a result")
            break
        if status == "ok":
            break
        errors.append(payload)
        if len(errors) == WORLD:
            break
    else:
        errors.append(f"no result within {timeout_s} s")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    if errors:  # the first failing rank's error, not its peers' "connection closed"
        errors.sort(key=lambda e: "Connection closed" in e)
        raise RuntimeError(errors[0])
    return payload, extra


def run_context_parallel(r):
    for c in configs(r.quick):
        dt, shape_str = dtype_name(c["dtype"]), _shape_str(c)
        ids = {name: f"context_parallel/{name}/{dt}/{shape_str}" for name in _case_names()}
        todo = [n for n in _case_names() if r.selected(ids[n])]
        if not todo:
            continue
        if r.device != "cpu":
            for n in todo:
                r.skip(ids[n], "runs on the CPU with gloo only (NCCL needs a GPU per rank; untested here)")
            continue
        if r.args.roofline:
            for n in todo:
                r.skip(ids[n], "no roofline model for context_parallel")
            continue
        if r.over_budget():
            for n in todo:
                r.skip(ids[n], "time budget (--budget-s) spent")
            continue
        print(f"context_parallel: {WORLD} gloo ranks x 1 thread, {shape_str}", flush=True)
        reps = 3 if r.quick else 5
        try:
            samples, extra = _run_ranks(c, reps)
        except Exception as err:
            msg = str(err).strip().splitlines()[-1][:300]
            r.unexpected.append(("context_parallel", msg))
            print(f"  context_parallel: ERROR: {msg}", flush=True)
            continue
        B, S, H, D = c["B"], c["S"], c["H"], c["D"]
        fwd_flops = 4.0 * B * H * S * S * D * 0.5   # causal, whole sequence
        single = _stat(samples["single_process"], "perf_counter")
        for name in todo:
            stat = _stat(samples[name], "perf_counter")
            shape = {"batch": B, "seqlen": S, "heads_q": H, "heads_kv": c["Hkv"], "head_dim": D, "world_size": WORLD,
                     "layout": "zigzag", "causal": True, "backend": "gloo"}
            tflops = gbps = err = None
            peers = {}
            if name.endswith("_wait") or name == "ring_pass_comm":
                gbps = extra["kv_shard_bytes"] / (stat.median * 1e-3) / 1e9 if stat.median > 0 else 0.0
                pct = 100.0 * gbps / r.ceilings.copy_gbps
                shape["bytes"] = extra["kv_shard_bytes"]
            else:
                # a whole call: the global FLOPs; a step: one rank's share (zigzag balances them)
                flops = fwd_flops * (3.5 if "bwd" in name else 1.0) / (WORLD * WORLD if "_step" in name else 1)
                tflops = flops / (stat.median * 1e-3) / 1e12
                pct = 100.0 * tflops / r.ceilings.matmul_tflops
            if name in ("ring_fwd", "all_gather_fwd"):
                peers["single_process"] = single
                err = extra["err"] if name == "ring_fwd" else None
                shape["err_on"] = "out of ring_attention vs reference.attention (float64)"
            r.add_row(Row("context_parallel", name, dt, shape, stat, tflops=tflops, gbps=gbps, pct_of_ceiling=pct,
                          max_rel_err=err, shape_str=shape_str, id=ids[name]), peers)
