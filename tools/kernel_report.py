#!/usr/bin/env python3
"""Static health report of every CUDA kernel in a binary: resources and SASS instruction mix.

    python3 tools/kernel_report.py [BINARY_OR_OBJECT ...]   (default: python/attnkit/_C*.so)

For each kernel of each arch: registers, stack frame, local memory and static shared memory
(`cuobjdump --dump-resource-usage`), then from the SASS (`cuobjdump -sass`) the local-memory
traffic (LDL / STL: spills), tensor-core MMAs (HMMA / HGMMA), global load widths (LDG),
cp.async widths (LDGSTS) and FP64 instructions. Prints a markdown table, then the problems.
Local-memory instructions are also counted inside loops (between a backward branch and its
target): a hot kernel's mainloop must have none, whatever KNOWN_EXCEPTIONS excuses.

Exit status: 0 clean; 1 when a hot kernel has local-memory traffic or lacks an instruction
its family requires, or any kernel has FP64 instructions, or a KNOWN_EXCEPTIONS entry is no
longer needed by the kernels it names; 2 when cuobjdump / c++filt, the binary or any CUDA
kernel in it cannot be found.
Python 3 standard library only.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- what each kernel family must contain ------------------------------------------------
# Requirement names, each a test on a kernel's instruction counts.
REQUIREMENTS = {
    "mma": ("tensor-core MMA (HMMA or HGMMA)", lambda k: k.hmma + k.hgmma > 0),
    "cp.async.128": ("128-bit cp.async (LDGSTS ... .128)", lambda k: k.ldgsts[128] > 0),
    "load.128": ("128-bit global loads of K/V (LDG.E.128 or LDGSTS .128)",
                 lambda k: k.ldg[128] + k.ldgsts[128] > 0),
}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # regex searched in the demangled full signature
    hot: bool  # hot kernels fail the report on local-memory traffic or a missing requirement
    requires: tuple[str, ...] = ()


# First match wins. Order matters where patterns overlap (the two merge kernels).
FAMILIES = (
    Family("prefill fwd", r"\bfwd_kernel<.*PrefillMask", True, ("mma", "cp.async.128")),
    Family("neighborhood fwd", r"\bfwd_kernel<.*NeighborhoodMask", True, ("mma", "cp.async.128")),
    Family("neighborhood bwd main", r"\bbwd_main_kernel<.*NeighborhoodBwdMask", True, ("mma", "cp.async.128")),
    Family("block-sparse fwd", r"\bfwd_kernel<.*BlockSparseMask", True, ("mma", "cp.async.128")),
    Family("block-sparse bwd main", r"\bbwd_main_kernel<.*BlockSparseBwdMask", True, ("mma", "cp.async.128")),
    Family("block lists", r"\b(canonical|transpose)_kernel\(", False),
    Family("prefill bwd main", r"\bbwd_main_kernel<", True, ("mma", "cp.async.128")),
    Family("prefill bwd rows", r"\bbwd_rows_kernel<", False),
    Family("prefill bwd dq", r"\bbwd_dq_kernel<", False),
    Family("decode lean", r"\blean_kernel<", True, ("load.128",)),
    Family("decode merge", r"\bmerge_kernel<.*\(attnkit::DecodeParams", False),
    Family("decode offsets", r"\b(offsets|pair_keys)_kernel\(", False),
    Family("merge states", r"\bmerge_kernel<.*\(attnkit::MergeParams", False),
    Family("paged append", r"\bappend_kernel<", False),
    Family("page select", r"\b(page_scores|select_pages)_kernel\b", False),
    Family("quant", r"\b(quantize|dequantize)_kernel<", False),
)
OTHER = Family("other", "", False)


@dataclasses.dataclass(frozen=True)
class KnownException:
    """A hot kernel allowed to break one rule. For "local" the excuse holds only while the
    kernel's stack frame stays within `stack_bytes_at_most` and its LDL / STL inside loops
    within `in_loops_at_most` (default none: prologue / epilogue traffic only): a larger frame
    or more local traffic in the mainloop fails again."""
    pattern: str  # regex searched in the short kernel name
    rule: str  # "local" (LDL / STL traffic) or a requirement name
    reason: str
    stack_bytes_at_most: int = 0
    in_loops_at_most: int = 0
    arch: str = ""  # "sm_80", ...: only kernels compiled for this arch ("" = any arch)

    def covers(self, kernel):
        return re.search(self.pattern, kernel.name) and self.arch in ("", kernel.arch)


# Each reason states what the build for its arch holds (tools/kernel_report.py output in
# docs/performance.md); ptxas allocates per arch, so sm_80 and sm_90a have entries of their
# own. An entry no kernel needs any more fails the report: remove it.
KNOWN_EXCEPTIONS = (
    KnownException(
        r"^fwd_kernel<FwdConfigFor<\w+, 256>, PrefillMask<64, 32>, false>$", "local",
        "prefill fwd hdim256 (64 x 32 tiles): 255 registers, 24 B stack, 5 LDL / 4 STL, 3 inside "
        "the mainloop (L1 hits, per 32-key tile of 64 x 32 x 256 x 2 MMAs): the sink-tile walk "
        "and ALiBi slope of PrefillMask (issue 24) took the registers of values the kernel kept "
        "before (8 B, none inside). The row-wise instantiation of the same head_dim, which holds "
        "the same policy, is spill-free (247 registers): compile-time mask variants (issue 17) "
        "are the fix to try.", 24, 3, arch="sm_90a"),
    KnownException(
        r"^fwd_kernel<FwdConfigFor<\w+, 64>, PrefillMask<128, 64>, false>$", "local",
        "prefill fwd hdim64 (128 x 64 tiles, 4 warps, 32 query rows per warp): 255 registers, 48 B "
        "stack, 10 LDL / 7 STL of which 7 inside the mainloop (L1 hits, per 64-key tile; 56 B and 14 "
        "LDL / 8 STL before issue 24's mask changes, 5 inside before the window clamp of attnkit/mask.h). Spill-free alternatives compiled here: 128 x 64 with "
        "8 warps (178 registers) and 64 x 64 with 4 (229, the neighbourhood kernel's); both give "
        "each warp 16 query rows instead of 32, so every ldmatrix of K / V feeds half the MMAs and "
        "shared-memory reads per FLOP double. Which is faster needs a GPU.",
        56, 7, arch="sm_90a"),
    KnownException(
        r"^fwd_kernel<FwdConfig<\w+, 128, 64, 64, 4>, NeighborhoodMask<64, 64>, false>$", "local",
        "neighborhood fwd hdim128 (64 x 64 tiles): 255 registers, 16 B stack, 4 LDL / 4 STL, none "
        "inside the mainloop.", 16, arch="sm_90a"),
    KnownException(
        r"^bwd_main_kernel<BwdConfigFor<\w+, 256>, PrefillBwdMask<64, 64>>$", "local",
        "prefill bwd hdim256 (64 x 64 tiles, 8 warps): 255 registers, 16 B stack, 4 LDL / 4 STL, 3 "
        "inside the loop over query blocks (dK and dV accumulators of a 256-wide head fill the "
        "registers; the third since the mask policy holds sink tokens and ALiBi, issue 24).",
        16, 3, arch="sm_90a"),
    # sm_80 (ptxas for Ampere, same sources; compiled with `make test ATTNKIT_CUDA_ARCHS=80` or
    # the default build where a GPU is present; counts from the build of 2026-12-03, before the
    # row-wise (kPagedKV = true, RowwiseFwdConfigFor: pages, quantized K / V) forward variants and
    # the sink / ALiBi mask policies existed: their sm_80 counts are not measured yet, so a GPU
    # build may report them):
    KnownException(
        r"^fwd_kernel<FwdConfigFor<\w+, 128>, PrefillMask<64, 64>, (false|true)>$", "local",
        "prefill fwd hdim128 on sm_80: 255 registers, 32 B stack, 5 LDL / 5 STL, none inside the "
        "mainloop (epilogue values, as on sm_90a).", 32, arch="sm_80"),
    KnownException(
        r"^fwd_kernel<FwdConfigFor<\w+, 64>, PrefillMask<128, 64>, (false|true)>$", "local",
        "prefill fwd hdim64 on sm_80: 255 registers, 56 B stack, 16 LDL / 8 STL of which 7 inside "
        "the mainloop (sm_90a: 5). Same choice as on sm_90a: the spill-free 64-row tiles halve the "
        "query rows per warp; compile-time mask variants (issue 17) are the planned fix, and which "
        "is faster needs a GPU.", 56, 7, arch="sm_80"),
    KnownException(
        r"^fwd_kernel<FwdConfig<\w+, 128, 64, 64, 4>, NeighborhoodMask<64, 64>, false>$", "local",
        "neighborhood fwd hdim128 on sm_80: 255 registers, 16 B stack, 3 LDL / 3 STL, none inside "
        "the mainloop.", 16, arch="sm_80"),
    KnownException(
        r"^bwd_main_kernel<BwdConfigFor<\w+, 256>, PrefillBwdMask<64, 64>>$", "local",
        "prefill bwd hdim256 on sm_80: 255 registers, 16 B stack, 4 LDL / 4 STL, 2 inside the loop "
        "over query blocks (as on sm_90a).", 16, 2, arch="sm_80"),
)


# --- parsing cuobjdump output --------------------------------------------------------------
@dataclasses.dataclass
class Kernel:
    mangled: str
    arch: str
    source: str  # basename of the compilation unit (cuobjdump's "identifier")
    name: str = ""  # short demangled name
    signature: str = ""  # full demangled name
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    ldl: int = 0
    stl: int = 0
    local_in_loops: int = 0  # LDL / STL inside a loop (see parse_sass)
    hmma: int = 0
    hgmma: int = 0
    fp64: int = 0
    ldg: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ldgsts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def key(self):
        return (self.arch, self.source, self.mangled)


_HEADER = re.compile(r"^\s*(arch|identifier)\s*=\s*(\S+)")
_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
# "/*0090*/   @!P0 LDG.E.64 R158, desc[UR14][R2.64] ;" -> ("0090", "LDG.E.64")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
# "/*86c0*/   @!P0 BRA 0x3250 ;" -> "0x3250" (also "BRA !P0, 0x...")
_BRANCH_TARGET = re.compile(r"\bBRA\b[^;]*?\b0x([0-9a-f]+)")
_FP64_OPCODES = {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DMMA", "DSET", "DRCP", "DRSQ"}


def _walk(text, function_pattern, arch=None, source=None):
    """Yield (arch, source, mangled, line) for each line inside a function's section. A fatbin's
    sections name their arch and source ("identifier"); a bare cubin's do not: the defaults."""
    function = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            if header.group(1) == "arch":
                arch = header.group(2)
            else:
                source = os.path.basename(header.group(2))
            function = None
            continue
        start = function_pattern.match(line)
        if start:
            function = start.group(1)
            continue
        if function:
            yield arch, source, function, line


