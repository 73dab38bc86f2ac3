"""attnkit.bench.roofline: FLOP and byte formulas against hand counts and the float64
reference's masks, the H100 ceilings lookup, and `python -m attnkit.bench --roofline` on a
machine without a GPU (analytical table, nothing timed)."""
import types

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.bench import main, roofline
from attnkit.bench.runner import Row


@pytest.mark.parametrize("seqlen_q, seqlen_k, pairs", [(4, 4, 10), (2, 5, 9), (5, 2, 3), (1, 7, 7)])
def test_causal_pairs_hand_counts(seqlen_q, seqlen_k, pairs):
    # bottom-right: query i sees keys <= i + seqlen_k - seqlen_q
    assert roofline.visible_pairs(seqlen_q, seqlen_k, True) == pairs
    assert int(torch.ones(seqlen_q, seqlen_k).tril(seqlen_k - seqlen_q).sum()) == pairs
    assert roofline.visible_pairs(seqlen_q, seqlen_k, False) == seqlen_q * seqlen_k


def test_prefill_hand_counts():
    # B1 S4 H1 D8, 2-byte elements: Q, K, V, O 64 B each, LSE 16 B
    fwd = roofline.prefill_work(1, 4, 4, 1, 1, 8, causal=False, backward=False, elt=2)
    assert (fwd.flops, fwd.bytes) == (4 * 16 * 8, 4 * 64 + 16)
    causal = roofline.prefill_work(1, 4, 4, 1, 1, 8, causal=True, backward=False, elt=2)
    assert (causal.flops, causal.bytes) == (4 * 10 * 8, 4 * 64 + 16)
    # backward reads Q, K, V, O, dO, LSE and writes dQ, dK, dV: 8 more tensors + LSE
    both = roofline.prefill_work(1, 4, 4, 1, 1, 8, causal=False, backward=True, elt=2)
    assert (both.flops, both.bytes) == (3.5 * 512, 272 + 8 * 64 + 16)
    # GQA: K, V (and dK, dV) have heads_kv heads; B2 S3 Hq4 Hkv2 D8 fp32
    gqa = roofline.prefill_work(2, 3, 3, 4, 2, 8, causal=False, backward=False, elt=4)
    q_side, kv_side = 2 * 3 * 4 * 8 * 4, 2 * 3 * 2 * 8 * 4
    assert (gqa.flops, gqa.bytes) == (4 * 2 * 4 * 9 * 8, 2 * q_side + 2 * kv_side + 2 * 4 * 3 * 4)


def test_decode_hand_counts():
    # B2 ctx100 Hq4 Hkv2 D8 bf16, page 16: 7 pages per sequence
    w = roofline.decode_work(2, 1, 100, 4, 2, 8, 2, page_size=16)
    kv, q_out, table, lens = 2 * 2 * 100 * 2 * 8 * 2, 2 * 2 * 1 * 4 * 8 * 2, 4 * 2 * 7, 4 * 2
    assert (w.flops, w.bytes) == (4 * 2 * 4 * 100 * 8, kv + q_out + table + lens)
    contiguous = roofline.decode_work(2, 1, 100, 4, 2, 8, 2)
    assert contiguous.bytes == kv + q_out + lens
    # decode is memory bound on an H100 by a wide margin: 1 FLOP per byte of bf16 K/V per q head of a group
    assert w.bound(989.0, 3350.0) == "memory"


def test_sparse_decode_hand_counts():
    # B1 Hq4 Hkv2 D8 bf16, 3 pages of 16 kept per kv head
    w = roofline.sparse_decode_work(1, 1, 4, 2, 8, pages_kept=3, page_size=16, elt=2)
    kv, indices, q_out = 2 * 1 * 2 * 48 * 8 * 2, 4 * 2 * 3 + 4, 2 * 4 * 8 * 2
    assert (w.flops, w.bytes) == (4 * 4 * 48 * 8, kv + indices + q_out)
    # the pipeline adds page_scores + select_pages over 10 pages: fp32 key_min / key_max per
    # (page, kv head, channel), a score written and read per (page, kv head), block table row
    pipe = roofline.sparse_decode_work(1, 1, 4, 2, 8, pages_kept=3, page_size=16, elt=2, pipeline_pages=10)
    assert pipe.bytes - w.bytes == 10 * 2 * (2 * 8 * 4 + 2 * 4) + 4 * 10
    assert pipe.flops - w.flops == 4 * 4 * 10 * 8


