"""Context parallelism over torch.distributed: attention over a sequence sharded across ranks.

Communication is Python (torch.distributed P2P and collectives: gloo on the CPU, NCCL on
CUDA); all arithmetic is attnkit's own ops (attention_fwd / attention_bwd, decode,
merge_attention_states). docs/context_parallel.md has the design; in short:

- ring_attention: K/V shards travel around the ring (rank r sends to r + 1, receives from
  r - 1; the next exchange is posted before the current block is computed), partial results
  merged by log-sum-exp. Backward: K/V travel again, each shard's dK/dV accumulator travels
  with it and ends at its owner; dQ stays local. Deterministic (fixed order of every sum).
- all_gather_attention: K/V all-gathered once, one local attention per query chunk;
  backward reduce-scatters dK/dV (K/V are gathered again rather than kept).
- *_varlen: packed sequences, each one sharded with the same layout rule.
- sharded_decode: decode over a KV cache whose tokens are spread over the ranks.
- shard_sequence / unshard_sequence / padded_seqlen: the layouts and the padding rule.

Layouts: "contiguous" cuts a sequence into R chunks, rank r holds chunk r; "zigzag" cuts it
into 2R chunks, rank r holds chunks r and 2R - 1 - r (balances causal work). A sequence
whose length is not a multiple of the chunk count is padded at its end to one
(padded_seqlen); padding rows see no key and are seen by none (out 0, lse -inf, no gradient).
"""
import contextlib
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _checks
from ._ops import ops
from .decode import decode

__all__ = ["ring_attention", "all_gather_attention", "ring_attention_varlen", "all_gather_attention_varlen",
           "sharded_decode", "shard_sequence", "unshard_sequence", "padded_seqlen", "pair_block", "PairBlock",
           "LAYOUTS", "comm_stats", "reset_comm_stats", "record_steps"]

LAYOUTS = ("zigzag", "contiguous")
_UNBOUNDED = 1 << 62
_TAG_KV, _TAG_DKV = 7001, 7002  # gloo matches P2P messages by tag; NCCL by issue order (the same here)


# ------------------------------------------------------------------------------------------
# the per-pair mask offset rule


class PairBlock(NamedTuple):
    """The visible part of a (query range, key range) pair: rows q_lo:q_hi of the query range,
    keys k_lo:k_hi of the key range, and the (left, right) window that, given to a local
    bottom-right aligned attention call on exactly those rows and keys, reproduces the global
    mask."""
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    left: int
    right: int


def pair_block(q_start, q_len, k_start, k_len, left, right, seqlen):
    """Re-expresses the global mask of one shard pair for attnkit's local call.

    Queries at global positions q_start + i (0 <= i < q_len), keys at k_start + j, in one
    sequence of seqlen real tokens (positions >= seqlen are padding: they neither see nor are
    seen). Globally (self-attention, so the diagonal is j == i in global positions) key j is
    visible to query i iff lo <= j - i <= hi in local indices, with d = q_start - k_start,
    lo = d - left and hi = d + right (an unbounded side, -1, drops its bound); causal is right 0.

    attnkit's call with Sq rows and Sk keys sees exactly Sk - Sq - L <= j - i <= Sk - Sq + R
    (bottom-right alignment), and needs L, R >= 0 (or -1: unbounded). Trimming keys or rows at
    the *end* of the block moves Sk - Sq, so the rule trims exactly the rows and keys no pair
    can see: rows i < -hi or i > n - 1 - lo, keys j < q_lo + lo or j >= q_hi + hi. After that
    Sk - Sq lies in [lo, hi] and L = (Sk - Sq) - lo, R = hi - (Sk - Sq) are >= 0 (proof in
    docs/context_parallel.md). Returns a PairBlock, or None when no query sees any key (the pair
    is skipped: no kernel call)."""
    m = max(0, min(q_len, seqlen - q_start))  # padding rows and keys at the end are cut off
    n = max(0, min(k_len, seqlen - k_start))
    if m == 0 or n == 0:
        return None
    d = q_start - k_start
    lo = d - left if left >= 0 else -_UNBOUNDED
    hi = d + right if right >= 0 else _UNBOUNDED
    q_lo, q_hi = max(0, -hi), min(m, n - lo)
    if q_lo >= q_hi:
        return None
    k_lo, k_hi = max(0, q_lo + lo), min(n, q_hi + hi)
    if k_lo >= k_hi:
        return None
    shift = q_lo - k_lo                     # j' - i' = (j - i) + shift in the trimmed block
    diag = (k_hi - k_lo) - (q_hi - q_lo)    # the local call's bottom-right diagonal
    wl = diag - (lo + shift) if left >= 0 else -1
    wr = (hi + shift) - diag if right >= 0 else -1
    return PairBlock(q_lo, q_hi, k_lo, k_hi, wl, wr)