def parse_resource_usage(text, arch=None, source=None):
    """`cuobjdump --dump-resource-usage` text -> {key: Kernel} with the resource fields."""
    kernels = {}
    for arch, source, mangled, line in _walk(text, _RESOURCE_FUNCTION, arch, source):
        fields = dict(_RESOURCE.findall(line))
        if not fields:
            continue
        kernel = Kernel(mangled, arch, source, registers=int(fields.get("REG", 0)),
                        stack=int(fields.get("STACK", 0)), local=int(fields.get("LOCAL", 0)),
                        shared=int(fields.get("SHARED", 0)))
        kernels[kernel.key] = kernel
    return kernels


def access_bits(opcode):
    """Width in bits of a load / store / cp.async opcode: LDG.E.128 -> 128, LDG.E.U16 -> 16."""
    parts = opcode.split(".")[1:]
    for part, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if part in parts:
            return bits
    return 32


def is_fp64(opcode):
    parts = opcode.split(".")
    return parts[0] in _FP64_OPCODES or "F64" in parts[1:]


def count_instructions(kernel, opcode):
    root = opcode.split(".")[0]
    if root == "LDL":
        kernel.ldl += 1
    elif root == "STL":
        kernel.stl += 1
    elif root == "HMMA":
        kernel.hmma += 1
    elif root == "HGMMA":
        kernel.hgmma += 1
    elif root == "LDG":
        kernel.ldg[access_bits(opcode)] += 1
    elif root == "LDGSTS":
        kernel.ldgsts[access_bits(opcode)] += 1
    if is_fp64(opcode):
        kernel.fp64 += 1


