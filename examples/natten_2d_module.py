"""NATTEN's NeighborhoodAttention2D from attnkit.compat.natten on a small image feature map:
forward and backward on the CPU. With `from natten import NeighborhoodAttention2D` instead, the
same script runs on NATTEN (docs/compat_natten.md)."""
import torch

from attnkit.compat.natten import NeighborhoodAttention2D

torch.manual_seed(0)
x = torch.randn(2, 14, 14, 64, requires_grad=True)  # (batch, height, width, channels)
layer = NeighborhoodAttention2D(embed_dim=64, num_heads=4, kernel_size=7, dilation=2)
y = layer(x)  # 7 x 7 neighbours per pixel, every other row and column
y.square().mean().backward()
print(f"NeighborhoodAttention2D: x {tuple(x.shape)} -> y {tuple(y.shape)}, loss grad norms: "
      f"x {x.grad.norm():.4f}, qkv.weight {layer.qkv.weight.grad.norm():.4f}")