@pytest.mark.parametrize("kv_format, group_size, expected", [("int8", None, 128 + 8), ("fp8_e4m3", None, 128 + 4),
                                                             ("int4", None, 64 + 8), ("int4", 32, 64 + 4 * 8),
                                                             ("int8", 64, 128 + 2 * 8)])
def test_quant_bytes_per_token(kv_format, group_size, expected):
    # hand count for head_dim 128, and the layout quantize_kv really produces
    assert roofline.quant_bytes_per_token(kv_format, 128, group_size) == expected
    q = attnkit.quantize_kv(torch.randn(1, 1, 128), kv_format, group_size=group_size)
    stored = sum(t.numel() * t.element_size() for t in (q.data, q.scale, q.zero) if t is not None)
    assert stored == expected


def test_quant_decode_bytes():
    w = roofline.quant_decode_work(1, 1, 32, 4, 2, 128, "int8", None, q_elt=2, page_size=16)
    assert w.bytes == 32 * 2 * 2 * 136 + 2 * 4 * 128 * 2 + 4 * 2 + 4
    assert w.flops == roofline.decode_work(1, 1, 32, 4, 2, 128, 2).flops


def test_merge_hand_counts():
    w = roofline.merge_work(2, 3, 4, 8, 2)
    out, lse = 2 * 3 * 4 * 8, 2 * 3 * 4
    assert w.bytes == 3 * out * 2 + 3 * lse * 4 and w.flops == 4 * out + 8 * lse


@pytest.mark.parametrize("length, ks, dil, st, causal", [(5, 3, 1, 1, False), (9, 3, 1, 1, True), (13, 5, 2, 1, False),
                                                         (13, 5, 2, 1, True), (17, 7, 1, 3, False), (17, 7, 3, 2, True),
                                                         (4, 7, 1, 1, False), (31, 9, 2, 4, False), (6, 6, 1, 1, False)])
def test_neighborhood_axis_pairs_match_the_reference_mask(length, ks, dil, st, causal):
    if ks > length:  # the op requires kernel_size <= the axis (per dilation group); the count still holds
        ks = length
    expected = int(reference.neighborhood_axis_mask(length, ks, dil, st, causal).sum())
    assert roofline.neighborhood_pairs((length,), ks, dil, st, causal) == expected


def test_neighborhood_hand_counts():
    assert roofline.neighborhood_pairs((5,), 3) == 15  # every query sees exactly 3 keys
    assert roofline.neighborhood_pairs((4,), 3, causal=True) == 1 + 2 + 3 + 3
    assert roofline.neighborhood_pairs((8, 6), (3, 5), (1, 1), (1, 1), (False, False)) == (8 * 3) * (6 * 5)
    mask = reference.neighborhood_mask((6, 7), (3, 5), (2, 1), (1, 2), (False, True))
    assert roofline.neighborhood_pairs((6, 7), (3, 5), (2, 1), (1, 2), (False, True)) == int(mask.sum())
    w = roofline.neighborhood_work(2, (8, 6), 3, 16, pairs=720, elt=2)
    assert (w.flops, w.bytes) == (4 * 2 * 3 * 16 * 720, 4 * 2 * 48 * 3 * 16 * 2)


def test_floor_is_the_larger_time():
    w = roofline.Work(flops=2e12, bytes=1e9)  # 2 ms of compute at 1000 TFLOP/s, 1 ms of memory at 1000 GB/s
    assert w.floor_ms(1000.0, 1000.0) == pytest.approx(2.0) and w.bound(1000.0, 1000.0) == "compute"
    assert w.floor_ms(1000.0, 250.0) == pytest.approx(4.0) and w.bound(1000.0, 250.0) == "memory"