def parse_sass(text, kernels, arch=None, source=None):
    """Add the instruction counts of `cuobjdump -sass` text to `kernels` (new keys are added),
    and each kernel's LDL / STL that lie inside a loop: a branch to a lower (or the same)
    address closes a loop spanning [target, branch]."""
    local_at, loops = collections.defaultdict(list), collections.defaultdict(list)
    for arch, source, mangled, line in _walk(text, _SASS_FUNCTION, arch, source):
        instruction = _SASS_INSTRUCTION.match(line)
        if not instruction:
            continue
        key = (arch, source, mangled)
        if key not in kernels:
            kernels[key] = Kernel(mangled, arch, source)
        address, opcode = int(instruction.group(1), 16), instruction.group(2)
        count_instructions(kernels[key], opcode)
        if opcode.split(".")[0] in ("LDL", "STL"):
            local_at[key].append(address)
        branch = _BRANCH_TARGET.search(line) if opcode == "BRA" else None
        if branch and int(branch.group(1), 16) <= address:
            loops[key].append((int(branch.group(1), 16), address))
    for key, addresses in local_at.items():
        kernels[key].local_in_loops = sum(any(t <= a <= b for t, b in loops[key]) for a in addresses)
    return kernels


# --- names -----------------------------------------------------------------------------------
_KV_FORMATS = {"0": "int8", "1": "int4", "2": "fp8"}  # attnkit::KVFormat (quant.h)