# ------------------------------------------------------------------------------------------
# layouts, padding and the segment tables


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def padded_seqlen(seqlen, world_size, layout="zigzag"):
    """The length a sequence of `seqlen` tokens is padded to (at its end) before sharding: the
    next multiple of 2 * world_size (zigzag) or world_size (contiguous). Each rank holds
    padded_seqlen // world_size rows of it."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    chunks = _check_layout(layout) * world_size
    if not isinstance(seqlen, int) or seqlen < 0:
        raise ValueError(f"seqlen must be an int >= 0, got {seqlen!r}")
    return -(-seqlen // chunks) * chunks


class _Seg(NamedTuple):
    """A run of local rows [offset, offset + length) holding positions [start, start + length)
    of sequence `seq`."""
    offset: int
    length: int
    start: int
    seq: int


def _rank_segments(rank, world, layout, lengths):
    """The segments of rank `rank`'s local rows: for each sequence (real length in `lengths`,
    padded by padded_seqlen) its one (contiguous) or two (zigzag) chunks, sequences in order."""
    segs, offset = [], 0
    for b, length in enumerate(lengths):
        n = padded_seqlen(length, world, layout) // world
        if layout == "contiguous":
            runs = [(rank * n, n)]
        else:
            c = n // 2
            runs = [(rank * c, c), ((2 * world - 1 - rank) * c, c)]
        for start, size in runs:
            if size:
                segs.append(_Seg(offset, size, start, b))
            offset += size
    return segs


def _local_len(world, layout, lengths):
    return sum(padded_seqlen(n, world, layout) // world for n in lengths)


def _source_rows(world, layout, lengths):
    """For every row of the rank-major concatenation of all shards (rank 0's rows, then rank
    1's, ...): its index in the unpadded packed sequence (sequence b starts at sum(lengths[:b])),
    or -1 for a padding row. One map serves shard, unshard and the all-gather path's reorder."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    local = _local_len(world, layout, lengths)
    src = torch.full((world * local,), -1, dtype=torch.long)
    for r in range(world):
        for s in _rank_segments(r, world, layout, lengths):
            pos = torch.arange(s.start, s.start + s.length)
            rows = r * local + s.offset + torch.arange(s.length)
            real = pos < lengths[s.seq]
            src[rows[real]] = pos[real] + starts[s.seq]
    return src


def _unpadded_order(src):
    """Rank-major row of each unpadded packed position (the inverse of _source_rows)."""
    valid = (src >= 0).nonzero().squeeze(1)
    inv = torch.empty(int(valid.numel()), dtype=torch.long)
    inv[src[valid]] = valid
    return inv


def _seq_lengths(cu_seqlens, what="cu_seqlens"):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{what} must be a 1-D tensor of batch + 1 offsets, got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must be int32 (or int64), got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()  # host read: the varlen plan is built on the host (not graph-capturable)
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{what} must start at 0 and be non-decreasing, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:])]


def _resolve_dim(dim, varlen):
    return (0 if varlen else 1) if dim is None else dim