def test_work_of_reads_the_rows_shape_dicts():
    shape = {"batch": 1, "seqlen_q": 1, "context": 64, "heads_q": 4, "heads_kv": 2, "head_dim": 8, "page_size": 16,
             "err_on": "all"}
    assert roofline.work_of("decode", "paged16", "bfloat16", shape) == roofline.decode_work(1, 1, 64, 4, 2, 8, 2, 16)
    with pytest.raises(ValueError, match="family"):
        roofline.work_of("nope", "x", "float32", {})


def test_annotate_sets_the_fraction_of_the_floor():
    shape = {"batch": 1, "seqlen_q": 1, "context": 1 << 20, "heads_q": 32, "heads_kv": 8, "head_dim": 128}
    row = Row("decode", "contiguous", "bfloat16", shape, types.SimpleNamespace(median=2.0))
    ceilings = types.SimpleNamespace(matmul_tflops=1000.0, copy_gbps=2000.0)
    roofline.annotate(row, ceilings)
    floor = roofline.decode_work(1, 1, 1 << 20, 32, 8, 128, 2).bytes / 2000e9 * 1e3
    assert row.floor_ms == pytest.approx(floor) and row.pct_of_floor == pytest.approx(100 * floor / 2.0)
    assert row.shape["roofline"]["bound"] == "memory" and "roofline" not in shape


def test_h100_ceilings_from_a_committed_report(tmp_path):
    assert roofline.h100_ceilings(tmp_path).source.startswith("datasheet")
    (tmp_path / "nvidia-h100-pcie-20270101-abc.md").write_text(
        "- attnkit benchmark: device NVIDIA H100 PCIe\n- ceilings (measured in this run): matmul 600 TFLOP/s (x); "
        "copy 1800 GB/s (y)\n")
    assert roofline.h100_ceilings(tmp_path).tflops == roofline.H100_DATASHEET_TFLOPS  # PCIe is another GPU
    (tmp_path / "nvidia-h100-80gb-hbm3-20270102-def.md").write_text(
        "- attnkit benchmark: device NVIDIA H100 80GB HBM3\n- commit def\n"
        "- ceilings (measured in this run): matmul 702.5 TFLOP/s (bf16 8192^3); copy 2950 GB/s (1 GiB d2d)\n")
    got = roofline.h100_ceilings(tmp_path)
    assert (got.tflops, got.gbps) == (702.5, 2950.0) and "measured" in got.source


def test_cli_roofline_on_the_cpu_times_nothing(capsys):
    assert main(["--roofline", "--device", "cpu", "--family", "decode,quant,neighborhood"]) == 0
    out = capsys.readouterr().out
    assert "nothing timed" in out and "measuring ceilings" not in out
    rows = [line for line in out.splitlines() if line.startswith("| decode |")]
    assert len(rows) == 20  # the CUDA decode cases: 10 shapes, contiguous and paged
    assert any(line.startswith("| neighborhood | 3d_strided |") for line in out.splitlines())


def test_measured_rows_carry_the_floor_into_the_table():
    from attnkit.bench.report import table_lines
    from attnkit.bench.runner import Runner
    from attnkit.bench.timing import Ceilings

    args = types.SimpleNamespace(quick=True, only=None, budget_s=None, roofline=True)
    runner = Runner(args, "cpu", Ceilings(0.1, "fp32 mm", 20.0, "copy"), "abc1234")
    shape = {"batch": 1, "seqlen": 1024, "heads": 32, "head_dim": 128}
    stat = types.SimpleNamespace(median=40.0, spread=lambda: "39-41")
    runner.add_row(Row("merge", "merge", "float32", shape, stat, gbps=5.0, pct_of_ceiling=25.0, shape_str="B1",
                       id="merge/merge/float32/B1"), {})
    row = runner.rows[0]
    assert row.floor_ms == pytest.approx(roofline.merge_work(1, 1024, 32, 128, 4).bytes / 20e9 * 1e3)
    head, cells = [line for line in table_lines(runner.rows) if line.startswith("| ")][:2]
    assert "| floor ms | % of floor |" in head and f"| {row.pct_of_floor:.1f} |" in cells