def strip_parameters(signature):
    """'void ns::f<a, b>(P, Q)' -> 'ns::f<a, b>': drop the return type and the parameter list."""
    depth = 0
    for i, ch in enumerate(signature):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            signature = signature[:i]
            break
    return signature.removeprefix("void ").strip()


def short_name(signature):
    """Readable kernel name: no namespaces, no parameter list, KV formats by name."""
    name = strip_parameters(signature.replace("(anonymous namespace)::", ""))
    name = re.sub(r"\(attnkit::KVFormat\)(\d)", lambda m: _KV_FORMATS.get(m.group(1), m.group(0)), name)
    name = re.sub(r"\b[A-Za-z_]\w*::", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("bfloat16_t", "bf16") \
        .replace("__half", "fp16").replace("half_t", "fp16").replace(" >", ">")


def demangle(names, cxxfilt):
    if not names:
        return {}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


# --- checks -----------------------------------------------------------------------------------
def family_of(kernel):
    for family in FAMILIES:
        if re.search(family.pattern, kernel.signature):
            return family
    return OTHER


def broken_rules(kernel, family):
    """Rules the kernel breaks: 'fp64' anywhere; for hot kernels 'local' and requirement names."""
    rules = ["fp64"] if kernel.fp64 else []
    if family.hot:
        if kernel.ldl or kernel.stl or kernel.local:
            rules.append("local")
        rules += [req for req in family.requires if not REQUIREMENTS[req][1](kernel)]
    return rules


def excuse_for(kernel, rule):
    for excuse in KNOWN_EXCEPTIONS:  # the first that covers the kernel: arch-specific entries come first
        if excuse.rule == rule and excuse.covers(kernel):
            return excuse
    return None


def check(kernels):
    """(status per kernel key, problems, notes): problems make the report fail."""
    status, problems, used = {}, [], set()
    present = {e for e in KNOWN_EXCEPTIONS if any(e.covers(k) for k in kernels)}
    for kernel in kernels:
        family = family_of(kernel)
        marks = []
        for rule in broken_rules(kernel, family):
            excuse = excuse_for(kernel, rule)
            what = "local-memory traffic" if rule == "local" else \
                "FP64 instructions" if rule == "fp64" else "no " + REQUIREMENTS[rule][0]
            if excuse:
                used.add(excuse)  # needed, even where it no longer suffices
            if excuse and (rule != "local" or (kernel.stack <= excuse.stack_bytes_at_most and
                                               kernel.local_in_loops <= excuse.in_loops_at_most)):
                marks.append(f"known: {rule}")
            else:
                why = ""
                if excuse and kernel.local_in_loops > excuse.in_loops_at_most:
                    why = (f" ({kernel.local_in_loops} LDL / STL inside loops > the "
                           f"{excuse.in_loops_at_most} excused)")
                elif excuse:
                    why = f" (stack {kernel.stack} B > the {excuse.stack_bytes_at_most} B excused)"
                problems.append(f"{family.name}: {kernel.name} [{kernel.source}, {kernel.arch}]: "
                                f"{what}{why}")
                marks.append(f"FAIL: {rule}")
        status[kernel.key] = ", ".join(marks) or ("ok" if family.hot else "-")
    notes = []
    for excuse in KNOWN_EXCEPTIONS:
        if excuse in present and excuse not in used:  # absent kernels (a single object) prove nothing
            problems.append(f"stale KNOWN_EXCEPTIONS entry {excuse.pattern!r} ({excuse.rule}"
                            f"{', ' + excuse.arch if excuse.arch else ''}): "
                            "no kernel needs it any more, remove it")
        elif excuse in used and not any(excuse.pattern in p for p in problems):
            notes.append(f"known exception `{excuse.pattern}` ({excuse.rule}"
                         f"{', ' + excuse.arch if excuse.arch else ''}): {excuse.reason}")
    return status, problems, notes


# --- output -----------------------------------------------------------------------------------
def widths(counter, bits=(128, 64, 32)):
    """'128/64/32(+narrow)' counts, e.g. '26/128/923+790'."""
    text = "/".join(str(counter[b]) for b in bits)
    narrow = sum(n for b, n in counter.items() if b not in bits)
    return text + (f"+{narrow}" if narrow else "")


def markdown(kernels, status):
    head = ("| family | kernel | source | arch | regs | stack B | local B | smem B | LDL | STL | in loops "
            "| HMMA | HGMMA | LDG 128/64/32+narrow | LDGSTS 128/64/32 | FP64 | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k in kernels:
        lines.append(f"| {family_of(k).name} | `{k.name}` | {k.source} | {k.arch} | {k.registers} "
                     f"| {k.stack} | {k.local} | {k.shared} | {k.ldl} | {k.stl} | {k.local_in_loops} | {k.hmma} "
                     f"| {k.hgmma} | {widths(k.ldg)} | {widths(k.ldgsts)} | {k.fp64} "
                     f"| {status[k.key]} |")
    return "\n".join(lines)


def order(kernel):
    families = [f.name for f in FAMILIES] + [OTHER.name]
    return (families.index(family_of(kernel).name), kernel.arch, kernel.name, kernel.source)


# --- tools and main -----------------------------------------------------------------------------
def find_tool(name):
    """$CUDA_HOME/bin, then PATH, then the copy triton (pulled in by torch) ships in a venv:
    the project's .venv, or the environment running this script."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", name)] if cuda_home else []
    on_path = shutil.which(name)
    candidates += [on_path] if on_path else []
    for prefix in (os.path.join(ROOT, ".venv"), sys.prefix):
        candidates += sorted(glob.glob(os.path.join(
            prefix, "lib", "python3*", "site-packages", "triton", "backends", "nvidia", "bin", name)))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def analyse(binaries, cuobjdump, cxxfilt):
    kernels = {}
    for binary in binaries:
        run = lambda *args: subprocess.run([cuobjdump, *args, binary], capture_output=True,
                                           text=True, check=True).stdout
        try:
            sass = run("-sass")
        except subprocess.CalledProcessError as err:  # e.g. a CPU-only build: no device code
            print(f"kernel_report: {binary}: {err.stderr.strip() or err}", file=sys.stderr)
            continue
        # a bare cubin's resource usage names no arch: take the one its SASS is "code for"
        code_for = re.search(r"code for (sm_\w+)", sass)
        arch = code_for.group(1) if code_for else None
        source = os.path.basename(binary)
        kernels.update(parse_sass(sass, parse_resource_usage(run("--dump-resource-usage"), arch, source),
                                  arch, source))
    names = demangle(sorted({k.mangled for k in kernels.values()}), cxxfilt)
    for kernel in kernels.values():
        kernel.signature = names.get(kernel.mangled, kernel.mangled)
        kernel.name = short_name(kernel.signature)
    return sorted(kernels.values(), key=order)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs="*", help="binaries or objects (default: the built extension)")
    args = parser.parse_args(argv)
    binaries = args.binaries or sorted(glob.glob(os.path.join(ROOT, "python", "attnkit", "_C*.so")))
    cuobjdump, cxxfilt = find_tool("cuobjdump"), shutil.which("c++filt")
    missing = [n for n, p in (("cuobjdump", cuobjdump), ("c++filt", cxxfilt)) if not p]
    missing += [b for b in binaries if not os.path.isfile(b)]
    if missing or not binaries:
        print("kernel_report: " + ("not found: " + ", ".join(missing) if missing else
                                   "no binary given and no python/attnkit/_C*.so built (make build)"),
              file=sys.stderr)
        return 2
    kernels = analyse(binaries, cuobjdump, cxxfilt)
    if not kernels:
        print(f"kernel_report: no CUDA kernels in {' '.join(binaries)}", file=sys.stderr)
        return 2
    status, problems, notes = check(kernels)
    print(f"## Kernel report: {len(kernels)} kernels in {', '.join(map(os.path.basename, binaries))} "
          f"(cuobjdump: {cuobjdump})\n")
    print(markdown(kernels, status))
    print("\nLDG / LDGSTS columns count instructions by access width in bits; narrow = 8/16-bit. "
          "smem = static shared memory only (dynamic shared memory is set at launch).")
    for note in notes:
        print(f"- {note}")
    for problem in problems:
        print(f"- PROBLEM: {problem}")
    verdict = f"FAILED, {len(problems)} problem(s)" if problems else f"clean ({len(notes)} known exceptions)"
    print(f"\nkernel_report: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
