"""One training step of a tiny language model whose attention is written against
FlashAttention's API, running on attnkit's kernels through attnkit.compat.flash_attn (with
`from flash_attn import ...` instead, the same code runs on flash-attn). CPU, float32, a
few seconds.

Run from the repository root: PYTHONPATH=python python examples/flash_attn_training_step.py
"""
import torch

from attnkit.compat.flash_attn import flash_attn_func, flash_attn_varlen_func


class Attention(torch.nn.Module):
    """Causal sliding-window GQA self-attention with softcapped logits."""

    def __init__(self, dim, heads, kv_heads, window):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, dim // heads, window
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        """x (batch, seqlen, dim); or packed documents (1, total, dim) with cu_seqlens."""
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv(x).split(sizes, dim=-1))
        options = dict(causal=True, window_size=(self.window, 0), softcap=30.0)
        if cu_seqlens is None:
            y = flash_attn_func(q, k, v, **options)
        else:
            y = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       **options)[None]
        return self.out(y.flatten(-2))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, dim=64, heads=4, kv_heads=2, window=24, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Attention(dim, heads, kv_heads, window) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, **packing):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(self.norm(x), **packing)
        return self.head(self.norm(x))


def loss_of(model, tokens, documents):
    """Next-token loss over a batch of rows plus over documents packed into one row."""
    logits = model(tokens[:, :-1])
    dense = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    packed = torch.cat(documents)[None]
    lengths = torch.tensor([len(d) for d in documents])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    logits = model(packed, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))[0]
    starts = set(cu_seqlens[1:].tolist())  # no target across a document boundary
    keep = torch.tensor([i + 1 not in starts for i in range(packed.shape[1] - 1)])
    return dense + torch.nn.functional.cross_entropy(logits[:-1][keep], packed[0, 1:][keep])


def main():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 65))
    documents = [tokens[0, :17], tokens[1, :40], tokens[2, :5], tokens[3]]
    loss = loss_of(model, tokens, documents)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_of(model, tokens, documents)
    print(f"flash_attn training step: loss {loss.item():.4f} -> {after.item():.4f}")


if __name__ == "__main__":
    main()
