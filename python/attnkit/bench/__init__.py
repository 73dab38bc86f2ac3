"""attnkit's benchmarks: `python -m attnkit.bench [--device cpu|cuda] [--family prefill,decode,sparse,quant,merge,neighborhood,paged_prefill,score_mods,block_sparse,context_parallel]
[--quick] [--json FILE] [--md FILE] [--plot FILE] [--threads N] [--only ID,...] [--budget-s S] [--roofline]`.

It first measures the device's ceilings (a large matrix product, a large copy), then times
each case of each family for attnkit and for every peer present, in the same run, and
checks attnkit's result against attnkit.reference (float64). Method, output format and
peers: docs/benchmarking.md. JSON rows follow DESIGN.md's "Benchmark output". --roofline adds
each row's analytical time floor (roofline.py); on the CPU it prints the floors of the CUDA
cases on an H100 instead, timing nothing.
"""
import argparse
import datetime
import os
import shlex
import sys
import time

__all__ = ["main"]


def _parser():
    p = argparse.ArgumentParser(prog="python -m attnkit.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--family", default="prefill,decode,sparse,quant,merge,neighborhood,paged_prefill,score_mods",
                   help="comma-separated families among prefill, decode, sparse, quant, merge, neighborhood, "
                        "paged_prefill, score_mods (default: these), block_sparse (8k tokens, 4 patterns x 6 densities; only when named), "
                        "context_parallel (spawns 2 gloo processes; only when named)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (make demo)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON (DESIGN.md format)")
    p.add_argument("--md", metavar="FILE", help="write the report as markdown")
    p.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of the ratios vs peers (matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores available)")
    p.add_argument("--only", metavar="ID[,ID...]",
                   help="run only the cases whose id (family/case/dtype/shape, as printed) contains one of these")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget: cases not started within it are skipped (reports stay complete)")
    p.add_argument("--roofline", action="store_true",
                   help="add each row's time floor (FLOPs, minimal bytes, this run's ceilings) and its %% of it; "
                        "with no GPU (--device cpu): print the analytical floors of the CUDA cases on an H100, "
                        "timing nothing")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    argv_str = "python -m attnkit.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    try:
        with open("/proc/loadavg") as f:
            loadavg = " ".join(f.read().split()[:3])
    except OSError:
        loadavg = "unknown"

    import torch

    import attnkit  # noqa: F401  (fails early, with its own message, when the extension is missing)

    from . import families, report, timing
    from .runner import Runner

    fams = [f.strip() for f in args.family.split(",") if f.strip()]
    bad = [f for f in fams if f not in families.FAMILIES]
    if bad:
        print(f"unknown --family {', '.join(bad)}; choose among {', '.join(families.FAMILIES)}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    if args.roofline and device == "cpu":
        from . import roofline
        cases = roofline.cuda_cases(families, fams, quick=args.quick)
        print("\n".join(roofline.analytical_lines(cases, roofline.h100_ceilings())))
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or cores)
    torch.manual_seed(0)

    commit, dirty = report.git_commit()
    devname = report.device_name(device)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    busy_start = monitor = None
    if device == "cpu":
        busy = timing.compile_running()
        if busy:
            print(f"WARNING: a compiler is running ({', '.join(sorted(busy))}): CPU timings will be unreliable",
                  flush=True)
        busy_start = timing.others_busy_now()
        if busy_start is not None and busy_start > 0.2:
            print(f"WARNING: other processes are using {busy_start:.1f} cores of {cores}: CPU timings will be "
                  f"unreliable", flush=True)
        monitor = timing.CpuMonitor()
    print(f"attnkit.bench on {devname}, commit {commit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measuring ceilings...", flush=True)
    ceilings = timing.measure_ceilings(device, quick=args.quick)
    print(f"ceilings: {ceilings.describe()}", flush=True)

    runner = Runner(args, device, ceilings, commit)
    runner.loadavg = loadavg
    runner.busy_start = busy_start

    def write_reports(r):
        header = report.header_lines(r, devname, commit, dirty, date, argv_str)
        if args.json:
            report.write_json(args.json, r, devname, commit)
        if args.md:
            report.write_md(args.md, r, header)
    runner.on_row = write_reports  # incremental: a run cut short still leaves its rows

    for fam in fams:
        print(f"\n== {fam} ==", flush=True)
        families.FAMILIES[fam](runner)

    if monitor is not None:
        got = monitor.others()
        if got is not None:
            runner.busy_during = got[0] / got[1]
    header = report.header_lines(runner, devname, commit, dirty, date, argv_str)
    write_reports(runner)
    report.print_report(runner, header)
    if args.plot:
        report.write_plot(args.plot, runner, f"attnkit vs peers on {devname}, commit {commit}")
    for flag, path in (("--json", args.json), ("--md", args.md)):
        if path:
            print(f"{flag} written to {path}")
    print(f"{len(runner.rows)} rows, {len(runner.skipped)} skipped, {len(runner.unexpected)} errors "
          f"in {time.perf_counter() - t_start:.0f} s")
    return 1 if runner.unexpected else 0
