"""tools/carry.py (`make gpu-carry`'s packer, gpu_suite.sh's installer), checked without a
build: on a copy of the build inputs with a fake extension, pack, then check / install /
uninstall, and which changes make a carried build stop matching."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tree, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("ATTNKIT_CUDA_ARCHS", "ATTNKIT_COMMIT",
                                                                 "CARRY_STRICT_COMMIT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(tree, "tools", "carry.py"), *args], cwd=tree,
                          capture_output=True, text=True, timeout=120, env=full_env)


@pytest.fixture
def tree(tmp_path):
    """A copy of the build inputs and tools/carry.py (not a git checkout), and a fake stage:
    an 'extension' of this python's suffix, _build_info.py and three 'benches'."""
    t = tmp_path / "tree"
    for d in ("csrc", "third_party"):
        shutil.copytree(os.path.join(ROOT, d), t / d)
    (t / "bench").mkdir()
    for f in os.listdir(os.path.join(ROOT, "bench")):
        if f.endswith((".cu", ".cuh")):
            shutil.copy(os.path.join(ROOT, "bench", f), t / "bench" / f)
    for f in ("setup.py", "CMakeLists.txt"):
        shutil.copy(os.path.join(ROOT, f), t / f)
    (t / "tools").mkdir()
    shutil.copy(os.path.join(ROOT, "tools", "carry.py"), t / "tools" / "carry.py")
    (t / "python" / "attnkit").mkdir(parents=True)
    (t / "docs").mkdir()
    (t / "docs" / "notes.md").write_text("not a build input\n")
    stage = tmp_path / "stage"
    (stage / "attnkit").mkdir(parents=True)
    (stage / "attnkit" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(os.urandom(4096) * 8)
    (stage / "_build_info.py").write_text("TORCH_VERSION = None\nCUDA_ARCHS = ['90a']\n")
    (stage / "so_build_s").write_text("123\n")
    bench = tmp_path / "bench_build"
    bench.mkdir()
    for b in ("prefill", "decode", "neighborhood", "block_sparse"):
        (bench / b).write_bytes(b"\x7fELF fake " + b.encode() * 1000)
    packed = run(str(t), "pack", "--stage", str(stage), "--bench", str(bench), "--out", str(t / "build" / "carry"),
                 "--archs", "90a", "--cpu-flags=-march=x86-64-v3", "--preset", "1")
    assert packed.returncode == 0, packed.stdout + packed.stderr
    return t


def test_pack_writes_manifest(tree):
    import json

    m = json.loads((tree / "build" / "carry" / "manifest.json").read_text())
    assert m["cuda_archs"] == ["90a"] and m["cpu_flags"] == "-march=x86-64-v3" and m["so_build_s"] == 123
    assert [f["name"] for f in m["files"]][1:] == ["prefill", "decode", "neighborhood", "block_sparse"]
    for f in m["files"]:
        assert (tree / "build" / "carry" / f["packed"]).stat().st_size == f["packed_size"]


def test_check_matches_then_install_and_uninstall(tree):
    check = run(str(tree), "check")
    assert check.returncode == 0 and "carried build matches" in check.stdout, check.stdout
    inst = run(str(tree), "install")
    assert inst.returncode == 0, inst.stdout + inst.stderr
    so = tree / "python" / "attnkit" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert so.stat().st_size == 4096 * 8 and (tree / "python" / "attnkit" / "_build_info.py").exists()
    assert os.access(tree / "build" / "cmake" / "prefill", os.X_OK)
    run(str(tree), "uninstall")
    assert not so.exists() and not (tree / "build" / "cmake" / "prefill").exists()


def test_docs_change_still_matches_source_change_does_not(tree):
    (tree / "docs" / "notes.md").write_text("edited\n")
    assert run(str(tree), "check").returncode == 0
    with open(tree / "csrc" / "cpu" / "decode.cpp", "a") as f:
        f.write("\n// edited\n")
    check = run(str(tree), "check")
    assert check.returncode == 1 and "build inputs differ" in check.stdout
    assert run(str(tree), "install").returncode == 1
    assert not list((tree / "python" / "attnkit").glob("_C*"))


@pytest.mark.parametrize("env,why", [({"ATTNKIT_CUDA_ARCHS": "80;90a"}, "ATTNKIT_CUDA_ARCHS=80;90a here"),
                                     ({"ATTNKIT_COMMIT": "0123456789ab", "CARRY_STRICT_COMMIT": "1"},
                                      "CARRY_STRICT_COMMIT=1")])
def test_mismatch_reasons(tree, env, why):
    check = run(str(tree), "check", env=env)
    assert check.returncode == 1 and why in check.stdout, check.stdout


def test_damaged_file_is_not_installed(tree):
    with open(tree / "build" / "carry" / "decode.xz", "ab") as f:
        f.write(b"x")
    inst = run(str(tree), "install")
    assert inst.returncode == 2 and "NOT installed" in inst.stdout
    assert not list((tree / "python" / "attnkit").glob("_C*")) and not (tree / "build" / "cmake" / "prefill").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_gpu_carry_is_portable_and_out_of_tree():
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNKIT_CUDA_ARCHS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", "gpu-carry-so", "PYTHON312=python3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env).stdout
    assert 'ATTNKIT_CUDA_ARCHS="90a" ATTNKIT_CPU_FLAGS="-march=x86-64-v3"' in out
    assert "--build-lib build/carry-stage" in out and "ATTNKIT_BUILD_INFO=build/carry-stage/" in out
    assert "--inplace" not in out and "-march=native" not in out
