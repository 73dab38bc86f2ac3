"""tools/kernel_report.py: parsing of canned cuobjdump text (CPU only, fast), the rules and
their exceptions, and one run on the built extension when cuobjdump and CUDA kernels exist."""
import collections
import glob
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "kernel_report.py")
_spec = importlib.util.spec_from_file_location("kernel_report", TOOL)
kr = importlib.util.module_from_spec(_spec)
sys.modules["kernel_report"] = kr  # dataclasses look their module up there
_spec.loader.exec_module(kr)

RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /src/csrc/cuda/decode/decode.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z4leanv:
  REG:128 STACK:56 SHARED:1024 LOCAL:0 CONSTANT[0]:872 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5mergev:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:800 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_80
code version = [1,7]
host = linux
compile_size = 64bit
identifier = /src/csrc/cuda/decode/decode.cu

Resource usage:
 Function _Z4leanv:
  REG:152 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:872 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# Two kernels of one sm_90a cubin; the hex encoding lines are as cuobjdump prints them.
SASS = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /src/csrc/cuda/decode/decode.cu

\tcode for sm_90a
\t.target\tsm_90a

\t\tFunction : _Z4leanv
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
                                                                                   /* 0x000e700000000800 */
        /*0010*/                   LDG.E.64 R158, desc[UR14][R2.64] ;              /* 0x0000000e029e7981 */
        /*0020*/               @P0 LDG.E.128 R4, desc[UR14][R2.64] ;               /* 0x0000000e029e7981 */
        /*0030*/              @!P1 LDG.E R4, desc[UR14][R2.64] ;                   /* 0x0000000e029e7981 */
        /*0040*/                   LDG.E.U16 R4, desc[UR14][R2.64] ;               /* 0x0000000e029e7981 */
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR8][R4.64] ;  /* 0x0 */
        /*0060*/                   LDGSTS.E.64 [R3], desc[UR8][R4.64] ;            /* 0x0 */
        /*0070*/                   LDGSTS.E [R3], desc[UR8][R4.64] ;               /* 0x0 */
        /*0080*/                   STL [R1+0x8], R4 ;                              /* 0x0 */
        /*0090*/                   STL.64 [R1], R4 ;                               /* 0x0 */
        /*00a0*/                   LDL.LU R4, [R1+0x8] ;                           /* 0x0 */
        /*00b0*/                   HMMA.16816.F32.BF16 R116, R104.reuse, R108, RZ ;  /* 0x0 */
        /*00c0*/                   EXIT ;                                          /* 0x0 */
        ..........

\t\tFunction : _Z5mergev
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   DFMA R2, R2, R4, R6 ;                           /* 0x0 */
        /*0010*/                   F2F.F64.F32 R2, R0 ;                            /* 0x0 */
        /*0020*/              @!UP0 HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;  /* 0x0 */
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;                            /* 0x0 */
        /*0040*/                   EXIT ;                                          /* 0x0 */
