"""attnkit as a Hugging Face transformers attention implementation (docs/transformers.md).

    from attnkit.integrations import transformers as attnkit_hf
    attnkit_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnkit")

register() adds "attnkit" to transformers' AttentionInterface (attnkit_attention_forward)
and AttentionMaskInterface (attnkit_mask), and lets continuous batching (generate_batch) keep
it. Written against transformers 5.22.2, which only this module imports, never `import attnkit`.
"""
import functools
import inspect
import sys
import warnings

import torch

import attnkit
from attnkit.reference import mask as visibility

NAME = "attnkit"

# transformers mask functions (masking_utils) whose pattern attnkit_attention_forward applies:
# from is_causal and sliding_window, and from the packed sequences' cu_seqlens attnkit_mask() returns.
_SERVED_MASK_PARTS = {"causal_mask_function", "bidirectional_mask_function",
                      "sliding_window_overlay.<locals>.inner_mask",
                      "sliding_window_bidirectional_overlay.<locals>.inner_mask",
                      "packed_sequence_mask_function.<locals>.inner_mask"}
_WARNED = set()   # fallback reasons already warned about


def register():
    """Registers "attnkit" with transformers; calling it again changes nothing. Returns NAME."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attnkit_attention_forward)
    AttentionMaskInterface.register(NAME, attnkit_mask)
    try:  # only continuous batching needs this; without it generate_batch raises transformers' own error
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
        switch = ContinuousBatchingManager.switch_to_cb_friendly_attn
    except (ImportError, AttributeError):
        return NAME
    if not getattr(switch, "_keeps_attnkit", False):
        ContinuousBatchingManager.switch_to_cb_friendly_attn = _keep_attnkit(switch)
    return NAME


def _keep_attnkit(switch):
    """transformers 5.22's continuous batching accepts only sdpa, paged|eager and flash
    implementations; attnkit serves its paged cache, so a model on attnkit stays on it."""
    @functools.wraps(switch)
    def keep(self, model, *args, **kwargs):
        if model.config._attn_implementation != NAME:
            switch(self, model, *args, **kwargs)
    keep._keeps_attnkit = True
    return keep


def attnkit_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers mask function for "attnkit". Like flash_attention_2's: the 2-D bool padding
    mask of the keys (batch, keys written), or None when every key is present and written;
    for packed sequences their int32 cu_seqlens (1-D). Patterns attnkit cannot express
    (chunked attention, mask overlays, cross-attention) get sdpa's 4-D mask, which
    attnkit_attention_forward hands to sdpa or eager."""
    from transformers import masking_utils

    parts = _mask_parts(mask_function or masking_utils.causal_mask_function)
    names = {_name(f) for f in parts}
    written = int(q_offset) + q_length - int(kv_offset)   # keys up to the last query's position
    if not (names <= _SERVED_MASK_PARTS and written <= kv_length
            and ("causal_mask_function" in names or q_length == kv_length == written)):
        return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                       q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                       attention_mask=attention_mask, **{**kwargs, "allow_is_causal_skip": False})
    for f in parts:
        if _name(f) == "packed_sequence_mask_function.<locals>.inner_mask":
            return _cu_seqlens(inspect.getclosurevars(f).nonlocals["packed_sequence_mask"])
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        return attention_mask if attention_mask.shape[1] < kv_length or not attention_mask.all() else None
    if written < kv_length:   # a static cache: its slots past the queries are not written yet
        return torch.ones(batch_size, written, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    return None


def _mask_parts(fn):
    """The mask functions that transformers' and_masks() combined into fn."""
    combined = inspect.getclosurevars(fn).nonlocals.get("mask_functions") \
        if _name(fn) == "and_masks.<locals>.and_mask" else None
    return [fn] if combined is None else [p for f in combined for p in _mask_parts(f)]


def _name(fn):
    """Qualified name of a function of transformers.masking_utils; repr of anything else."""
    if getattr(fn, "__module__", None) == "transformers.masking_utils":
        return fn.__qualname__
    return repr(fn)


def attnkit_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, cache=None, s_aux=None, **kwargs):
    """transformers attention function: query (batch, heads, seqlen_q, head_dim), key / value
    (batch, kv_heads, seqlen_k, head_dim) -> (out (batch, seqlen_q, heads, head_dim), None).

    attention_mask: as attnkit_mask() returns it, or 4-D. Packed sequences, transformers'
    varlen kwargs (cu_seq_lens_q / _k, max_length_q / _k: padding-free batches, continuous
    batching's paged `cache`) and padding run attnkit.attention_varlen; the rest
    attnkit.attention, or attnkit.decode for up to 16 new queries in inference. What attnkit
    cannot compute goes to transformers' sdpa, or to the model's eager function where sdpa
    cannot compute it either, with one warning per reason.
    """
    from transformers.generation.continuous_batching import PagedAttentionCache

    paged = isinstance(cache, PagedAttentionCache)
    if paged:   # its varlen kwargs describe the batch; the mask saw its position ids as packed sequences
        attention_mask = None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    reason = _unserved(module, query, value, attention_mask, dropout, kwargs)
    if paged:
        if reason:
            raise NotImplementedError(f"attnkit cannot serve this continuous-batching model: {reason}")
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    padding = cu_seqlens = None
    if attention_mask is None:
        cu_seqlens = _varlen_kwargs(kwargs)
    elif attention_mask.dim() == 1:
        cu_seqlens = _packed(attention_mask)
    elif attention_mask.dim() == 2:
        padding = attention_mask.bool()
        if padding.shape[1] < key.shape[2]:   # a static cache: slots past the mask are unwritten
            key, value = key[:, :, :padding.shape[1]], value[:, :, :padding.shape[1]]
            padding = None if padding.all() else padding
    if reason is None and sliding_window and padding is not None and _has_holes(padding):
        reason = "a sliding window over a padding mask with holes (windows count positions, attnkit counts keys)"
    window = (-1, -1) if not sliding_window else (sliding_window - 1, 0 if causal else sliding_window - 1)
    if reason:
        mask = attention_mask if attention_mask is not None and attention_mask.dim() > 2 else \
            _dense_mask(query, key, padding, cu_seqlens, causal, window)
        return _fallback(reason, module, query, key, value, mask, dropout, scaling, softcap, s_aux, kwargs)

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))   # (batch, seqlen, heads, head_dim) views
    opts = dict(causal=causal, scale=scaling, window=window, softcap=softcap or 0.0, return_lse=True)
    if cu_seqlens is not None:
        out, lse = attnkit.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *cu_seqlens, **opts)
        out, lse = out.view(q.shape), lse.view(lse.shape[0], *q.shape[:2]).permute(1, 0, 2)
    elif padding is not None:
        out, lse = _unpadded(q, k, v, padding, opts)
    elif causal and q.shape[1] <= 16 and q.shape[1] < k.shape[1] and _inference(q, k, v) and _has_kernel("decode", q):
        lengths = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
        out, lse = attnkit.decode(q, k, v, lengths, scale=scaling, softcap=opts["softcap"], window=window[0],
                                  return_lse=True)
    else:
        out, lse = attnkit.attention(q, k, v, **opts)
    return (out if s_aux is None else _with_sinks(out, lse, s_aux)), None


