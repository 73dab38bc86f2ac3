"""Combining partial attention results by their log-sum-exp (split-KV, cascade, ring)."""
from . import _checks
from ._ops import ops


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Merges two attentions of the same queries over disjoint key sets into the attention
    over their union: lse = log(exp(lse_a) + exp(lse_b)) and
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
    out (batch, seqlen, heads, head_dim) with lse (batch, heads, seqlen), or out (tokens,
    heads, head_dim) with lse (heads, tokens); lse float32. Both -inf gives 0 and -inf.
    Differentiable in all four inputs. Returns (out, lse).
    """
    for t, name in ((out_a, "out_a"), (lse_a, "lse_a"), (out_b, "out_b"), (lse_b, "lse_b")):
        _checks.check_tensor(t, name)
    _checks.require_kernel("merge_attention_states", out_a)
    return ops.merge_attention_states(out_a, lse_a, out_b, lse_b)
