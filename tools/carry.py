"""A prebuilt attnkit for the GPU test machines (`make gpu-carry` packs it here, and
tools/gpu_suite.sh installs it there instead of building). Python 3 standard library only.

    carry.py inputs-hash                       the hash of the build inputs of this tree
    carry.py pack --stage D [--bench B] --out build/carry --archs 90a --cpu-flags F
                                               compress D's extension (+ B's C++ benches) into
                                               build/carry/ with manifest.json
    carry.py check   [--carry build/carry]     does the carried build fit this python / torch /
                                               ATTNKIT_CUDA_ARCHS / tree? exit 0 yes, 1 no (says why)
    carry.py install [--carry build/carry] [--bench-dir build/cmake]
                                               check, then unpack: the extension and
                                               _build_info.py into python/attnkit/, the benches
                                               into --bench-dir; exit 0 installed, 1 no match, 2 error
    carry.py uninstall [--carry build/carry]   remove what install put there (a failed import)

Matching (check): the running torch has the manifest's release (2.11.0) and CUDA major; the
running python's extension suffix is the manifest's (cpython-312-x86_64-linux-gnu); the
archs equal $ATTNKIT_CUDA_ARCHS (default 90a, as gpu_suite.sh); and the hash of the build
inputs of this tree (setup.py, CMakeLists.txt, csrc/, third_party/, bench/ sources: the
files the binaries are compiled from, hashed by content, no git needed) equals the
manifest's. The commit ($ATTNKIT_COMMIT, else git HEAD) is compared and reported; a
different commit with identical build inputs matches (nothing compiled differs), unless
CARRY_STRICT_COMMIT=1.
"""
import argparse
import hashlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_FILES = ["setup.py", "CMakeLists.txt"]
INPUT_DIRS = ["csrc", "third_party"]
BENCH_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".cpp")
BENCHES = ["prefill", "decode", "neighborhood", "block_sparse"]
MANIFEST = "manifest.json"
INSTALLED = "installed.txt"  # written next to the manifest by install, read by uninstall


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_paths(root=ROOT):
    paths = [p for p in INPUT_FILES if os.path.isfile(os.path.join(root, p))]
    for d in INPUT_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = [x for x in dirnames if x != "__pycache__"]
            paths += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    bench = os.path.join(root, "bench")
    if os.path.isdir(bench):
        paths += [os.path.join("bench", f) for f in os.listdir(bench)
                  if f.endswith(BENCH_SUFFIXES) and os.path.isfile(os.path.join(bench, f))]
    return sorted(p.replace(os.sep, "/") for p in paths)


def inputs_hash(root=ROOT):
    """sha256 over (path, content sha256) of every build input, in path order."""
    h = hashlib.sha256()
    for p in input_paths(root):
        h.update(p.encode() + b"\0" + sha256_file(os.path.join(root, p)).encode() + b"\n")
    return h.hexdigest()


def tree_commit():
    env = os.environ.get("ATTNKIT_COMMIT", "")
    if env and env != "unknown":
        return env
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def same_commit(a, b):
    """Equal, or one a prefix (>= 7 hex digits) of the other (short and full hashes)."""
    if not a or not b:
        return False
    n = min(len(a), len(b))
    return n >= 7 and a[:n] == b[:n]


def release(version):
    return version.split("+")[0]