def _with_sinks(out, lse, sinks):
    """Attention with one learned sink logit per head (gpt-oss's s_aux): the sink joins every
    row's softmax and contributes no value, so out * sum_j e^s_j / (sum_j e^s_j + e^sink) =
    out * sigmoid(lse - sink). lse (batch, heads, seqlen_q); differentiable in all three."""
    factor = torch.sigmoid(lse - sinks.float()[None, :, None]).transpose(1, 2).unsqueeze(-1)
    return (out.float() * factor).to(out.dtype)


def _unserved(module, query, value, attention_mask, dropout, kwargs):
    """Why attnkit cannot compute this call, or None (sinks, s_aux, it computes: _with_sinks)."""
    if not _has_kernel("attention", query):
        return f"no attnkit kernel for {query.dtype} head_dim {query.shape[-1]} on {query.device.type}"
    if value.shape[-1] != query.shape[-1]:
        return "a value head_dim unlike the query's"
    if dropout:
        return "attention dropout > 0"
    if _wants_weights(module, kwargs):
        return "output_attentions=True (attention weights)"
    if kwargs.get("position_bias") is not None:
        return "an additive position_bias"
    if attention_mask is not None and attention_mask.dim() > 2:
        return "a 4-D attention mask (a custom mask, or a pattern such as chunked attention or a mask overlay)"
    return None


def _wants_weights(module, kwargs):
    return bool(kwargs.get("output_attentions", getattr(getattr(module, "config", None), "output_attentions", False)))


