"""Analytical roofline of the benchmark cases: the FLOPs each case must do, the bytes it
must move at least (every input read once, every output written once), and the time floor
max(FLOPs / matmul ceiling, bytes / copy ceiling) on a device.

`python -m attnkit.bench --roofline` adds the floor and each row's fraction of it to a
measured run (floors from the ceilings measured in that run); where no GPU is present it
prints the floors of the CUDA cases on an H100 SXM without timing anything (ceilings from a
committed H100 report under bench/results/ when one has them, else the datasheet's).
Formulas and hand counts: docs/performance.md; tests: tests/test_roofline.py.
"""
import glob
import os
import re
from dataclasses import dataclass

# H100 SXM5 datasheet figures, used only while no committed H100 report has measured ones.
H100_DATASHEET_TFLOPS = 989.0  # dense bf16 / fp16 tensor-core
H100_DATASHEET_GBPS = 3350.0  # HBM3
LSE_BYTES = 4  # float32 log-sum-exp per query row and head
SCALE_BYTES = 4  # float32 scale / zero of the quantized formats (python/attnkit/quant.py)


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float

    def floor_ms(self, tflops, gbps):
        return 1e3 * max(self.flops / (tflops * 1e12), self.bytes / (gbps * 1e9))

    def bound(self, tflops, gbps):
        return "compute" if self.flops / (tflops * 1e12) >= self.bytes / (gbps * 1e9) else "memory"


@dataclass(frozen=True)
class DeviceCeilings:
    name: str
    tflops: float
    gbps: float
    source: str


# -- work of each op ------------------------------------------------------------------------
def visible_pairs(seqlen_q, seqlen_k, causal):
    """(query, key) pairs attention computes; causal is bottom-right aligned (query i sees
    keys <= i + seqlen_k - seqlen_q)."""
    if not causal:
        return seqlen_q * seqlen_k
    shift = seqlen_k - seqlen_q
    return sum(min(seqlen_k, max(0, i + shift + 1)) for i in range(seqlen_q))


def prefill_work(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, backward, elt):
    """Forward: 2 matmuls (S = QK^T, O = PV), 2 FLOPs per multiply-add; backward: 5 more
    (recomputed S, dV, dP, dQ, dK), so forward + backward = 3.5x the forward. Bytes: forward
    reads Q, K, V and writes O and LSE; backward reads Q, K, V, O, dO, LSE and writes dQ, dK, dV."""
    pairs = batch * heads_q * visible_pairs(seqlen_q, seqlen_k, causal)
    fwd_flops = 4.0 * pairs * head_dim
    q_side = batch * seqlen_q * heads_q * head_dim * elt  # Q, O, dO, dQ: one each
    kv_side = batch * seqlen_k * heads_kv * head_dim * elt  # K, V, dK, dV: one each
    lse = batch * heads_q * seqlen_q * LSE_BYTES
    fwd_bytes = 2 * q_side + 2 * kv_side + lse
    if not backward:
        return Work(fwd_flops, fwd_bytes)
    bwd_bytes = 4 * q_side + 4 * kv_side + lse
    return Work(3.5 * fwd_flops, fwd_bytes + bwd_bytes)


def _decode_flops(batch, seqlen_q, heads_q, keys, head_dim):
    return 4.0 * batch * seqlen_q * heads_q * keys * head_dim


def _q_and_out_bytes(batch, seqlen_q, heads_q, head_dim, elt):
    return 2 * batch * seqlen_q * heads_q * head_dim * elt


