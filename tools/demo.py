"""`make demo`: runs every attnkit op on the best device present, checks it against the
float64 reference, then runs a quick benchmark against torch SDPA."""
import subprocess
import sys

import torch

import attnkit
from attnkit import reference


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def main():
    device = "cuda" if attnkit.cuda_available() else "cpu"
    print(f"attnkit {attnkit.__version__} on {device}; CUDA kernels built: "
          f"{[k for k in ('attention', 'decode', 'merge_attention_states') if attnkit.has_cuda_kernel(k)]}")
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def on(name):  # the device an op runs on: CPU where its CUDA kernel has not landed yet
        return device if device == "cpu" or attnkit.has_cuda_kernel(name) else "cpu"

    dev = on("attention")
    q, k, v = randn(2, 300, 8, 64), randn(2, 300, 2, 64), randn(2, 300, 2, 64)
    qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
    out = attnkit.attention(qd, kd, vd, causal=True)
    grads = torch.autograd.grad(out.sum(), (qd, kd, vd))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qr, kr, vr, causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), (qr, kr, vr))
    errs = ", ".join(f"d{n} {rel_err(g.cpu(), r):.1e}" for n, g, r in zip("qkv", grads, ref_grads))
    print(f"attention  [{dev}] (2, 300, 8, 64) GQA 4:1 causal: rel err out {rel_err(out.cpu(), ref.detach()):.1e}, {errs}")

    dev = on("decode")
    pages, page_size = 64, 16
    kc, vc = randn(pages, page_size, 2, 64), randn(pages, page_size, 2, 64)
    table = torch.randperm(pages, generator=gen).int().view(2, 32)
    lens = torch.tensor([300, 511], dtype=torch.int32)
    qd = randn(2, 2, 8, 64)
    out = attnkit.decode(qd.to(dev), kc.to(dev), vc.to(dev), lens.to(dev), block_table=table.to(dev))
    ref, _ = reference.decode(qd.double(), kc.double(), vc.double(), lens, block_table=table)
    print(f"decode     [{dev}] paged (page 16), 2 queries, lengths {lens.tolist()}: rel err {rel_err(out.cpu(), ref):.1e}")

    dev = on("merge_attention_states")
    oa, ob = randn(2, 5, 8, 64), randn(2, 5, 8, 64)
    la, lb = randn(2, 8, 5), randn(2, 8, 5)
    out, lse = attnkit.merge_attention_states(oa.to(dev), la.to(dev), ob.to(dev), lb.to(dev))
    ref, _ = reference.merge_attention_states(oa.double(), la.double(), ob.double(), lb.double())
    print(f"merge      [{dev}] (2, 5, 8, 64): rel err {rel_err(out.cpu(), ref):.1e}")

    print("\nquick benchmark (python -m attnkit.bench --quick):", flush=True)
    sys.exit(subprocess.call([sys.executable, "-m", "attnkit.bench", "--quick", "--device", device]))


if __name__ == "__main__":
    main()