def run_text(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def needs(path):
    """The newest GLIBC_ and GLIBCXX_ symbol versions a binary needs ('' without objdump):
    the GPU machine's C and C++ libraries must be at least as new."""
    newest = {}
    for tok in run_text(["objdump", "-T", path]).split():
        tok = tok.strip("()")
        for lib in ("GLIBC_", "GLIBCXX_"):
            if tok.startswith(lib) and tok[len(lib):len(lib) + 1].isdigit():
                v = tuple(int(x) for x in tok[len(lib):].split(".") if x.isdigit())
                newest[lib] = max(newest.get(lib, v), v)
    return " ".join(lib + ".".join(map(str, v)) for lib, v in sorted(newest.items()))


def compress(src, dst, preset):
    t = time.monotonic()
    with open(src, "rb") as f, lzma.open(dst, "wb", preset=preset) as g:
        shutil.copyfileobj(f, g, 1 << 20)
    return time.monotonic() - t


def decompress(src, dst):
    t = time.monotonic()
    tmp = dst + ".part"
    with lzma.open(src, "rb") as f, open(tmp, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
    os.replace(tmp, dst)
    return time.monotonic() - t


# -- pack (here) ------------------------------------------------------------------------
def cmd_pack(args):
    stage = os.path.abspath(args.stage)
    sos = [f for f in os.listdir(os.path.join(stage, "attnkit")) if f.startswith("_C") and f.endswith(".so")]
    if len(sos) != 1:
        sys.exit(f"carry.py pack: expected one attnkit/_C*.so under {stage}, found {sos}")
    so = sos[0]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if so != "_C" + suffix:
        sys.exit(f"carry.py pack: {so} is not for this python ({suffix}): run pack with the python it was built by")
    import torch  # the torch the extension was built against (this venv's)

    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    files = []

    def add(src, name, kind, dest):
        raw = os.path.getsize(src)
        packed = os.path.join(out, name + ".xz")
        secs = compress(src, packed, args.preset)
        # Time to unpack it, measured here (the GPU machine unpacks with the same code).
        check = packed + ".check"
        unpack_s = decompress(packed, check)
        ok = sha256_file(check) == sha256_file(src)
        os.remove(check)
        if not ok:
            sys.exit(f"carry.py pack: {name}: the round trip through xz changed the file")
        files.append({"name": name, "kind": kind, "dest": dest, "size": raw, "sha256": sha256_file(src),
                      "packed": name + ".xz", "packed_size": os.path.getsize(packed),
                      "packed_sha256": sha256_file(packed), "xz_preset": args.preset,
                      "compress_s": round(secs, 1), "unpack_s_here": round(unpack_s, 2),
                      "needs": needs(src)})
        print(f"  {name}: {raw / 1e6:.1f} MB -> {files[-1]['packed_size'] / 1e6:.1f} MB xz -{args.preset} "
              f"({secs:.0f} s to pack, {unpack_s:.1f} s to unpack here)")

    add(os.path.join(stage, "attnkit", so), so, "extension", "python/attnkit")
    info = os.path.join(stage, "_build_info.py")
    if not os.path.isfile(info):
        sys.exit(f"carry.py pack: {info} missing (setup.py writes it with ATTNKIT_BUILD_INFO)")
    shutil.copy(info, os.path.join(out, "_build_info.py"))
    if args.bench:
        for b in BENCHES:
            path = os.path.join(os.path.abspath(args.bench), b)
            if not os.path.isfile(path):
                sys.exit(f"carry.py pack: {path} missing")
            add(path, b, "bench", "build/cmake")

    def read_int(name, where=stage):
        p = os.path.join(where, name)
        return int(open(p).read().strip()) if os.path.isfile(p) else None

    recorded = os.path.join(stage, "inputs_hash")
    now_hash = inputs_hash()
    if os.path.isfile(recorded) and open(recorded).read().strip() != now_hash:
        shutil.rmtree(out)
        sys.exit("carry.py pack: the build inputs changed while it was building: build again")
    commit = tree_commit()
    dirty = run_text(["git", "-C", ROOT, "status", "--porcelain", "--"] + INPUT_FILES + INPUT_DIRS + ["bench"]).strip()
    nvcc = [line for line in run_text(["nvcc", "--version"]).splitlines() if "release" in line]
    manifest = {
        "format": 1,
        "commit": commit,
        "inputs_sha256": now_hash,
        "inputs_uncommitted": bool(dirty),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "ext_suffix": suffix,
        "cuda_archs": args.archs.split(";"),
        "cpu_flags": args.cpu_flags,
        "nvcc": nvcc[0].strip() if nvcc else "",
        "cxx": (run_text(["c++", "--version"]).splitlines() or [""])[0],
        "glibc_here": platform.libc_ver()[1],
        "built_at_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "so_build_s": read_int("so_build_s"),
        "bench_build_s": read_int("bench_build_s", os.path.abspath(args.bench)) if args.bench else None,
        "files": files,
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out, x)) for x in os.listdir(out))
    print(f"attnkit: gpu-carry: {out}: {total / 2**20:.1f} MiB in all (the device tool carries 64 MiB "
          f"with the tree and .whl), torch {torch.__version__}, archs {args.archs}, commit {commit[:12]}"
          + (" + UNCOMMITTED changes to build inputs" if dirty else ""))


# -- check / install (on the GPU machine) -----------------------------------------------
def load(carry):
    with open(os.path.join(carry, MANIFEST)) as f:
        return json.load(f)


