"""attnkit.merge_attention_states against the float64 reference, CPU and CUDA."""
import pytest
import torch

import attnkit
from attnkit import reference
from conftest import TOL, devices_for, randn, rel_err

DEVICES = devices_for("merge_attention_states")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["batched", "varlen"])
@pytest.mark.parametrize("head_dim", [64, 40, 3])
def test_merge(head_dim, layout, dtype, device, gen):
    out_shape, lse_shape = ((2, 9, 4, head_dim), (2, 4, 9)) if layout == "batched" else ((13, 4, head_dim), (4, 13))
    oa, ob = randn(gen, *out_shape, dtype=dtype, device=device), randn(gen, *out_shape, dtype=dtype, device=device)
    la, lb = randn(gen, *lse_shape, device=device) * 3, randn(gen, *lse_shape, device=device) * 3
    la.view(-1)[::5] = float("-inf")   # one side saw no key
    lb.view(-1)[::7] = float("-inf")   # both sides, where the two strides meet
    out, lse = attnkit.merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = reference.merge_attention_states(oa.cpu(), la.cpu(), ob.cpu(), lb.cpu())
    assert out.dtype == dtype and lse.dtype == torch.float32 and not out.isnan().any()
    assert rel_err(out, ref) <= TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert rel_err(lse.cpu()[finite], ref_lse[finite]) <= 1e-6
    both_empty = ~finite.transpose(-1, -2)
    assert (out.cpu()[both_empty] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_merge_strided(device, gen):
    base = randn(gen, 2, 6, 3, 2, 32, device=device)
    oa, ob = base[:, :, :, 0], base[:, :, :, 1]  # non-contiguous views
    la, lb = randn(gen, 2, 6, 3, device=device).transpose(1, 2), randn(gen, 2, 3, 6, device=device)
    out, lse = attnkit.merge_attention_states(oa, la, ob, lb)
    ref, ref_lse = reference.merge_attention_states(oa.cpu(), la.cpu(), ob.cpu(), lb.cpu())
    assert rel_err(out, ref) <= 1e-6 and rel_err(lse, ref_lse) <= 1e-6


def test_opcheck(gen):
    args = (randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5), randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5))
    torch.library.opcheck(torch.ops.attnkit.merge_attention_states.default, args)


def test_bad_input(gen):
    oa, la = randn(gen, 2, 5, 3, 16), randn(gen, 2, 3, 5)
    bad = [
        ("out_b", (oa, la, oa[:1], la)),
        ("out_b", (oa, la, oa.half(), la)),
        ("lse_a", (oa, la.double(), oa, la)),
        ("lse_b", (oa, la, oa, la.transpose(1, 2))),
        ("out_a", (oa[0, 0], la, oa[0, 0], la)),
    ]
    for name, args in bad:
        with pytest.raises((ValueError, RuntimeError), match=name):
            attnkit.merge_attention_states(*args)
