"""The state of one benchmark run: options, ceilings, the rows measured so far, and the
helpers every family uses (case selection, the time budget, timing an implementation
with the skip rules, relative errors)."""
import math
import shlex
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import roofline
from .timing import TimingConfig, compile_running, measure


@dataclass
class Row:
    """One benchmark row. `to_json` gives exactly the fields of DESIGN.md's "Benchmark
    output"; the rest (spread, peers' own times, timing mode, the command) goes to the
    printed and markdown tables."""
    family: str
    case: str
    dtype: str
    shape: dict
    stat: object  # timing.Stat of attnkit
    tflops: float = None
    gbps: float = None
    pct_of_ceiling: float = None
    max_rel_err: float = None
    vs: dict = field(default_factory=dict)        # peer -> peer_ms / attnkit_ms
    peer_ms: dict = field(default_factory=dict)   # peer -> median ms
    shape_str: str = ""
    id: str = ""
    cmd: str = ""
    floor_ms: float = None      # --roofline: analytical time floor on this run's ceilings
    pct_of_floor: float = None  # ... and floor_ms / ms in percent

    def to_json(self, device, commit):
        err, shape = self.max_rel_err, self.shape
        if err is not None and not math.isfinite(err):  # keep the file strict JSON
            err = None
            shape = dict(shape, err_on=f"{shape.get('err_on', '')} (error not finite: {self.max_rel_err})")
        return {"family": self.family, "case": self.case, "device": device, "commit": commit,
                "dtype": self.dtype, "shape": shape, "ms": self.stat.median, "tflops": self.tflops,
                "gbps": self.gbps, "pct_of_ceiling": self.pct_of_ceiling, "max_rel_err": err,
                "vs": self.vs}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def rel_err(x, ref):
    """Relative L2 error ||x - ref|| / ||ref|| in float64, on ref's device."""
    x = x.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    finite = torch.isfinite(ref)
    if not bool(finite.all()):  # lse of fully masked rows: -inf must match -inf
        if not bool((x[~finite] == ref[~finite]).all()):
            return float("inf")
        x, ref = x[finite], ref[finite]
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


class Runner:
    def __init__(self, args, device, ceilings, commit):
        self.args = args
        self.device = device
        self.ceilings = ceilings
        self.commit = commit
        self.quick = args.quick
        self.rows = []
        self.skipped = []      # (id or peer, reason)
        self.unexpected = []   # errors that point at a bug in the bench or in attnkit
        self.start = time.perf_counter()
        self.only = [s for s in (args.only or "").split(",") if s]
        self.on_row = None     # callback(runner) after each row (incremental reports)
        if device == "cuda":
            self.timing = TimingConfig(target_s=0.15 if args.quick else 0.3, warmup_s=0.05, min_reps=10,
                                       max_reps=200)
        else:
            self.timing = TimingConfig(target_s=0.15 if args.quick else 0.5, warmup_s=0.1,
                                       min_reps=3 if args.quick else 5, max_reps=100)
        self._noted = set()
        self.compilers_seen = set()
        self.loadavg = "unknown"  # set by main() before anything runs
        self.busy_start = None    # cores used by other processes just before the run (CPU)
        self.busy_during = None   # ... on average during the run

    # -- selection and budget -------------------------------------------------------
    def selected(self, case_id):
        return not self.only or any(tok in case_id for tok in self.only)

    def over_budget(self):
        return self.args.budget_s is not None and time.perf_counter() - self.start > self.args.budget_s

    def repro(self, family, case_id):
        cmd = ["python", "-m", "attnkit.bench", "--device", self.device, "--family", family]
        if self.quick:
            cmd.append("--quick")
        if self.device == "cpu":
            cmd += ["--threads", str(torch.get_num_threads())]
        cmd += ["--only", case_id]
        return " ".join(shlex.quote(c) for c in cmd)

    def skip(self, what, reason):
        self.skipped.append((what, reason))
        print(f"  {what}: skipped: {reason}", flush=True)

    def note_once(self, key, msg):
        if key not in self._noted:
            self._noted.add(key)
            print(f"    note: {msg}", flush=True)

    # -- timing ---------------------------------------------------------------------
    def time_attnkit(self, case_id, fns, graph=False):
        """Times attnkit's fns; a missing kernel (NotImplementedError / RuntimeError, CUDA
        out of memory included) skips the case. Returns a Stat or None."""
        try:
            fns[0]()
            return measure(fns, self.device, self.timing, graph=graph)
        except (NotImplementedError, RuntimeError) as err:
            self.skip(case_id, f"attnkit: {type(err).__name__}: {_first_line(err)}")
        except Exception as err:  # a bug: report it, go on with the other cases
            self.unexpected.append((case_id, f"{type(err).__name__}: {_first_line(err)}"))
            print(f"  {case_id}: ERROR (attnkit): {type(err).__name__}: {_first_line(err)}", flush=True)
        self.free()
        return None

    def time_peer(self, case_id, peer, make_fns, graph=False):
        """Times a peer; a missing or failing peer is skipped with a note (nothing recorded).
        `make_fns` builds the callables (it may raise when the peer is missing)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fns = make_fns()
                t = time.perf_counter()
                fns[0]()
                if self.device == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t
                stat = measure(fns, self.device, self.timing, graph=graph)
            return stat, first_s
        except Exception as err:
            print(f"    note: peer {peer} skipped for {case_id}: {type(err).__name__}: {_first_line(err)}",
                  flush=True)
            self.skipped.append((f"{case_id} [{peer}]", f"{type(err).__name__}: {_first_line(err)}"))
            self.free()
            return None, 0.0

    def free(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- rows -----------------------------------------------------------------------
    def add_row(self, row, peer_stats):
        for peer, st in peer_stats.items():
            if st is not None:
                row.vs[peer] = st.median / row.stat.median
                row.peer_ms[peer] = st.median
        row.cmd = self.repro(row.family, row.id)
        if self.args.roofline:
            roofline.annotate(row, self.ceilings)
        if self.device == "cpu":
            busy = compile_running()
            if busy and not busy <= self.compilers_seen:
                print(f"  WARNING: compiler running ({', '.join(sorted(busy))}): CPU timings unreliable", flush=True)
            self.compilers_seen |= busy
        self.rows.append(row)
        err = "n/a" if row.max_rel_err is None else f"{row.max_rel_err:.2e}"
        rate = f"{row.tflops:.3g} TFLOP/s" if row.tflops is not None else f"{row.gbps:.3g} GB/s"
        vs = ", ".join(f"{p} {v:.2f}x" for p, v in row.vs.items()) or "no peers"
        floor = f", {row.pct_of_floor:.1f}% of floor {row.floor_ms:.4g} ms" if row.floor_ms is not None else ""
        print(f"  {row.id}: {row.stat.median:.4g} ms [{row.stat.spread()}] {rate} "
              f"({row.pct_of_ceiling:.1f}% of ceiling{floor}) err {err}; vs {vs}", flush=True)
        if self.on_row is not None:
            self.on_row(self)


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""