def mismatch(m):
    """None when the carried build fits this python, torch, archs and tree; else why not."""
    try:
        import torch
    except ImportError as e:
        return f"torch does not import ({e})"
    if release(torch.__version__) != release(m["torch"]):
        return f"torch {torch.__version__} here, carried build is for {m['torch']}"
    if (torch.version.cuda or "").split(".")[0] != (m["torch_cuda"] or "").split(".")[0]:
        return f"torch's CUDA {torch.version.cuda} here, carried build is for {m['torch_cuda']}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if suffix != m["ext_suffix"]:
        return f"python extension suffix {suffix} here, carried build has {m['ext_suffix']}"
    archs = [a for a in os.environ.get("ATTNKIT_CUDA_ARCHS", "90a").split(";") if a]
    if archs != m["cuda_archs"]:
        return f"ATTNKIT_CUDA_ARCHS={';'.join(archs)} here, carried build has {';'.join(m['cuda_archs'])}"
    h = inputs_hash()
    if h != m["inputs_sha256"]:
        return (f"build inputs differ (csrc/, setup.py, CMakeLists.txt, bench/ sources: hash {h[:12]} here, "
                f"{m['inputs_sha256'][:12]} carried; built at commit {m['commit'][:12]})")
    commit = tree_commit()
    if os.environ.get("CARRY_STRICT_COMMIT") == "1" and not same_commit(commit, m["commit"]):
        return f"commit {commit or 'unknown'} here, carried build is of {m['commit'][:12]} (CARRY_STRICT_COMMIT=1)"
    return None


def describe(m):
    commit = tree_commit()
    if same_commit(commit, m["commit"]):
        c = f"commit {m['commit'][:12]} (same as the tree)"
    elif commit:
        c = f"commit {m['commit'][:12]} (tree at {commit[:12]}: build inputs identical)"
    else:
        c = f"commit {m['commit'][:12]} (tree commit unknown: build inputs identical)"
    return (f"torch {m['torch']}, archs {';'.join(m['cuda_archs'])}, CPU flags {m['cpu_flags'] or '(none)'}, "
            f"{c}, built {m['built_at_utc']} UTC")


def cmd_check(args):
    carry = os.path.abspath(args.carry)
    if not os.path.isfile(os.path.join(carry, MANIFEST)):
        print(f"no carried build ({os.path.relpath(carry, ROOT)}/{MANIFEST} missing)")
        return 1
    m = load(carry)
    why = mismatch(m)
    print(f"carried build does not match: {why}" if why else f"carried build matches: {describe(m)}")
    return 1 if why else 0


def cmd_install(args):
    carry = os.path.abspath(args.carry)
    if cmd_check(args) != 0:
        return 1
    m = load(carry)
    t = time.monotonic()
    installed = []
    try:
        for f in m["files"]:
            if f["kind"] == "bench" and args.no_bench:
                continue
            dest_dir = os.path.join(ROOT, args.bench_dir if f["kind"] == "bench" else f["dest"])
            os.makedirs(dest_dir, exist_ok=True)
            packed = os.path.join(carry, f["packed"])
            if sha256_file(packed) != f["packed_sha256"]:
                raise RuntimeError(f"{f['packed']}: sha256 differs from the manifest (damaged in transit?)")
            dest = os.path.join(dest_dir, f["name"])
            secs = decompress(packed, dest)
            installed.append(dest)
            if sha256_file(dest) != f["sha256"]:
                raise RuntimeError(f"{f['name']}: unpacked sha256 differs from the manifest")
            if f["kind"] == "bench":
                os.chmod(dest, 0o755)
            print(f"  {os.path.relpath(dest, ROOT)}: {f['size'] / 1e6:.1f} MB unpacked in {secs:.1f} s")
        info = os.path.join(ROOT, "python", "attnkit", "_build_info.py")
        shutil.copy(os.path.join(carry, "_build_info.py"), info)
        installed.append(info)
    except Exception as e:  # noqa: BLE001 - any failure: undo, and let the caller build
        for p in installed:
            if os.path.exists(p):
                os.remove(p)
        print(f"carried build NOT installed: {e}")
        return 2
    with open(os.path.join(carry, INSTALLED), "w") as f:
        f.write("\n".join(installed) + "\n")
    print(f"carried build installed in {time.monotonic() - t:.1f} s")
    return 0


def cmd_uninstall(args):
    listing = os.path.join(os.path.abspath(args.carry), INSTALLED)
    if not os.path.isfile(listing):
        return 0
    for p in open(listing).read().split():
        if os.path.exists(p):
            os.remove(p)
            print(f"  removed {os.path.relpath(p, ROOT)}")
    os.remove(listing)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inputs-hash")
    p = sub.add_parser("pack")
    p.add_argument("--stage", required=True)
    p.add_argument("--bench", default="")
    p.add_argument("--out", default="build/carry")
    p.add_argument("--archs", required=True)
    p.add_argument("--cpu-flags", default="")
    p.add_argument("--preset", type=int, default=9)
    for name in ("check", "install", "uninstall"):
        p = sub.add_parser(name)
        p.add_argument("--carry", default=os.path.join(ROOT, "build", "carry"))
        if name == "install":
            p.add_argument("--bench-dir", default=os.path.join("build", "cmake"))
            p.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    if args.cmd == "inputs-hash":
        print(inputs_hash())
        return 0
    return {"pack": cmd_pack, "check": cmd_check, "install": cmd_install, "uninstall": cmd_uninstall}[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())