def shard_sequence(x, rank, world_size, *, layout="zigzag", dim=None, cu_seqlens=None):
    """This rank's shard of the global tensor x along `dim`.

    Dense (cu_seqlens None): x holds one sequence per batch row along dim (default 1, the
    (batch, seqlen, ...) layout); varlen: x packs the sequences of cu_seqlens (global, unpadded)
    along dim (default 0). Each sequence is padded with zeros at its end to
    padded_seqlen(length, world_size, layout) and cut into chunks: contiguous, rank r takes
    chunk r of world_size; zigzag, chunks r and 2 * world_size - 1 - r of 2 * world_size.
    A varlen shard packs the sequences' shards in sequence order. Differentiable (an
    index_select). For an lse (batch, heads, seqlen) pass dim=2, for (heads, tokens) dim=1."""
    padded_seqlen(0, world_size, layout)  # checks world_size and layout
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size = {world_size}), got {rank!r}")
    _checks.check_tensor(x, "x")
    dim = _resolve_dim(dim, cu_seqlens is not None) % x.dim()
    lengths = [x.shape[dim]] if cu_seqlens is None else _seq_lengths(cu_seqlens)
    if cu_seqlens is not None and sum(lengths) != x.shape[dim]:
        raise ValueError(f"x must have cu_seqlens[-1] = {sum(lengths)} rows along dim {dim}, got {x.shape[dim]}")
    src = _source_rows(world_size, layout, lengths)
    local = src.numel() // world_size
    idx = src[rank * local:(rank + 1) * local].clone()
    idx[idx < 0] = x.shape[dim]  # padding reads an appended row of zeros
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    x_ext = torch.cat([x, x.new_zeros(pad_shape)], dim)
    return x_ext.index_select(dim, idx.to(x.device))


def unshard_sequence(shards, *, layout="zigzag", group=None, dim=None, seqlen=None, cu_seqlens=None):
    """The global tensor from its shards, padding removed: the inverse of shard_sequence.

    shards: the list of every rank's shard (rank order), or this rank's shard alone, which is
    then all-gathered over `group` (a collective: every rank of the group must call it; the
    result is not differentiable). Dense: seqlen is the real global length (default: all
    rows, i.e. no padding); varlen: cu_seqlens (global, unpadded) gives the lengths."""
    _check_layout(layout)
    if isinstance(shards, torch.Tensor):
        _require_dist("unshard_sequence")
        world = dist.get_world_size(group)
        local = shards.contiguous()
        gathered = local.new_empty((world, *local.shape))
        _wait([_all_gather(gathered, local, group)], "unshard_sequence", dist.get_rank(group), world,
              "all-gather of the shards")
        shards = list(gathered.unbind(0))
    if not isinstance(shards, (list, tuple)) or not shards or not all(isinstance(s, torch.Tensor) for s in shards):
        raise ValueError("shards must be a tensor (this rank's shard) or a non-empty list of every rank's shard")
    world = len(shards)
    dim = _resolve_dim(dim, cu_seqlens is not None) % shards[0].dim()
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards must all have one shape, got {[tuple(s.shape) for s in shards]}")
    local = shards[0].shape[dim]
    if cu_seqlens is not None:
        lengths = _seq_lengths(cu_seqlens)
    else:
        lengths = [world * local if seqlen is None else seqlen]
    if _local_len(world, layout, lengths) != local:
        raise ValueError(f"shards have {local} rows along dim {dim}, but {layout} sharding of lengths {lengths} over "
                         f"{world} ranks gives {_local_len(world, layout, lengths)} (check seqlen / cu_seqlens)")
    order = _unpadded_order(_source_rows(world, layout, lengths))
    return torch.cat(list(shards), dim).index_select(dim, order.to(shards[0].device))


# ------------------------------------------------------------------------------------------
# communication: the only place that talks to torch.distributed


@dataclass
class CommStats:
    """Bytes this process sent and received through attnkit.distributed since the last
    reset_comm_stats(). P2P: the message sizes; collectives: the volume of the ring algorithm
    (all-gather: (R - 1) shards each way; reduce-scatter: (R - 1) / R of the input)."""
    sent_bytes: int = 0
    recv_bytes: int = 0
    messages: int = 0


comm_stats = CommStats()


def reset_comm_stats():
    comm_stats.sent_bytes = comm_stats.recv_bytes = comm_stats.messages = 0


_STEP_LOG = []  # stack of active record_steps() logs


@contextlib.contextmanager
def record_steps():
    """Records, for every ring step of every call inside the block, a dict {"op", "step",
    "compute_s", "wait_s"}: seconds computing the block in hand, then seconds still waiting for
    the next shard (the part of communication the compute did not hide). For benchmarks; on
    CUDA it synchronizes around each part, which costs the overlap it measures."""
    log = []
    _STEP_LOG.append(log)
    try:
        yield log
    finally:
        _STEP_LOG.remove(log)


def _now(device):
    if _STEP_LOG and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _log_step(op, step, compute_s, wait_s):
    for log in _STEP_LOG:
        log.append({"op": op, "step": step, "compute_s": compute_s, "wait_s": wait_s})