def _has_kernel(op, t):
    """Whether attnkit has a kernel for op ("attention" or "decode") for t's device, dtype, head_dim."""
    if t.device.type == "cpu":
        return True
    return (t.device.type == "cuda" and attnkit.cuda_available() and attnkit.has_cuda_kernel(op)
            and t.dtype in (torch.float16, torch.bfloat16) and t.shape[-1] % 8 == 0 and t.shape[-1] <= 256)


def _inference(*tensors):
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _varlen_kwargs(kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) from transformers' varlen kwargs, or None."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if any(kwargs.get(n) is None for n in names):
        return None
    return (kwargs["cu_seq_lens_q"].int(), kwargs["cu_seq_lens_k"].int(), int(kwargs["max_length_q"]),
            int(kwargs["max_length_k"]))


def _cu_seqlens(sequence_ids):
    """int32 cu_seqlens of the flattened rows of packed sequences: sequence_ids (batch, seqlen),
    non-decreasing in each row, as transformers' find_packed_sequence_indices gives them."""
    rows = torch.arange(sequence_ids.shape[0], device=sequence_ids.device)[:, None] * sequence_ids.shape[1]
    return _cumsum(torch.unique_consecutive(sequence_ids + rows, return_counts=True)[1])


def _packed(cu_seqlens):
    """The varlen arguments of packed self-attention."""
    longest = int(cu_seqlens.diff().max())
    return cu_seqlens, cu_seqlens, longest, longest


def _has_holes(padding):
    """Whether the present keys of some row are not one contiguous run."""
    runs = padding[:, 0].int() + (padding[:, 1:] & ~padding[:, :-1]).sum(1)
    return bool((runs > 1).any())


def _unpadded(q, k, v, padding, opts):
    """attention_varlen over the present keys (padding, (batch, seqlen_k)) and the present
    queries (its last seqlen_q columns) -> (out, lse (batch, heads, seqlen_q)); absent query
    rows get out 0 and lse -inf."""
    q_present = padding[:, -q.shape[1]:]
    lens_q, lens_k = q_present.sum(1, dtype=torch.int32), padding.sum(1, dtype=torch.int32)
    out, lse = attnkit.attention_varlen(q[q_present], k[padding], v[padding], _cumsum(lens_q), _cumsum(lens_k),
                                        int(lens_q.max()), int(lens_k.max()), **opts)
    full_lse = lse.new_full((q.shape[0], q.shape[1], q.shape[2]), float("-inf")).index_put((q_present,), lse.T)
    return out.new_zeros(q.shape).index_put((q_present,), out), full_lse.transpose(1, 2)


def _cumsum(lengths):
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _dense_mask(query, key, padding, cu_seqlens, causal, window):
    """(batch, 1, seqlen_q, seqlen_k) bool: attnkit's bottom-right causal / window pattern and
    the padding or the packed sequences. A row that sees nothing sees everything (its output
    is unused) so that sdpa stays finite."""
    batch, seqlen_q, seqlen_k = query.shape[0], query.shape[2], key.shape[2]
    mask = visibility(seqlen_q, seqlen_k, causal, window, device=query.device)[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, :] & padding[:, None, -seqlen_q:, None]
    if cu_seqlens is not None:   # self-attention over packed sequences: seqlen_q == seqlen_k
        cu = cu_seqlens[0].long()
        seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff()).view(batch, -1)
        mask = mask & (seq[:, None, :, None] == seq[:, None, None, :])
    return mask | ~mask.any(-1, keepdim=True)


def _fallback(reason, module, query, key, value, mask, dropout, scaling, softcap, s_aux, kwargs):
    """transformers' sdpa, or the model's eager function where sdpa cannot compute the call
    (softcap, sinks, attention weights), under the 4-D mask `mask`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    eager = bool(softcap) or s_aux is not None or _wants_weights(module, kwargs)
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None) if eager \
        else sdpa_attention_forward
    if function is None:
        raise NotImplementedError(f"attnkit cannot serve {reason}, and {type(module).__name__}'s module has no "
                                  "eager_attention_forward to fall back to")
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"attnkit: {reason}: falling back to transformers' {'eager' if eager else 'sdpa'} attention",
                      stacklevel=3)
    if eager:
        kwargs = dict(kwargs, softcap=softcap, s_aux=s_aux)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    return function(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
