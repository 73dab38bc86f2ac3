"""Outputs of a benchmark run: the printed markdown table, --json rows (DESIGN.md's
format), --md report with header and reproduction commands, --plot bar chart."""
import json
import os
import platform
import subprocess

import torch

FAMILY_ORDER = ("prefill", "paged_prefill", "score_mods", "decode", "merge", "neighborhood", "block_sparse")


def git_commit():
    """Short commit of the checkout attnkit is imported from (else of the cwd), or "unknown";
    $ATTNKIT_COMMIT overrides it (a tree copied without .git, as on the GPU machine).
    Returns (commit, working tree has uncommitted changes)."""
    if os.environ.get("ATTNKIT_COMMIT"):
        return os.environ["ATTNKIT_COMMIT"], False
    here = os.path.dirname(os.path.abspath(__file__))
    for cwd in (here, os.getcwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
                return out.stdout.strip(), bool(dirty)
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown", False


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table_lines(rows):
    """Markdown tables, one per family, with a 'vs <peer>' column per peer (peer_ms /
    attnkit_ms: above 1 means attnkit is faster)."""
    lines = []
    for fam in FAMILY_ORDER + tuple(sorted({r.family for r in rows} - set(FAMILY_ORDER))):
        frows = [r for r in rows if r.family == fam]
        if not frows:
            continue
        peers = []
        for r in frows:
            peers += [p for p in r.vs if p not in peers]
        rate = "TFLOP/s" if fam in ("prefill", "paged_prefill", "neighborhood", "block_sparse") else "GB/s"
        floors = any(r.floor_ms is not None for r in frows)
        head = ["#", "case", "dtype", "shape", "ms (median)", "min-max ms", rate, "% of ceiling", "max_rel_err"]
        head += ["floor ms", "% of floor"] if floors else []
        head += [f"vs {p}" for p in peers]
        lines.append(f"### {fam}")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for r in frows:
            idx = rows.index(r) + 1
            val = r.tflops if fam in ("prefill", "paged_prefill", "neighborhood", "block_sparse") else r.gbps
            cells = [str(idx), r.case, r.dtype, r.shape_str, f"{r.stat.median:.4g}", r.stat.spread(),
                     _fmt(val, ".4g"), _fmt(r.pct_of_ceiling, ".1f"), _fmt(r.max_rel_err, ".2e")]
            cells += [_fmt(r.floor_ms, ".4g"), _fmt(r.pct_of_floor, ".1f")] if floors else []
            cells += [f"{r.vs[p]:.2f}x" if p in r.vs else "-" for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def print_report(runner, header):
    print()
    for line in header:
        print(line)
    print()
    for line in table_lines(runner.rows):
        print(line)
    if runner.skipped:
        print(f"skipped ({len(runner.skipped)}):")
        for what, why in runner.skipped:
            print(f"  {what}: {why}")
    if runner.unexpected:
        print(f"errors ({len(runner.unexpected)}):")
        for what, why in runner.unexpected:
            print(f"  {what}: {why}")


def header_lines(runner, devname, commit, dirty, date, argv):
    c = runner.ceilings
    lines = [f"attnkit benchmark: device {devname}"
             + (f" ({cpu_model()}, {torch.get_num_threads()} threads)" if runner.device == "cpu" else ""),
             f"commit {commit}{' (working tree has uncommitted changes)' if dirty else ''}; torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if runner.device == "cuda" else "") + f"; {date}",
             f"ceilings (measured in this run): {c.describe()}",
             f"command: {argv}",
             "ms: median per call; min-max: spread of the samples; vs <peer>: peer_ms / attnkit_ms "
             "(> 1: attnkit faster); % of ceiling: TFLOP/s over the matmul ceiling (prefill) or GB/s "
             "over the copy ceiling (decode: KV bytes read; merge: bytes read + written); neighborhood: % of "
             "the speed of light (dense attnkit.attention time x fraction of tile pairs holding a neighbour); "
             "block_sparse: % of the speed of light (dense causal attnkit.attention time x kept fraction of the "
             "causal pairs); "
             "max_rel_err: largest relative L2 error vs attnkit.reference (float64) over the outputs "
             "(and gradients), on what the JSON shape's err_on says."]
    if runner.device == "cpu":
        cpu_note = f"load average at start (1/5/15 min): {runner.loadavg}"
        if runner.busy_start is not None:
            cpu_note += f"; other processes used {runner.busy_start:.2f} cores just before the run"
        if runner.busy_during is not None:
            cpu_note += f" and {runner.busy_during:.2f} cores on average during it"
        lines.append(cpu_note)
        if max(runner.busy_start or 0, runner.busy_during or 0) > 0.2:
            lines.append("WARNING: other processes shared the CPU during this benchmark: CPU timings are unreliable")
        busy = runner.compilers_seen
        if busy:
            lines.append(f"WARNING: a compiler ({', '.join(sorted(busy))}) ran during this benchmark: "
                         "CPU timings are unreliable")
    return lines


def write_json(path, runner, devname, commit):
    rows = [r.to_json(devname, commit) for r in runner.rows]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def write_md(path, runner, header):
    lines = ["# attnkit benchmark", ""]
    lines += [f"- {h}" for h in header]
    lines.append("")
    lines += table_lines(runner.rows)
    if runner.rows:
        lines += ["## Reproduce a row", ""]
        for i, r in enumerate(runner.rows, 1):
            lines.append(f"{i}. `{r.cmd}`  ")
            extra = f"timing: {r.stat.mode}, {r.stat.n} samples, IQR {r.stat.q1:.4g}-{r.stat.q3:.4g} ms"
            if r.peer_ms:
                extra += "; peers' median ms: " + ", ".join(f"{p} {ms:.4g}" for p, ms in r.peer_ms.items())
            if r.shape.get("err_on"):
                extra += f"; error on: {r.shape['err_on']}"
            lines.append(f"   {extra}")
        lines.append("")
    if runner.skipped:
        lines += ["## Skipped", ""] + [f"- {what}: {why}" for what, why in runner.skipped] + [""]
    if runner.unexpected:
        lines += ["## Errors", ""] + [f"- {what}: {why}" for what, why in runner.unexpected] + [""]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def write_plot(path, runner, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not importable in this Python, so no plot was written to {path} "
              f"(pip install matplotlib, or read the table / JSON)")
        return False
    rows = [r for r in runner.rows if r.vs]
    if not rows:
        print("--plot: no row has a peer to compare with; no plot written")
        return False
    peers = []
    for r in rows:
        peers += [p for p in r.vs if p not in peers]
    width = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows) + 2), 6))
    for j, p in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i, r in enumerate(rows) if p in r.vs]
        ys = [r.vs[p] for r in rows if p in r.vs]
        # Bars grow from 1.0 (parity), up when attnkit is faster, down when slower.
        bars = ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=p)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                        va="bottom" if y >= 1 else "top", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    lo = min(min(r.vs.values()) for r in rows)
    hi = max(max(r.vs.values()) for r in rows)
    ax.set_ylim(min(lo, 1.0) / 1.3, max(hi, 1.0) * 1.3)
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("peer ms / attnkit ms  (> 1: attnkit faster)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.family}/{r.case}\n{r.dtype} {r.shape_str}" for r in rows], rotation=70, ha="right",
                       fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")
    return True