def _require_dist(op):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"attnkit.distributed.{op}: torch.distributed is not initialized: call "
                           f"torch.distributed.init_process_group first (gloo on the CPU, NCCL on CUDA)")


def _global_rank(group, rank):
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _collective(names, out, inp, moved_bytes, group):
    """Posts the async collective dist.<first of `names` this torch has> on flat views (gloo's
    form) and counts `moved_bytes` each way (the ring algorithm's volume)."""
    fn = next(getattr(dist, name) for name in names if hasattr(dist, name))
    comm_stats.sent_bytes += moved_bytes
    comm_stats.recv_bytes += moved_bytes
    comm_stats.messages += 1
    return fn(out.view(-1), inp.contiguous().view(-1), group=group, async_op=True)


def _all_gather(out, inp, group):
    return _collective(("all_gather_single", "all_gather_into_tensor"), out, inp, (out.shape[0] - 1) * inp.nbytes,
                       group)


def _reduce_scatter(out, inp, group):
    return _collective(("reduce_scatter_single", "reduce_scatter_tensor"), out, inp,
                       (inp.shape[0] - 1) * out.nbytes, group)


def _wait(works, op, rank, world, what):
    """Waits on async works; a peer that failed (connection closed) or stayed silent past the
    process group's timeout (init_process_group(timeout=...)) raises here, with context."""
    for w in works:
        try:
            w.wait()
        except RuntimeError as err:
            raise RuntimeError(
                f"attnkit.distributed.{op}: rank {rank} of {world}: {what} failed: a peer rank failed or did not "
                f"answer within the process group's timeout. Cause: {err}") from err


@dataclass
class _Plan:
    """What one call computes on this rank: the group, the segment tables, the mask options."""
    op: str
    group: object
    rank: int
    world: int
    layout: str
    lengths: list     # real length of each sequence
    segs: list        # this rank's segments (rows of q, and of its own K/V shard)
    left: int
    right: int
    scale: float
    softcap: float

    @property
    def next_rank(self):
        return _global_rank(self.group, (self.rank + 1) % self.world)

    @property
    def prev_rank(self):
        return _global_rank(self.group, (self.rank - 1) % self.world)

    def segments_of(self, rank):
        return self.segs if rank == self.rank else _rank_segments(rank, self.world, self.layout, self.lengths)

    def pairs(self, k_segs):
        """(query rows, key rows, left, right) of every visible block between this rank's
        query segments and the key segments `k_segs` (same sequence only)."""
        out = []
        for qs in self.segs:
            for ks in k_segs:
                if ks.seq != qs.seq:
                    continue
                blk = pair_block(qs.start, qs.length, ks.start, ks.length, self.left, self.right,
                                 self.lengths[qs.seq])
                if blk is not None:
                    out.append((slice(qs.offset + blk.q_lo, qs.offset + blk.q_hi),
                                slice(ks.offset + blk.k_lo, ks.offset + blk.k_hi), blk.left, blk.right))
        return out

    def route(self):
        return (f"(to rank {(self.rank + 1) % self.world}, from rank {(self.rank - 1) % self.world} "
                f"of the group)")

    def exchange(self, send, recv, tag):
        """Posts send -> rank + 1 and recv <- rank - 1; returns the works (not waited)."""
        p2p = [dist.P2POp(dist.isend, send, self.next_rank, group=self.group, tag=tag),
               dist.P2POp(dist.irecv, recv, self.prev_rank, group=self.group, tag=tag)]
        comm_stats.sent_bytes += send.nbytes
        comm_stats.recv_bytes += recv.nbytes
        comm_stats.messages += 1
        return dist.batch_isend_irecv(p2p)

    def wait(self, works, what):
        _wait(works, self.op, self.rank, self.world, what)


# ------------------------------------------------------------------------------------------
# the local steps (pure tensor code: attnkit ops only, no communication)


