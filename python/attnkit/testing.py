"""Input generators shared by the tests, `make demo` and benchmarks (not part of the ops)."""
import torch


def realistic_kv(gen, batch, seqlen, kv_heads, head_dim, *, heads_q=None, outlier_channels=4, dtype=torch.float32,
                 device="cpu"):
    """q (batch, 1, heads_q, head_dim), k, v (batch, seqlen, kv_heads, head_dim) drawn from the
    CPU generator `gen` like real decode inputs, for quantization accuracy (docs/quantization.md):
    - every (kv head, channel) of K and V has its own mean ~ N(0, 0.5^2) and unit spread;
    - `outlier_channels` channels per kv head of K (fixed across tokens, as KIVI and KVQuant
      observe) have mean +-10 (random sign) and spread 3;
    - q ~ N(0, 2^2), so the logits' spread over tokens is about 2 (a peaked softmax).
    heads_q defaults to 4 * kv_heads (GQA 4:1)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    heads_q = heads_q or 4 * kv_heads
    mean_k = 0.5 * randn(kv_heads, head_dim)
    spread_k = torch.ones(kv_heads, head_dim, dtype=torch.float64)
    for g in range(kv_heads):
        channels = torch.randperm(head_dim, generator=gen)[:outlier_channels]
        signs = torch.randint(0, 2, (outlier_channels,), generator=gen).double() * 2 - 1
        mean_k[g, channels] = 10.0 * signs
        spread_k[g, channels] = 3.0
    mean_v = 0.5 * randn(kv_heads, head_dim)
    k = mean_k + spread_k * randn(batch, seqlen, kv_heads, head_dim)
    v = mean_v + randn(batch, seqlen, kv_heads, head_dim)
    q = 2.0 * randn(batch, 1, heads_q, head_dim)
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))
