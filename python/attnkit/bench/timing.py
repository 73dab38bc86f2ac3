"""How attnkit.bench times things, and the device ceilings it measures first.

Method (docs/benchmarking.md):
- warm-up calls first (module load, autotuning, torch.compile, allocator growth stay out);
- several input buffer sets, rotated call after call, so a case whose inputs would fit in
  the cache does not time the cache (on CUDA: enough sets to exceed 3x the L2);
- CPU: time.perf_counter around every call; CUDA: a pair of CUDA events around every
  call (eager), or around the replay of a CUDA graph holding many calls (small, launch-bound
  ops: decode, merge), divided by the calls it holds;
- the median of the samples is the result; min, max and the quartiles are the spread.
"""
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class TimingConfig:
    target_s: float = 0.5   # time spent on the timed samples of one measurement
    warmup_s: float = 0.15  # at least this much warm-up (and at least 2 calls)
    min_reps: int = 5
    max_reps: int = 200
    graph_ms: float = 2.0   # a CUDA graph holds enough calls to run about this long


@dataclass
class Stat:
    """Milliseconds per call: median and spread over `n` samples; `mode` says how they were
    taken (perf_counter, events, graph)."""
    median: float
    lo: float
    hi: float
    q1: float
    q3: float
    n: int
    mode: str

    def spread(self):
        return f"{self.lo:.4g}-{self.hi:.4g}"


def _stat(samples, mode):
    samples = sorted(samples)
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
    else:
        q1, q3 = samples[0], samples[-1]
    return Stat(statistics.median(samples), samples[0], samples[-1], q1, q3, len(samples), mode)


def _reps(cfg, est_ms):
    est_ms = max(est_ms, 1e-4)
    return int(min(cfg.max_reps, max(cfg.min_reps, cfg.target_s * 1e3 / est_ms)))


