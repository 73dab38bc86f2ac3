"""Call-compatible front ends for code written against other attention libraries.

attnkit.compat.flash_attn  FlashAttention 2.8 functions (flash_attn_func, ..._varlen_func,
                           flash_attn_with_kvcache) and FA3 aliases
attnkit.compat.natten      NATTEN 0.21 functions (na1d / na2d / na3d, attention,
                           merge_attentions) and NeighborhoodAttention1D/2D/3D modules
attnkit.compat.flashinfer  layout conversions for FlashInfer users (CSR page tables,
                           base-2 LSE, merge_state)

Each submodule is imported on its own (`from attnkit.compat import flash_attn`); none needs
the library it imitates. Switching: README "Switching from ...".
"""