def _forward_step(q, k, v, pairs, acc_out, acc_lse, scale, softcap):
    """Attends q's rows to the key blocks of `pairs` and merges each result by LSE into the
    float32 accumulators acc_out (B, L, H, D) and acc_lse (B, H, L), in place."""
    for rows, cols, left, right in pairs:
        o, lse = ops.attention_fwd(q[:, rows], k[:, cols], v[:, cols], None, None, 0, 0, False, scale, left, right,
                                   softcap)
        o, lse = ops.merge_attention_states(acc_out[:, rows], acc_lse[:, :, rows], o.to(acc_out.dtype), lse)
        acc_out[:, rows] = o
        acc_lse[:, :, rows] = lse


def _backward_step(dout, q, k, v, out, lse, grad_lse, pairs, dq, dk, dv, scale, softcap):
    """Adds the gradients of the blocks of `pairs` to the float32 accumulators dq, dk, dv. With
    the global out and lse (merged over every key block), attention_bwd of one block gives
    exactly its part: P = exp(s - lse), delta = rowsum(dout * out) (+ grad_lse)."""
    for rows, cols, left, right in pairs:
        glse = None if grad_lse is None else grad_lse[:, :, rows]
        dq_b, dk_b, dv_b = ops.attention_bwd(dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows],
                                             lse[:, :, rows], None, None, 0, 0, False, scale, left, right, softcap,
                                             glse)
        dq[:, rows] += dq_b
        dk[:, cols] += dk_b
        dv[:, cols] += dv_b


# ------------------------------------------------------------------------------------------
# ring and all-gather drivers


def _accumulators(q):
    """float32 (out, lse) of rows that have seen no key yet: (0, -inf), merge's identity."""
    return (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
            torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device))


def _ring_forward(q, kv, plan):
    acc_out, acc_lse = _accumulators(q)
    cur = kv
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        works, nxt = [], None
        if step + 1 < plan.world:  # post the next exchange first: it flies while we compute
            nxt = torch.empty_like(cur)
            works = plan.exchange(cur, nxt, _TAG_KV)
        t0 = _now(q.device)
        _forward_step(q, cur[0], cur[1], plan.pairs(plan.segments_of(src)), acc_out, acc_lse, plan.scale,
                      plan.softcap)
        t1 = _now(q.device)
        plan.wait(works, f"ring step {step}: passing K/V shards {plan.route()}")
        _log_step(plan.op + ".fwd", step, t1 - t0, _now(q.device) - t1)
        cur = nxt
    return acc_out, acc_lse