def measure(fns, device, cfg, graph=False):
    """Times the zero-argument callables `fns` (one per rotated input buffer set; they are
    called in turn). Returns a Stat in milliseconds per call. Exceptions propagate (the
    first warm-up call is where a missing kernel or an unsupported peer raises)."""
    if device == "cpu":
        return _measure_cpu(fns, cfg)
    if graph:
        try:
            return _measure_cuda_graph(fns, cfg)
        except Exception as err:  # capture not possible (host sync, ...): time eagerly instead
            torch.cuda.synchronize()
            print(f"    note: CUDA graph capture failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                  f"timing eagerly", flush=True)
    return _measure_cuda_eager(fns, cfg)


def _measure_cpu(fns, cfg):
    n, last = 0, 0.0
    start = time.perf_counter()
    while n < 2 or (time.perf_counter() - start < cfg.warmup_s and n < 50):
        t = time.perf_counter()
        fns[n % len(fns)]()
        last = time.perf_counter() - t
        n += 1
    samples = []
    for i in range(_reps(cfg, last * 1e3)):
        t = time.perf_counter()
        fns[i % len(fns)]()
        samples.append((time.perf_counter() - t) * 1e3)
    return _stat(samples, "perf_counter")


def _cuda_warmup(fns, cfg):
    """Warm-up calls; returns the time of the last round of calls, per call (ms)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    rounds = 0
    while rounds < 2 or (time.perf_counter() - start < cfg.warmup_s and rounds < 20):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for f in fns:
            f()
        t1.record()
        torch.cuda.synchronize()
        rounds += 1
    return t0.elapsed_time(t1) / len(fns)


def _measure_cuda_eager(fns, cfg):
    est = _cuda_warmup(fns, cfg)
    reps = _reps(cfg, est)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return _stat([s.elapsed_time(e) for s, e in zip(starts, ends)], "events")


def _measure_cuda_graph(fns, cfg):
    est = _cuda_warmup(fns, cfg)
    # Side-stream warm-up, as torch.cuda.graphs recommends before a capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    per_set = max(1, math.ceil(cfg.graph_ms / max(est * len(fns), 1e-4)))
    inner = len(fns) * min(per_set, max(1, 400 // len(fns)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fns[i % len(fns)]()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    reps = _reps(cfg, est * inner)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    stat = _stat([s.elapsed_time(e) / inner for s, e in zip(starts, ends)], f"graph x{inner}")
    del graph
    return stat


def rotation(device, bytes_per_set, max_sets=8):
    """How many input buffer sets to rotate so that together they exceed the cache:
    3x the L2 on CUDA, 4x a 32 MB last-level cache on the CPU."""
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
        threshold = 3 * l2
    else:
        threshold = 128 << 20
    return int(min(max_sets, max(1, math.ceil(threshold / max(bytes_per_set, 1)))))


@dataclass
class Ceilings:
    matmul_tflops: float
    matmul_desc: str
    copy_gbps: float
    copy_desc: str

    def describe(self):
        return (f"matmul {self.matmul_tflops:.4g} TFLOP/s ({self.matmul_desc}); "
                f"copy {self.copy_gbps:.4g} GB/s ({self.copy_desc})")


def measure_ceilings(device, quick=False):
    """The device's own ceilings, measured: a large matrix product (CPU: fp32 2048^3 through
    torch.mm; CUDA: bf16 8192^3) and a large copy (CPU: 256 MB; CUDA: 1 GiB device to
    device), counting bytes read plus bytes written. Random data, never zeros."""
    cfg = TimingConfig(target_s=0.3 if quick else 0.6, warmup_s=0.1, min_reps=5, max_reps=50)
    gen_device = "cuda" if device == "cuda" else "cpu"
    if device == "cuda":
        n, dtype, copy_elems = 8192, torch.bfloat16, 1 << 28  # float32: 1 GiB
    else:
        n, dtype, copy_elems = 2048, torch.float32, 1 << 26   # float32: 256 MiB
    a = torch.randn(n, n, device=gen_device, dtype=dtype)
    b = torch.randn(n, n, device=gen_device, dtype=dtype)
    c = torch.empty(n, n, device=gen_device, dtype=dtype)
    mm = measure([lambda: torch.mm(a, b, out=c)], device, cfg)
    tflops = 2 * n ** 3 / (mm.median * 1e-3) / 1e12
    del a, b, c
    src = torch.rand(copy_elems, device=gen_device)
    dst = torch.empty_like(src)
    cp = measure([lambda: dst.copy_(src)], device, cfg)
    nbytes = 2 * src.numel() * src.element_size()
    gbps = nbytes / (cp.median * 1e-3) / 1e9
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    dname = str(dtype).replace("torch.", "")
    return Ceilings(tflops, f"{dname} {n}^3 torch.mm, median {mm.median:.3g} ms of {mm.n}",
                    gbps, f"{nbytes / 2 / 2**20:.0f} MiB copy_, read+write bytes, median {cp.median:.3g} ms of {cp.n}")


_COMPILERS = {"cc1plus", "nvcc", "cicc", "ptxas", "cudafe++"}


def compile_running():
    """Names of compiler processes running on this machine (CPU timings taken while a build
    runs are not worth keeping)."""
    found = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name in _COMPILERS:
            found.add(name)
    return found


class CpuMonitor:
    """CPU time used by other processes while this one runs (Linux /proc): the machine's busy
    time minus this process's own, so a report can say whether its CPU timings were shared."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            busy = (sum(vals[:8]) - vals[3] - vals[4]) / tick  # all but idle and iowait (steal included)
            own = (int(fields[11]) + int(fields[12])) / tick   # utime + stime of this process
            return busy, own, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def others(self):
        """(core-seconds used by other processes, wall seconds) since start or the last call."""
        now = self._read()
        if now is None or self.start is None:
            return None
        (b0, o0, t0), (b1, o1, t1) = self.start, now
        return max(0.0, (b1 - b0) - (o1 - o0)), t1 - t0


def others_busy_now(interval=0.5):
    """Cores' worth of CPU used by other processes over a short sleep (None off Linux)."""
    mon = CpuMonitor()
    time.sleep(interval)
    got = mon.others()
    return None if got is None else got[0] / got[1]
