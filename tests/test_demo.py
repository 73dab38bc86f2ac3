"""`make demo`'s checks (tools/demo.py, without its benchmark) pass on the CPU: every public
op against the float64 reference within the demo's bounds."""
import importlib.util
from pathlib import Path

import attnkit

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("attnkit_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_checks_pass_on_cpu():
    demo = load_demo()
    lines = []
    failures = demo.check_all_ops("cpu", out=lines.append)
    assert failures == [], "\n".join(lines)
    assert len(lines) == len(demo.CHECKS)


def test_demo_checks_every_public_op():
    """A new public op needs a check in the demo: every op of attnkit.__all__ is a word of a
    check's name (PagedKVCache through its append; QuantizedKV and dequantize_kv through
    quantize_kv; the helpers are not ops)."""
    demo = load_demo()
    names = {word for name, _, _ in demo.CHECKS for word in name.split()}
    covered = {"QuantizedKV": "quantize_kv", "dequantize_kv": "quantize_kv", "PagedKVCache": "PagedKVCache.append"}
    helpers = {"has_cuda_kernel", "cuda_available", "cuda_capabilities"}
    missing = [op for op in attnkit.__all__ if op not in helpers and covered.get(op, op) not in names]
    assert not missing, f"tools/demo.py has no check of {missing}"


def test_demo_fails_on_an_error_above_its_bound():
    demo = load_demo()
    bad = [("broken op", ("attention",), lambda dev, dtype, gen: ("case", [("out", 1.0, 1e-5), ("pages", 0, 0)]))]
    lines = []
    failures = demo.check_all_ops("cpu", checks=bad, out=lines.append)
    assert failures == ["broken op: out 1.0 > 1e-05"] and "FAIL" in lines[0]
    crash = [("crashing op", ("attention",), lambda dev, dtype, gen: 1 / 0)]
    assert demo.check_all_ops("cpu", checks=crash, out=lines.append)[0].startswith("crashing op: ZeroDivisionError")
