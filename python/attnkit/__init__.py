"""attnkit: hand-written attention kernels (C++ CPU and CUDA) as torch ops.

Ops: attention, attention_varlen (prefill, with autograd), decode (contiguous or paged KV
cache), merge_attention_states, neighborhood_attention (1-3 D, with autograd); PagedKVCache
(a paged KV cache with a page allocator and per-page key min / max); page_scores,
select_pages, sparse_decode, sparse_decode_tokens, streaming_page_indices (query-aware
sparse decode); quantize_kv, dequantize_kv (int8 / int4 / fp8 e4m3 KV formats); block_sparse_attention,
block_sparse_attention_varlen (with autograd; key blocks and individual key columns) and its list builders block_topk_indices, pooled_block_scores, strided_shard_indices,
block_attention_map, vertical_slash_indices;
attnkit.distributed: context parallelism over torch.distributed (ring and all-gather
attention, sharded decode).
attnkit.reference holds the float64 oracle of each op.
"""
import torch

from ._capability import cuda_capabilities
from ._ops import CUDA_KERNELS
from .block_sparse import (block_attention_map, block_sparse_attention, block_sparse_attention_varlen,
                           block_topk_indices, canonical_block_lists, canonical_column_lists, lists_from_block_mask,
                           pooled_block_scores, strided_shard_indices, vertical_slash_indices)
from .decode import decode
from .merge import merge_attention_states
from .neighborhood import neighborhood_attention
from .paged_cache import PagedKVCache
from .prefill import attention, attention_varlen
from .quant import QuantizedKV, dequantize_kv, quantize_kv
from .sparse import page_scores, select_pages, sparse_decode, sparse_decode_tokens, streaming_page_indices
from . import distributed  # context parallelism (attnkit.distributed.ring_attention, ...): docs/context_parallel.md

__version__ = "0.1.0"


def has_cuda_kernel(name):
    """Whether op `name` has a CUDA kernel in this build. Names: "attention" (attention,
    attention_varlen and their backward), "decode", "sparse_decode" (sparse_decode,
    sparse_decode_tokens), "merge_attention_states", "paged_cache_append" (PagedKVCache.append),
    "paged_cache_append_quantized" (PagedKVCache.append with kv_format), "page_scores",
    "select_pages", "quantize_kv", "dequantize_kv", "neighborhood_attention" (forward and
    backward), "block_sparse_attention" (forward and backward). Any other name raises ValueError."""
    if name not in CUDA_KERNELS:
        raise ValueError(f"has_cuda_kernel: unknown op name {name!r}; names: {sorted(CUDA_KERNELS)}")
    return CUDA_KERNELS[name]


def cuda_available():
    """True when the CUDA kernels were built and a CUDA GPU they run on is present
    (attnkit.cuda_capabilities() says which GPUs and why not)."""
    return any(CUDA_KERNELS.values()) and torch.cuda.is_available() and any(
        d["served"] for d in cuda_capabilities()["devices"])


__all__ = ["attention", "attention_varlen", "decode", "merge_attention_states", "has_cuda_kernel",
           "cuda_available", "cuda_capabilities", "PagedKVCache", "page_scores", "select_pages", "sparse_decode", "sparse_decode_tokens",
           "streaming_page_indices", "quantize_kv", "dequantize_kv", "QuantizedKV", "neighborhood_attention",
           "block_sparse_attention", "block_sparse_attention_varlen", "block_topk_indices", "pooled_block_scores", "strided_shard_indices",
           "block_attention_map", "canonical_block_lists", "canonical_column_lists", "lists_from_block_mask",
           "vertical_slash_indices"]