"""


def parsed():
    return kr.parse_sass(SASS, kr.parse_resource_usage(RESOURCE_USAGE))


def test_resource_usage_per_arch_and_source():
    kernels = kr.parse_resource_usage(RESOURCE_USAGE)
    assert set(kernels) == {("sm_90a", "decode.cu", "_Z4leanv"), ("sm_90a", "decode.cu", "_Z5mergev"),
                            ("sm_80", "decode.cu", "_Z4leanv")}
    lean = kernels[("sm_90a", "decode.cu", "_Z4leanv")]
    assert (lean.registers, lean.stack, lean.local, lean.shared) == (128, 56, 0, 1024)
    assert kernels[("sm_80", "decode.cu", "_Z4leanv")].local == 8


def test_sass_instruction_counts():
    kernels = parsed()
    lean = kernels[("sm_90a", "decode.cu", "_Z4leanv")]
    assert (lean.ldl, lean.stl, lean.hmma, lean.hgmma, lean.fp64) == (1, 2, 1, 0, 0)
    assert dict(lean.ldg) == {64: 1, 128: 1, 32: 1, 16: 1}  # predicated ones count too
    assert dict(lean.ldgsts) == {128: 1, 64: 1, 32: 1}  # LTC128B is a cache hint, not a width
    merge = kernels[("sm_90a", "decode.cu", "_Z5mergev")]
    assert (merge.fp64, merge.hgmma, merge.ldl) == (2, 1, 0)  # DEPBAR is not FP64
    # the sm_80 kernel has resources but no SASS in this text: zero counts, still listed
    assert kernels[("sm_80", "decode.cu", "_Z4leanv")].ldl == 0


@pytest.mark.parametrize("opcode, bits", [("LDG.E", 32), ("LDG.E.128", 128), ("LDG.E.64.CONSTANT", 64),
                                          ("LDG.E.U8", 8), ("LDG.E.S16", 16), ("LDGSTS.E.BYPASS.LTC128B.128", 128),
                                          ("LDGSTS.E.LTC128B", 32)])
def test_access_bits(opcode, bits):
    assert kr.access_bits(opcode) == bits


@pytest.mark.parametrize("opcode, fp64", [("DADD", True), ("DSETP.GEU.AND", True), ("F2F.F32.F64", True),
                                          ("I2F.F64.S32", True), ("DEPBAR.LE", False), ("FADD.FTZ", False),
                                          ("F2FP.BF16.F32.PACK_AB", False)])
def test_fp64_opcodes(opcode, fp64):
    assert kr.is_fp64(opcode) == fp64


@pytest.mark.parametrize("signature, short", [
    ("void attnkit::cuda::(anonymous namespace)::lean_kernel<__nv_bfloat16, 64, attnkit::cuda::(anonymous "
     "namespace)::QuantKV<(attnkit::KVFormat)1> >(attnkit::DecodeParams, attnkit::LeanShape, int, int, char*)",
     "lean_kernel<bf16, 64, QuantKV<int4>>"),
    ("void attnkit::cuda::prefill::fwd_kernel<attnkit::cuda::prefill::FwdConfigFor<cutlass::half_t, 64>, "
     "attnkit::cuda::neighborhood::NeighborhoodMask<128, 64> >(attnkit::AttentionParams, "
     "attnkit::cuda::neighborhood::NeighborhoodMask<128, 64>::Args)",
     "fwd_kernel<FwdConfigFor<fp16, 64>, NeighborhoodMask<128, 64>>"),
    ("attnkit::cuda::(anonymous namespace)::offsets_kernel(attnkit::LeanShape, int const*, long*)", "offsets_kernel"),
])
def test_short_name(signature, short):
    assert kr.short_name(signature) == short


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt not on PATH")
def test_demangle_with_cxxfilt():
    mangled = ("_ZN7attnkit4cuda41_GLOBAL__N__632516e4_9_decode_cu_cb13da7b11lean_kernelI13__nv_bfloat16Li256E"
               "NS1_7QuantKVILNS_8KVFormatE2EEEEEvNS_12DecodeParamsENS_9LeanShapeEiiPc")
    signature = kr.demangle([mangled], shutil.which("c++filt"))[mangled]
    assert kr.short_name(signature) == "lean_kernel<bf16, 256, QuantKV<fp8>>"


_ids = itertools.count()


def kernel(signature, **fields):
    """A Kernel with a unique mangled name (the key of check's status), counts from fields."""
    k = kr.Kernel(f"_Z{next(_ids)}", "sm_90a", "x.cu", name=kr.short_name(signature), signature=signature)
    for key, value in fields.items():
        setattr(k, key, collections.Counter(value) if isinstance(value, dict) else value)
    return k


LEAN = "void lean_kernel<__half, 128, PlainKV<__half> >(attnkit::DecodeParams, attnkit::LeanShape, int, int, char*)"
FWD = "void fwd_kernel<FwdConfigFor<cutlass::half_t, 128>, PrefillMask<64, 64> >(attnkit::AttentionParams)"


def test_family_table_classifies_the_two_merge_kernels():
    decode_merge = kernel("void merge_kernel<__half>(attnkit::DecodeParams, attnkit::LeanShape, int, char const*)")
    states_merge = kernel("void merge_kernel<__half, 8>(attnkit::MergeParams)")
    assert kr.family_of(decode_merge).name == "decode merge"
    assert kr.family_of(states_merge).name == "merge states"
    assert kr.family_of(kernel("void mystery_kernel()")) is kr.OTHER


def test_family_table_classifies_the_block_sparse_kernels():
    """The block-sparse policies on the prefill kernels are hot families of their own (not
    "other", not dense prefill's)."""
    fwd = kernel("void attnkit::cuda::prefill::fwd_kernel<attnkit::cuda::prefill::FwdConfig<cutlass::bfloat16_t, 64, "
                 "64, 64, 4>, attnkit::cuda::block_sparse::BlockSparseMask<64, 64> >(attnkit::AttentionParams, "
                 "attnkit::BlockSparseLayout)")
    bwd = kernel("void attnkit::cuda::prefill::bwd_main_kernel<attnkit::cuda::prefill::BwdConfigFor<cutlass::half_t, "
                 "128>, attnkit::cuda::block_sparse::BlockSparseBwdMask<64, 64> >(attnkit::AttentionBwdParams, "
                 "attnkit::BlockSparseLayout)")
    lists = kernel("void attnkit::cuda::(anonymous namespace)::transpose_kernel(attnkit::BlockLists, long, int*, int*)")
    assert kr.family_of(fwd).name == "block-sparse fwd" and kr.family_of(fwd).hot
    assert kr.family_of(bwd).name == "block-sparse bwd main" and kr.family_of(bwd).hot
    assert kr.family_of(lists).name == "block lists"


def test_rules(monkeypatch):
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", ())
    good_fwd = kernel(FWD, hmma=8, ldgsts={128: 4})
    spilling_fwd = kernel(FWD, hmma=8, ldgsts={128: 4}, ldl=1, stack=8)
    no_mma_fwd = kernel(FWD, ldgsts={128: 4})
    narrow_lean = kernel(LEAN, ldgsts={64: 4})
    wide_lean = kernel(LEAN, ldg={128: 2})
    cold_spill = kernel("void merge_kernel<__half, 8>(attnkit::MergeParams)", stl=3, stack=16)
    cold_fp64 = kernel("void append_kernel<float, 4>(attnkit::PagedAppendParams)", fp64=1)
    kernels = [good_fwd, spilling_fwd, no_mma_fwd, narrow_lean, wide_lean, cold_spill, cold_fp64]
    status, problems, notes = kr.check(kernels)
    assert [status[k.key] for k in kernels] == ["ok", "FAIL: local", "FAIL: mma", "FAIL: load.128", "ok", "-",
                                                "FAIL: fp64"]
    assert len(problems) == 4 and not notes


def test_known_exceptions_hold_within_their_stack_bytes_and_go_stale(monkeypatch):
    excuse = kr.KnownException(r"^lean_kernel<", "local", "a reason", stack_bytes_at_most=32)
    unused = kr.KnownException(r"^nothing<", "local", "an old reason", stack_bytes_at_most=8)
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", (excuse,))
    within = kernel(LEAN, ldg={128: 1}, ldl=2, stack=32)
    status, problems, notes = kr.check([within])
    assert status[within.key] == "known: local" and not problems and notes == [
        f"known exception `^lean_kernel<` (local): a reason"]

    beyond = kernel(LEAN, ldg={128: 1}, ldl=2, stack=40)
    status, problems, _ = kr.check([beyond])
    assert status[beyond.key] == "FAIL: local" and "stack 40 B > the 32 B excused" in problems[0]

    # an entry whose kernels are in the binary but break no rule is stale; one whose kernels
    # are absent (a report on a single object) is not judged
    fixed = kernel(LEAN, ldg={128: 1})
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", (excuse, unused))
    _, problems, _ = kr.check([within])
    assert not problems
    _, problems, _ = kr.check([fixed])
    assert len(problems) == 1 and "stale" in problems[0] and "^lean_kernel<" in problems[0]


def test_known_exceptions_per_arch(monkeypatch):
    """An entry with an arch covers only that arch's kernels: the sm_80 build of a kernel may
    carry other counts than its sm_90a build, each stated in its own entry."""
    on_90 = kr.KnownException(r"^lean_kernel<", "local", "sm_90a counts", 16, 0, arch="sm_90a")
    on_80 = kr.KnownException(r"^lean_kernel<", "local", "sm_80 counts", 32, 2, arch="sm_80")
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", (on_90, on_80))
    hopper = kernel(LEAN, ldg={128: 1}, ldl=2, stack=16)
    ampere = kernel(LEAN, ldg={128: 1}, ldl=4, stack=32, local_in_loops=2)
    ampere.arch = "sm_80"
    status, problems, notes = kr.check([hopper, ampere])
    assert not problems and status[hopper.key] == status[ampere.key] == "known: local"
    assert notes == ["known exception `^lean_kernel<` (local, sm_90a): sm_90a counts",
                     "known exception `^lean_kernel<` (local, sm_80): sm_80 counts"]
    # the sm_90a entry does not excuse the sm_80 kernel, and is not stale in an sm_80-only report
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", (on_90,))
    status, problems, _ = kr.check([ampere])
    assert status[ampere.key] == "FAIL: local" and len(problems) == 1 and "stale" not in problems[0]


LOOP_SASS = """
\t\tFunction : _Z4loopv
        /*0000*/                   STL [R1], R4 ;                                  /* 0x0 */
        /*0010*/                   HMMA.16816.F32.BF16 R116, R104, R108, RZ ;      /* 0x0 */
        /*0020*/                   LDL R5, [R1] ;                                  /* 0x0 */
        /*0030*/              @!P0 BRA 0x10 ;                                      /* 0x0 */
        /*0040*/                   LDL.LU R4, [R1] ;                               /* 0x0 */
        /*0050*/               @P1 BRA !P2, 0x70 ;                                 /* 0x0 */
        /*0060*/                   EXIT ;                                          /* 0x0 */
        /*0070*/                   BRA 0x70;                                       /* 0x0 */
"""


def test_local_traffic_inside_loops(monkeypatch):
    """A backward branch closes a loop [target, branch]: only the LDL between 0x10 and 0x30
    counts; prologue and epilogue traffic may be excused, loop traffic only up to its count."""
    loop = kr.parse_sass(LOOP_SASS, {}, "sm_90a", "x.cu")[("sm_90a", "x.cu", "_Z4loopv")]
    assert (loop.ldl, loop.stl, loop.local_in_loops) == (2, 1, 1)
    excuse = kr.KnownException(r"^lean_kernel<", "local", "a reason", stack_bytes_at_most=32)
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", (excuse,))
    in_loop = kernel(LEAN, ldg={128: 1}, ldl=2, stack=16, local_in_loops=1)
    status, problems, _ = kr.check([in_loop])
    assert status[in_loop.key] == "FAIL: local" and "1 LDL / STL inside loops > the 0 excused" in problems[0]
    monkeypatch.setattr(kr, "KNOWN_EXCEPTIONS", (kr.KnownException(r"^lean_kernel<", "local", "a reason", 32, 1),))
    status, problems, _ = kr.check([in_loop])
    assert status[in_loop.key] == "known: local" and not problems


def test_bare_cubin_sections_take_the_defaults():
    sass = SASS.split("\tcode for sm_90a")[1]  # what cuobjdump prints for a .cubin: no fatbin header
    usage = RESOURCE_USAGE.split("Resource usage:")[1].split("Fatbin")[0]
    kernels = kr.parse_sass(sass, kr.parse_resource_usage(usage, "sm_90a", "x.cubin"), "sm_90a", "x.cubin")
    assert set(kernels) == {("sm_90a", "x.cubin", "_Z4leanv"), ("sm_90a", "x.cubin", "_Z5mergev")}
    assert kernels[("sm_90a", "x.cubin", "_Z4leanv")].stack == 56 and kernels[("sm_90a", "x.cubin", "_Z4leanv")].ldl == 1


def test_markdown_table_shape():
    kernels = sorted(parsed().values(), key=kr.order)
    for k in kernels:
        k.signature = k.name = k.mangled
    status, _, _ = kr.check(kernels)
    lines = kr.markdown(kernels, status).splitlines()
    assert len(lines) == 2 + len(kernels)
    assert len({line.count("|") for line in lines}) == 1
    row = next(line for line in lines if "_Z4leanv" in line and "sm_90a" in line)
    assert "| 1/1/1+1 | 1/1/1 |" in row  # LDG 128/64/32+narrow, LDGSTS 128/64/32


def built_extension_with_kernels():
    """(cuobjdump, .so paths) when both exist and the .so holds CUDA kernels, else None."""
    cuobjdump = kr.find_tool("cuobjdump")
    binaries = sorted(glob.glob(os.path.join(ROOT, "python", "attnkit", "_C*.so")))
    if not cuobjdump or not binaries:
        return None
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", *binaries], capture_output=True, text=True)
    return (cuobjdump, binaries) if "Function" in usage.stdout else None


@pytest.mark.skipif(built_extension_with_kernels() is None,
                    reason="needs cuobjdump and a built python/attnkit/_C*.so with CUDA kernels (make build)")
def test_report_on_the_built_extension():
    run = subprocess.run([sys.executable, TOOL], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    for family in ("prefill fwd", "prefill bwd main", "neighborhood fwd", "decode lean"):
        assert f"| {family} |" in run.stdout
    assert "kernel_report: clean" in run.stdout


def test_missing_binary_or_device_code_exits_2(tmp_path, capsys):
    assert kr.main([str(tmp_path / "absent.so")]) == 2
    host_only = tmp_path / "host.o"
    host_only.write_bytes(b"\x7fELF not a cuda object")
    if kr.find_tool("cuobjdump") and shutil.which("c++filt"):
        assert kr.main([str(host_only)]) == 2
    assert "kernel_report:" in capsys.readouterr().err