def _lengths_and_table_bytes(batch, context, page_size):
    """int32 cache_seqlens, and a paged cache's block table entries (int32 per page)."""
    return 4 * batch + (4 * batch * -(-context // page_size) if page_size else 0)


def decode_work(batch, seqlen_q, context, heads_q, heads_kv, head_dim, elt, page_size=None):
    """Every key and value of every sequence read once, q read, out written, cache_seqlens and
    the block table of a paged cache."""
    kv = 2 * batch * context * heads_kv * head_dim * elt
    return Work(_decode_flops(batch, seqlen_q, heads_q, context, head_dim),
                kv + _q_and_out_bytes(batch, seqlen_q, heads_q, head_dim, elt)
                + _lengths_and_table_bytes(batch, context, page_size))


def sparse_decode_work(batch, seqlen_q, heads_q, heads_kv, head_dim, pages_kept, page_size, elt,
                       pipeline_pages=0):
    """sparse_decode over pages_kept pages per (sequence, kv head): their K and V, the page
    indices, cache_seqlens, q and out. pipeline_pages > 0 adds what page_scores + select_pages
    must move for that many pages per sequence: the block table row, float32 key_min and
    key_max (per page, kv head and channel), the scores written and read back."""
    keys = pages_kept * page_size
    kv = 2 * batch * heads_kv * keys * head_dim * elt
    indices = 4 * batch * heads_kv * pages_kept + 4 * batch * pipeline_pages + 4 * batch
    selection = batch * pipeline_pages * heads_kv * (2 * head_dim * 4 + 2 * 4)
    # scoring: 4 FLOPs per (query head, page, channel): q * key_min, q * key_max, their max, the sum
    score_flops = 4.0 * batch * seqlen_q * heads_q * pipeline_pages * head_dim
    return Work(_decode_flops(batch, seqlen_q, heads_q, keys, head_dim) + score_flops,
                kv + indices + selection + _q_and_out_bytes(batch, seqlen_q, heads_q, head_dim, elt))


def quant_bytes_per_token(kv_format, head_dim, group_size=None):
    """Bytes of one token of one kv head of K (or V) in a quantized cache: the codes (one byte
    per channel; int4 two channels per byte), a float32 scale per group, and a float32 zero
    per group for int8 / int4 (fp8 e4m3 has none). group_size None: one group per row."""
    codes = head_dim // 2 if kv_format == "int4" else head_dim
    groups = head_dim // (group_size or head_dim)
    per_group = SCALE_BYTES if kv_format == "fp8_e4m3" else 2 * SCALE_BYTES
    return codes + groups * per_group


def quant_decode_work(batch, seqlen_q, context, heads_q, heads_kv, head_dim, kv_format, group_size, q_elt,
                      page_size=None):
    token = 2 * heads_kv * quant_bytes_per_token(kv_format, head_dim, group_size)  # K and V
    return Work(_decode_flops(batch, seqlen_q, heads_q, context, head_dim),
                batch * context * token + _q_and_out_bytes(batch, seqlen_q, heads_q, head_dim, q_elt)
                + _lengths_and_table_bytes(batch, context, page_size))


def merge_work(batch, seqlen, heads, head_dim, elt):
    """Two partial outputs and LSEs read, one written; per element 2 multiply-adds, per row a
    few exp / log (counted as 8 FLOPs)."""
    out, lse = batch * seqlen * heads * head_dim, batch * seqlen * heads
    return Work(4.0 * out + 8.0 * lse, 3 * out * elt + 3 * lse * LSE_BYTES)


def _axis_pairs(length, kernel_size, dilation, stride, causal):
    """Visible (query, key) pairs along one axis, NATTEN's rule (reference.neighborhood_axis_mask)
    counted per query in O(length) instead of building the length x length mask."""
    pairs = 0
    for x in range(length):
        group, i = x % dilation, x // dilation
        n = (length - group + dilation - 1) // dilation
        if causal:
            leader = min(i // stride * stride + stride - 1, n - 1)
            pairs += i - max(0, leader - kernel_size + 1) + 1
        else:
            before, after = kernel_size // 2, kernel_size - 1 - kernel_size // 2
            centre = max(min(min(i // stride * stride + stride // 2, n - 1), n - 1 - after), before)
            pairs += min(n - 1, centre + after) - max(0, centre - before) + 1
    return pairs


def neighborhood_pairs(spatial, kernel_size, dilation=1, stride=1, causal=False):
    """Visible (query token, key token) pairs of an N-D neighbourhood: the product over axes."""
    rank = len(spatial)
    per_axis = [(v,) * rank if isinstance(v, int) else tuple(v)
                for v in (kernel_size, dilation, stride, causal)]
    pairs = 1
    for length, ks, dil, st, cau in zip(spatial, *per_axis):
        pairs *= _axis_pairs(length, ks, dil, st, cau)
    return pairs


def neighborhood_work(batch, spatial, heads, head_dim, pairs, elt):
    tokens = 1
    for n in spatial:
        tokens *= n
    return Work(4.0 * batch * heads * head_dim * pairs, 4 * batch * tokens * heads * head_dim * elt)


_ELT = {"float32": 4, "float16": 2, "bfloat16": 2}


def work_of(family, case, dtype, shape):
    """The Work of a benchmark row, from the fields its family puts in the shape dict."""
    elt = _ELT[dtype]
    s = shape
    if family == "prefill":
        return prefill_work(s["batch"], s["seqlen_q"], s["seqlen_k"], s["heads_q"], s["heads_kv"], s["head_dim"],
                            s["causal"], case.startswith("fwd_bwd"), elt)
    if family == "decode":
        return decode_work(s["batch"], s["seqlen_q"], s["context"], s["heads_q"], s["heads_kv"], s["head_dim"], elt,
                           s.get("page_size"))
    if family == "sparse":
        pipeline = s["context"] // s["page_size"] if case == "pipeline" else 0
        return sparse_decode_work(s["batch"], s["seqlen_q"], s["heads_q"], s["heads_kv"], s["head_dim"],
                                  s["pages_kept"], s["page_size"], elt, pipeline)
    if family == "quant":
        return quant_decode_work(s["batch"], s["seqlen_q"], s["context"], s["heads_q"], s["heads_kv"], s["head_dim"],
                                 s["kv_format"], s["group_size"], elt, s.get("page_size"))
    if family == "merge":
        return merge_work(s["batch"], s["seqlen"], s["heads"], s["head_dim"], elt)
    if family == "neighborhood":
        pairs = neighborhood_pairs(s["spatial"], s["kernel_size"], s["dilation"], s["stride"], s["is_causal"])
        return neighborhood_work(s["batch"], s["spatial"], s["heads"], s["head_dim"], pairs, elt)
    if family == "block_sparse":  # causal: kept fraction of the seqlen * (seqlen + 1) / 2 pairs per head
        pairs = s["kept_fraction"] * s["seqlen"] * (s["seqlen"] + 1) / 2
        return Work(4.0 * s["batch"] * s["heads"] * s["head_dim"] * pairs,
                    2 * s["batch"] * s["seqlen"] * (s["heads"] + s["kv_heads"]) * s["head_dim"] * elt)
    raise ValueError(f"family must be one of prefill, decode, sparse, quant, merge, neighborhood, block_sparse, "
                     f"got {family!r}")


# -- H100 ceilings ----------------------------------------------------------------------------
_RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench", "results")
_CEILINGS_LINE = re.compile(r"matmul ([\d.]+) TFLOP/s.*copy ([\d.]+) GB/s")


def h100_ceilings(results_dir=_RESULTS):
    """Ceilings of an H100 SXM ("H100 80GB HBM3" to torch): measured ones from the newest
    committed report under bench/results/ whose md names that GPU, else the datasheet's."""
    for path in sorted(glob.glob(os.path.join(results_dir, "*.md")), reverse=True):
        with open(path) as f:
            text = f.read()
        device = re.search(r"device ([^\n(]*)", text)
        if not device or "H100" not in device.group(1) or re.search(r"PCIe|NVL", device.group(1)):
            continue
        found = _CEILINGS_LINE.search(text)
        if found:
            return DeviceCeilings(device.group(1).strip(), float(found.group(1)), float(found.group(2)),
                                  f"measured, {os.path.basename(path)}")
    return DeviceCeilings("NVIDIA H100 SXM", H100_DATASHEET_TFLOPS, H100_DATASHEET_GBPS,
                          f"datasheet figures: {H100_DATASHEET_TFLOPS:g} TFLOP/s dense bf16, "
                          f"{H100_DATASHEET_GBPS / 1000:g} TB/s HBM3; no committed H100 report has measured ones")


# -- the analytical table ---------------------------------------------------------------------
def cuda_cases(families_module, names, quick=False):
    """(family, case, dtype, shape_str, shape) of the CUDA benchmark cases of the families
    `names`, with the shape fields their rows carry, built from the same config lists."""
    fm = families_module
    page = fm.PAGE
    dname = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    for family in names:
        if family == "prefill":
            for c in fm.prefill_configs("cuda", quick):
                shape = dict(batch=c["B"], seqlen_q=c["S"], seqlen_k=c["S"], heads_q=c["H"], heads_kv=c["Hkv"],
                             head_dim=c["D"])
                for d in ("fwd", "fwd_bwd"):
                    for causal in (False, True):
                        yield (family, d + ("_causal" if causal else ""), dname(c["dtype"]),
                               fm._prefill_shape_str(c), dict(shape, causal=causal))
        elif family == "decode":
            for c in fm.decode_configs("cuda", quick):
                shape = dict(batch=c["B"], seqlen_q=1, context=c["ctx"], heads_q=32, heads_kv=8, head_dim=128)
                shape_str = f"B{c['B']} ctx{c['ctx']} Hq32 Hkv8 D128"
                yield family, "contiguous", dname(c["dtype"]), shape_str, shape
                yield family, f"paged{page}", dname(c["dtype"]), f"{shape_str} page{page}", dict(shape, page_size=page)
        elif family == "sparse":
            for c in fm.sparse_configs("cuda", quick):
                keep = c["ctx"] // page // fm.SPARSE_FRACTION
                shape = dict(batch=c["B"], seqlen_q=1, context=c["ctx"], heads_q=32, heads_kv=8, head_dim=128,
                             page_size=page, pages_kept=keep)
                shape_str = f"B{c['B']} ctx{c['ctx']} Hq32 Hkv8 D128 page{page} keep1/{fm.SPARSE_FRACTION}"
                for case in ("sparse_decode", "pipeline"):
                    yield family, case, dname(c["dtype"]), shape_str, shape
        elif family == "quant":
            for c in fm.quant_configs("cuda", quick):
                for fmt, gs, rot in fm.QUANT_FORMATS:
                    shape = dict(batch=c["B"], seqlen_q=1, context=c["ctx"], heads_q=32, heads_kv=8, head_dim=128,
                                 page_size=page, kv_format=fmt, group_size=gs)
                    yield (family, f"decode_{fmt}{'_g' + str(gs) if gs else ''}{'_rot' if rot else ''}", "bfloat16",
                           f"B{c['B']} ctx{c['ctx']} Hq32 Hkv8 D128 page{page}", shape)
        elif family == "merge":
            for B, S, H, D, dtype in fm.merge_configs("cuda", quick):
                yield family, "merge", dname(dtype), f"B{B} S{S} H{H} D{D}", dict(batch=B, seqlen=S, heads=H,
                                                                                   head_dim=D)
        elif family == "neighborhood":
            for name, B, spatial, H, D, ks, dil, st, causal in fm.neighborhood_configs("cuda", quick):
                shape = dict(batch=B, spatial=list(spatial), heads=H, head_dim=D, kernel_size=ks, dilation=dil,
                             stride=st, is_causal=causal)
                yield (family, name, "bfloat16", f"B{B} {'x'.join(map(str, spatial))} H{H} D{D} k{ks} d{dil} s{st}",
                       shape)


def analytical_lines(cases, ceilings):
    """Markdown: one table of floors over all cases on the device `ceilings` describes."""
    lines = [f"Roofline floors on {ceilings.name} (nothing timed): ceilings {ceilings.tflops:g} TFLOP/s, "
             f"{ceilings.gbps:g} GB/s ({ceilings.source}).",
             "floor = max(FLOPs / matmul ceiling, minimal bytes / copy ceiling); minimal bytes: every input read "
             "once, every output written once (docs/performance.md).", "",
             "| family | case | dtype | shape | GFLOP | MB moved | FLOP/byte | floor ms | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, case, dtype, shape_str, shape in cases:
        w = work_of(family, case, dtype, shape)
        lines.append(f"| {family} | {case} | {dtype} | {shape_str} | {w.flops / 1e9:.4g} | {w.bytes / 1e6:.4g} "
                     f"| {w.flops / w.bytes:.3g} | {w.floor_ms(ceilings.tflops, ceilings.gbps):.4g} "
                     f"| {w.bound(ceilings.tflops, ceilings.gbps)} |")
    return lines


def annotate(row, ceilings):
    """Sets row.floor_ms and row.pct_of_floor (floor / measured time) from the run's ceilings,
    and records the work in the row's shape dict (so the JSON carries it)."""
    w = work_of(row.family, row.case, row.dtype, row.shape)
    row.floor_ms = w.floor_ms(ceilings.matmul_tflops, ceilings.copy_gbps)
    row.pct_of_floor = 100.0 * row.floor_ms / row.stat.median
    row.shape = dict(row.shape, roofline={"flops": w.flops, "bytes": w.bytes, "floor_ms": row.floor_ms,
                                          "bound": w.bound(ceilings.matmul_tflops, ceilings.copy_gbps)})