def _ring_backward(dout, grad_lse, q, kv, out, lse, plan):
    """K/V go around the ring again; the float32 dK/dV accumulator of each shard travels one
    exchange behind it (posted once this rank added its part) and, after world_size hops,
    reaches the shard's owner. dQ stays local."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cur, dkv_in, dkv_send, d_works = kv, None, None, []
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        works, nxt = [], None
        if step + 1 < plan.world:
            nxt = torch.empty_like(cur)
            works = plan.exchange(cur, nxt, _TAG_KV)
        t0 = _now(q.device)
        dkv = torch.zeros(cur.shape, dtype=torch.float32, device=q.device)
        _backward_step(dout, q, cur[0], cur[1], out, lse, grad_lse, plan.pairs(plan.segments_of(src)), dq, dkv[0],
                       dkv[1], plan.scale, plan.softcap)
        t1 = _now(q.device)
        if step > 0:  # the accumulator of this shard, from the ranks that held it before
            plan.wait(d_works, f"backward ring step {step}: passing dK/dV accumulators {plan.route()}")
            dkv = dkv_in + dkv
        if plan.world > 1:  # dkv_send holds the buffer until its send is waited on (NCCL reads it late)
            dkv_send, dkv_in = dkv, torch.empty_like(dkv)
            d_works = plan.exchange(dkv_send, dkv_in, _TAG_DKV)
        plan.wait(works, f"backward ring step {step}: passing K/V shards {plan.route()}")
        _log_step(plan.op + ".bwd", step, t1 - t0, _now(q.device) - t1)
        cur = nxt
    if plan.world > 1:
        plan.wait(d_works, f"backward: returning the dK/dV accumulators to their owners {plan.route()}")
        dkv = dkv_in
    return dq, dkv


def _gather_kv(kv, plan):
    """All-gathers the K/V shards and reorders them into each sequence's unpadded global order:
    (2, B, total, Hkv, D), sequence b at rows sum(lengths[:b]):... ."""
    gathered = kv.new_empty((plan.world, *kv.shape))
    plan.wait([_all_gather(gathered, kv, plan.group)], "all-gather of the K/V shards")
    rank_major = gathered.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # (2, B, R * L, Hkv, D)
    order = _unpadded_order(_source_rows(plan.world, plan.layout, plan.lengths)).to(kv.device)
    return rank_major.index_select(2, order)


def _global_segments(plan):
    """The key segments of the gathered, unpadded K/V: one per sequence, whole."""
    segs, offset = [], 0
    for b, n in enumerate(plan.lengths):
        if n:
            segs.append(_Seg(offset, n, 0, b))
        offset += n
    return segs


def _gather_forward(q, kv, plan):
    acc_out, acc_lse = _accumulators(q)
    kv_all = _gather_kv(kv, plan)
    _forward_step(q, kv_all[0], kv_all[1], plan.pairs(_global_segments(plan)), acc_out, acc_lse, plan.scale,
                  plan.softcap)
    return acc_out, acc_lse


def _gather_backward(dout, grad_lse, q, kv, out, lse, plan):
    kv_all = _gather_kv(kv, plan)  # gathered again: keeping it would hold world_size x the K/V memory
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_all = torch.zeros(kv_all.shape, dtype=torch.float32, device=q.device)
    _backward_step(dout, q, kv_all[0], kv_all[1], out, lse, grad_lse, plan.pairs(_global_segments(plan)), dq,
                   dkv_all[0], dkv_all[1], plan.scale, plan.softcap)
    # back to rank-major rows (padding rows get 0), then (R, 2, B, L, Hkv, D) for the reduce-scatter
    src = _source_rows(plan.world, plan.layout, plan.lengths).to(q.device)
    zero_row = dkv_all.new_zeros((*dkv_all.shape[:2], 1, *dkv_all.shape[3:]))
    rank_major = torch.cat([dkv_all, zero_row], 2).index_select(2, torch.where(src < 0, dkv_all.shape[2], src))
    send = rank_major.unflatten(2, (plan.world, kv.shape[2])).permute(2, 0, 1, 3, 4, 5).contiguous()
    dkv = torch.empty(kv.shape, dtype=torch.float32, device=q.device)
    plan.wait([_reduce_scatter(dkv, send, plan.group)], "reduce-scatter of dK/dV")
    return dq, dkv


_DRIVERS = {"ring": (_ring_forward, _ring_backward), "all_gather": (_gather_forward, _gather_backward)}


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, kind):
        kv = torch.stack([k, v])  # one contiguous buffer: one message per ring step
        acc_out, lse = _DRIVERS[kind][0](q, kv, plan)
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.plan, ctx.kind = plan, kind
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, kv, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dkv = _DRIVERS[ctx.kind][1](dout, grad_lse, q, kv, out, lse, ctx.plan)
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None


# ------------------------------------------------------------------------------------------
# public API


def _plan(op, q, k, v, lengths, group, causal, scale, window, softcap, layout):
    _require_dist(op)
    _check_layout(layout)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.check_tensor(t, name)
    _checks.require_kernel("attention", q)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{op}: q, k, v must be (batch, local_seqlen, heads, head_dim) with v shaped like k, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k must have q's batch, local seqlen and head_dim (self-attention over one sharded "
                         f"sequence), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % max(k.shape[2], 1) != 0 or k.shape[2] == 0:
        raise ValueError(f"{op}: q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]})")
    left, right = _checks.resolve_window(window)
    if causal:
        right = 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{op}: this process is not a member of group")
    want = _local_len(world, layout, lengths)
    if q.shape[1] != want:
        raise ValueError(
            f"{op}: q has local seqlen {q.shape[1]}, but {layout} sharding of sequence lengths {lengths[:8]}"
            f"{'...' if len(lengths) > 8 else ''} over a group of {world} ranks gives {want} (each sequence padded to "
            f"a multiple of {_check_layout(layout) * world}: see padded_seqlen / shard_sequence)")
    return _Plan(op, group, rank, world, layout, lengths, _rank_segments(rank, world, layout, lengths), left, right,
                 _checks.resolve_scale(scale, q), _checks.resolve_softcap(softcap))


def _dense(kind, op, q, k, v, group, causal, scale, window, softcap, layout, seqlen, return_lse):
    _require_dist(op)
    chunks = _check_layout(layout)
    world = dist.get_world_size(group)
    if seqlen is None:
        _checks.check_tensor(q, "q")
        if q.dim() >= 2 and q.shape[1] % chunks:
            raise ValueError(f"{op}: q has local seqlen {q.shape[1]}; the zigzag layout holds 2 equal chunks per rank, "
                             f"so it must be even (or pass seqlen=, the real global length, with padding)")
        seqlen = q.shape[1] * world if q.dim() >= 2 else 0
    elif not isinstance(seqlen, int) or seqlen < 0:
        raise ValueError(f"{op}: seqlen must be None or an int >= 0 (the global length before padding), got {seqlen!r}")
    plan = _plan(op, q, k, v, [seqlen], group, causal, scale, window, softcap, layout)
    out, lse = _ContextParallelAttention.apply(q, k, v, plan, kind)
    return (out, lse) if return_lse else out


def _varlen(kind, op, q, k, v, cu_seqlens, group, causal, scale, window, softcap, layout, return_lse):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.check_tensor(t, name)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"{op}: q, k, v must be (local_tokens, heads, head_dim), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    lengths = _seq_lengths(cu_seqlens)
    plan = _plan(op, q[None], k[None], v[None], lengths, group, causal, scale, window, softcap, layout)
    out, lse = _ContextParallelAttention.apply(q[None], k[None], v[None], plan, kind)
    return (out[0], lse[0]) if return_lse else out[0]


_DENSE_DOC = """

    q (batch, local_seqlen, heads, head_dim), k, v (batch, local_seqlen, kv_heads, head_dim):
    this rank's shard (shard_sequence) of one global self-attention sequence. Options as
    attnkit.attention (causal / window on the global positions). layout: "zigzag" or
    "contiguous". seqlen: the real global length when the sequence was padded (default:
    local_seqlen * world_size, no padding); padding rows get out 0, lse -inf. Differentiable
    in q, k, v through out and lse. Returns out, or (out, lse) with lse (batch, heads,
    local_seqlen), both this rank's shard. A collective over `group`: every rank calls it with
    the same options."""


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, window=(-1, -1), softcap=0.0, layout="zigzag",
                   seqlen=None, return_lse=False):
    return _dense("ring", "ring_attention", q, k, v, group, causal, scale, window, softcap, layout, seqlen,
                  return_lse)


def all_gather_attention(q, k, v, *, group=None, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                         layout="zigzag", seqlen=None, return_lse=False):
    return _dense("all_gather", "all_gather_attention", q, k, v, group, causal, scale, window, softcap, layout,
                  seqlen, return_lse)


ring_attention.__doc__ = ("Ring attention: K/V shards travel around the ring of ranks, partial results merged by "
                          "LSE; backward sends K/V around again with their dK/dV." + _DENSE_DOC)
all_gather_attention.__doc__ = ("Context-parallel attention by one all-gather of K/V and a local attention per "
                                "query chunk; backward reduce-scatters dK/dV." + _DENSE_DOC)

_VARLEN_DOC = """

    q (local_tokens, heads, head_dim), k, v (local_tokens, kv_heads, head_dim): this rank's
    shard of packed sequences, i.e. shard_sequence(x, rank, world_size, layout=layout,
    cu_seqlens=cu_seqlens): each sequence padded at its end to padded_seqlen(length,
    world_size, layout) and sharded like a dense one, the shards packed in sequence order.
    cu_seqlens: int32 (batch + 1,) offsets of the GLOBAL, unpadded sequences (the same on every
    rank; read on the host). lse is (heads, local_tokens). Padding rows: out 0, lse -inf."""


def ring_attention_varlen(q, k, v, cu_seqlens, *, group=None, causal=False, scale=None, window=(-1, -1),
                          softcap=0.0, layout="zigzag", return_lse=False):
    return _varlen("ring", "ring_attention_varlen", q, k, v, cu_seqlens, group, causal, scale, window, softcap,
                   layout, return_lse)


def all_gather_attention_varlen(q, k, v, cu_seqlens, *, group=None, causal=False, scale=None, window=(-1, -1),
                                softcap=0.0, layout="zigzag", return_lse=False):
    return _varlen("all_gather", "all_gather_attention_varlen", q, k, v, cu_seqlens, group, causal, scale, window,
                   softcap, layout, return_lse)


ring_attention_varlen.__doc__ = "ring_attention over packed variable-length sequences." + _VARLEN_DOC
all_gather_attention_varlen.__doc__ = "all_gather_attention over packed variable-length sequences." + _VARLEN_DOC


def _decode_all_visible(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap):
    """decode() in which every one of the seqlen_q queries sees every cached token (no causal
    order among them): the queries are folded into the head axis as one query per row,
    grouped so that folded head kvh * (Sq * G) + s * G + g still reads kv head kvh."""
    B, Sq, Hq, D = q.shape
    Hkv = getattr(k_cache, "data", k_cache).shape[2]
    G = Hq // Hkv
    qf = q.reshape(B, Sq, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, 1, Hkv * Sq * G, D)
    out, lse = decode(qf, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale, softcap=softcap,
                      return_lse=True)
    out = out.reshape(B, Hkv, Sq, G, D).permute(0, 2, 1, 3, 4).reshape(B, Sq, Hq, D)
    lse = lse.reshape(B, Hkv, Sq, G).permute(0, 1, 3, 2).reshape(B, Hq, Sq)
    return out, lse


def sharded_decode(q, k_cache_shard, v_cache_shard, cache_seqlens_shard, *, group=None, block_table=None, scale=None,
                   softcap=0.0, query_rank=None, return_lse=False):
    """Decode against a KV cache whose tokens are spread over the ranks of `group`.

    Every rank holds the same q (batch, seqlen_q, heads, head_dim) and its own part of each
    sequence's cache (contiguous or paged, as attnkit.decode takes it; cache_seqlens_shard
    counts this rank's tokens, possibly 0). Each rank runs attnkit.decode on its part
    (return_lse=True), ONE all-gather exchanges (out, lse), and every rank merges the world_size
    results by LSE in rank order (the same bits everywhere). With seqlen_q = 1 this equals
    decode over all tokens, however they are spread. With seqlen_q > 1 the new tokens (the
    queries' own keys) must be the last seqlen_q tokens of rank `query_rank`'s part (default:
    the last rank): there the queries are causal among themselves, as in decode; every token
    of the other ranks is older and seen by every query. This equals decode over the cache with
    query_rank's part last. No host sync and no data-dependent branching (capturable in a CUDA
    graph). Inference only. Returns out, or (out, lse) with lse (batch, heads, seqlen_q)."""
    _require_dist("sharded_decode")
    _checks.check_tensor(q, "q")
    if q.dim() != 4:
        raise ValueError(f"sharded_decode: q must be (batch, seqlen_q, heads, head_dim), got shape {tuple(q.shape)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    query_rank = world - 1 if query_rank is None else query_rank
    if not isinstance(query_rank, int) or not 0 <= query_rank < world:
        raise ValueError(f"sharded_decode: query_rank must be an int in [0, {world}), got {query_rank!r}")
    hkv = getattr(k_cache_shard, "data", k_cache_shard).shape[2]
    if q.shape[2] % hkv:
        raise ValueError(f"sharded_decode: q heads ({q.shape[2]}) must be a multiple of the cache's kv heads ({hkv})")
    if q.shape[1] == 1 or rank == query_rank:
        out, lse = decode(q, k_cache_shard, v_cache_shard, cache_seqlens_shard, block_table=block_table, scale=scale,
                          softcap=softcap, return_lse=True)
    else:
        out, lse = _decode_all_visible(q, k_cache_shard, v_cache_shard, cache_seqlens_shard, block_table, scale,
                                       softcap)
    # one buffer: out's elements, then lse's float32 bytes viewed in out's dtype (exact)
    n_out = out.numel()
    packed = torch.cat([out.reshape(-1), lse.contiguous().reshape(-1).view(out.dtype)])
    gathered = packed.new_empty((world, packed.numel()))
    _wait([_all_gather(gathered, packed, group)], "sharded_decode", rank, world, "all-gather of (out, lse)")
    res_out, res_lse = None, None
    for r in range(world):
        o = gathered[r, :n_out].view(out.shape)
        lse_r = gathered[r, n_out:].view(torch.float32).view(lse.shape)
        if res_out is None:
            res_out, res_lse = o, lse_r
        else:
            res_out, res_lse = ops.merge_attention_states(res_out, res_lse, o, lse_r)
    return (res_out, res_lse) if return_lse else res_out
