"""PagedKVCache: a paged KV cache with a page allocator and per-page key min / max (the
Quest metadata), holding the tensors attnkit.decode takes, in q's dtype or quantized
(kv_format, docs/quantization.md). Host-side bookkeeping in Python; the row writes (and
their quantization) and the min / max updates run in one kernel, paged_cache_append or
paged_cache_append_quantized (docs/paged_cache.md)."""
from collections import deque

import torch

from ._ops import CUDA_KERNELS, ops
from .quant import QuantizedKV, _check_flag, _check_format

ROTATABLE_HEAD_DIMS = (32, 64, 128, 256)


@torch.library.register_fake("attnkit::paged_cache_append")
def _paged_cache_append_fake(k_pages, v_pages, key_min, key_max, k, v, slot_mapping):
    return None


@torch.library.register_fake("attnkit::paged_cache_append_quantized")
def _paged_cache_append_quantized_fake(k_pages, v_pages, k_scale, k_zero, v_scale, v_zero, key_min, key_max, k, v,
                                       slot_mapping, key_offset, token_seq, kv_format, group_size, rotate_keys):
    return None


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PagedKVCache:
    """A KV cache of `num_pages` pages of `page_size` tokens, shared by up to `max_seqs`
    sequences (ids 0 .. max_seqs - 1).

    Tensors (all on `device`):
      k_pages, v_pages  (num_pages, page_size, num_kv_heads, head_dim), `dtype`
      block_table       int32 (max_seqs, max_pages_per_seq): physical page of each logical
                        page of a sequence, -1 where none is allocated
      cache_seqlens     int32 (max_seqs,): tokens stored per sequence
      key_min, key_max  float32 (num_pages, num_kv_heads, head_dim): per page, kv head and
                        channel, the min / max of the keys stored in the page (rows past a
                        partial page's end do not count; a page's values are reset when it
                        is allocated again and its first row is written)

    On CUDA, append is one fused kernel launch (rows, their quantization, and key min / max); the allocator and
    the slot plan stay on the host, so append itself is not for CUDA-graph capture, while
    decode, page_scores and select_pages on these tensors are (docs/paged_cache.md).

    Quantized (kv_format "int8", "int4" or "fp8_e4m3", group_size None / 32 / 64 / 128 as
    attnkit.quantize_kv takes them; head_dim a multiple of 32, at most 256): appended rows are
    quantized on the way in, in the append kernel; `dtype` is then the dtype of the rows
    append takes. k_pages / v_pages hold
    the uint8 codes, (num_pages, page_size, num_kv_heads, head_dim / channels_per_byte), and
      k_scale, v_scale  float32 (num_pages, page_size, num_kv_heads, groups)
      k_zero, v_zero    like k_scale (None for fp8_e4m3)
    key_min / key_max stay those of the keys as appended (before quantization and centering).
    center_keys (quantized caches only, default True): K is stored as quantize(k - c) with c
    = key_offset[seq] (float32 (max_seqs, num_kv_heads, head_dim)), the mean over tokens of
    the first chunk appended to the sequence. Subtracting a per-(sequence, kv head) vector
    shifts all logits of a query by the same q . c, so decode's output is unchanged while the
    outlier channels of K stop setting the quantization step (docs/quantization.md has the
    measured errors); decode's lse is then that of the stored keys (add scale * q . c for the
    true one), and softcap (not shift-invariant) must stay 0.
    rotate_keys (quantized caches only): K is stored rotated, as quantize_kv(k - c,
    rotate=True), and k_cache says so (rotated=True): decode rotates its queries instead.
    The rotation spreads K's outlier channels over all channels, which int4 with one scale per
    row needs to meet its accuracy bound (docs/quantization.md). Default (None): on for int8
    and int4 where head_dim is 32, 64, 128 or 256, off for fp8_e4m3 (a float format, which
    the rotation does not help: measured in docs/quantization.md).

    Decode of sequences `ids` (an int32 / int64 index tensor), either kind of cache:
      attnkit.decode(q, cache.k_cache, cache.v_cache, cache.cache_seqlens[ids],
                     block_table=cache.block_table[ids])
    """

    def __init__(self, num_pages, page_size, num_kv_heads, head_dim, *, dtype=torch.float32, device="cpu",
                 max_seqs=1, max_pages_per_seq=None, kv_format=None, group_size=None, center_keys=True,
                 rotate_keys=None):
        self.num_pages = _positive_int(num_pages, "num_pages")
        self.page_size = _positive_int(page_size, "page_size")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.max_seqs = _positive_int(max_seqs, "max_seqs")
        self.max_pages_per_seq = _positive_int(num_pages if max_pages_per_seq is None else max_pages_per_seq,
                                               "max_pages_per_seq")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        device = torch.device(device)
        append_op = "paged_cache_append" if kv_format is None else "paged_cache_append_quantized"
        if device.type != "cpu" and not (device.type == "cuda" and CUDA_KERNELS[append_op]):
            raise NotImplementedError(f"attnkit.PagedKVCache has no append kernel for {device.type} tensors in this "
                                      f"build")
        self.kv_format, self.group_size = kv_format, group_size
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        if kv_format is not None:
            _check_format(kv_format, group_size)
            if head_dim % 32 != 0 or head_dim > 256:
                raise ValueError(f"head_dim must be a multiple of 32, at most 256, for a quantized cache, got "
                                 f"{head_dim}")
            if rotate_keys is None:
                rotate_keys = kv_format != "fp8_e4m3" and head_dim in ROTATABLE_HEAD_DIMS
            elif _check_flag(rotate_keys, "rotate_keys") and head_dim not in ROTATABLE_HEAD_DIMS:
                raise ValueError(f"rotate_keys=True needs head_dim in {ROTATABLE_HEAD_DIMS} (a Hadamard rotation), "
                                 f"got {head_dim}")
            if (group_size or head_dim) > head_dim or head_dim % (group_size or head_dim) != 0:
                raise ValueError(f"group_size ({group_size}) must divide head_dim ({head_dim})")
            groups = head_dim // (group_size or head_dim)
            shape = (num_pages, page_size, num_kv_heads, head_dim // 2 if kv_format == "int4" else head_dim)
        elif group_size is not None:
            raise ValueError(f"group_size is for a quantized cache (kv_format given), got {group_size!r}")
        elif rotate_keys is not None:
            raise ValueError(f"rotate_keys is for a quantized cache (kv_format given), got {rotate_keys!r}")
        self.rotate_keys = bool(rotate_keys)
        self.k_pages = torch.zeros(shape, dtype=dtype if kv_format is None else torch.uint8, device=device)
        device = self.k_pages.device  # "cuda" -> "cuda:<current index>", as the inputs' .device reads
        self.dtype, self.device = dtype, device
        self.v_pages = torch.zeros_like(self.k_pages)
        self.k_scale = self.k_zero = self.v_scale = self.v_zero = self.key_offset = None
        if kv_format is not None:
            scales = (num_pages, page_size, num_kv_heads, groups)
            self.k_scale = torch.zeros(scales, device=device)
            self.v_scale = torch.zeros(scales, device=device)
            if kv_format != "fp8_e4m3":
                self.k_zero = torch.zeros(scales, device=device)
                self.v_zero = torch.zeros(scales, device=device)
            if center_keys:
                self.key_offset = torch.zeros((max_seqs, num_kv_heads, head_dim), device=device)
        self.key_min = torch.full((num_pages, num_kv_heads, head_dim), float("inf"), device=device)
        self.key_max = torch.full((num_pages, num_kv_heads, head_dim), float("-inf"), device=device)
        self.block_table = torch.full((max_seqs, self.max_pages_per_seq), -1, dtype=torch.int32, device=device)
        self.cache_seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._free = deque(range(num_pages))
        self._pages = [[] for _ in range(max_seqs)]  # physical pages per sequence, in logical order
        self._lens = [0] * max_seqs

    @property
    def k_cache(self):
        """The K pages as attnkit.decode takes them: k_pages, or a QuantizedKV of a quantized cache."""
        if self.kv_format is None:
            return self.k_pages
        return QuantizedKV(self.k_pages, self.k_scale, self.k_zero, self.kv_format, self.group_size,
                           self.rotate_keys)

    @property
    def v_cache(self):
        """The V pages as attnkit.decode takes them: v_pages, or a QuantizedKV of a quantized cache."""
        if self.kv_format is None:
            return self.v_pages
        return QuantizedKV(self.v_pages, self.v_scale, self.v_zero, self.kv_format, self.group_size)

    @property
    def num_free_pages(self):
        return len(self._free)

    def seq_len(self, seq_id):
        return self._lens[self._check_seq_id(seq_id, "seq_id")]

    def pages(self, seq_id):
        """The physical pages of sequence `seq_id`, in logical order."""
        return list(self._pages[self._check_seq_id(seq_id, "seq_id")])

    def _check_seq_id(self, seq_id, name):
        if isinstance(seq_id, torch.Tensor) and seq_id.dim() == 0 and not seq_id.is_floating_point():
            seq_id = int(seq_id)
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < self.max_seqs:
            raise ValueError(f"{name} must be an int in [0, max_seqs = {self.max_seqs}), got {seq_id!r}")
        return seq_id

    def _check_rows(self, t, name, n_tokens):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != self.dtype or t.device != self.device:
            raise ValueError(f"{name} must be {self.dtype} on {self.device}, got {t.dtype} on {t.device}")
        want = (self.num_kv_heads, self.head_dim)
        if t.dim() != 3 or tuple(t.shape[1:]) != want or (n_tokens is not None and t.shape[0] != n_tokens):
            rows = "n_tokens" if n_tokens is None else str(n_tokens)
            raise ValueError(f"{name} must have shape ({rows}, {want[0]}, {want[1]}) "
                             f"(tokens, num_kv_heads, head_dim), got {tuple(t.shape)}")

    def append(self, seq_ids, k, v):
        """Append keys / values to sequences and advance their cache_seqlens.

        Two forms:
          append(seq_id: int, k, v): a chunk of n_tokens >= 0 rows for one sequence, k and v
              (n_tokens, num_kv_heads, head_dim);
          append(seq_ids: list of ints or a 1-D integer tensor, k, v): one token for each of
              B distinct sequences, k and v (B, num_kv_heads, head_dim), row i for seq_ids[i].
        Pages are allocated as needed. When the free pages (or a sequence's
        max_pages_per_seq) do not suffice, RuntimeError is raised before anything is written.
        """
        if isinstance(seq_ids, torch.Tensor) and seq_ids.dim() == 0:
            seq_ids = int(seq_ids) if not seq_ids.is_floating_point() else seq_ids
        chunk = isinstance(seq_ids, int) and not isinstance(seq_ids, bool)
        if chunk:
            seq_ids = [self._check_seq_id(seq_ids, "seq_ids")]
        else:
            if isinstance(seq_ids, torch.Tensor):
                if seq_ids.dim() != 1 or seq_ids.is_floating_point() or seq_ids.dtype == torch.bool:
                    raise ValueError(f"seq_ids must be an int or a 1-D integer tensor, got {seq_ids.dtype} "
                                     f"of shape {tuple(seq_ids.shape)}")
                seq_ids = seq_ids.tolist()
            if not isinstance(seq_ids, (list, tuple)):
                raise ValueError(f"seq_ids must be an int, a list of ints or a 1-D integer tensor, got "
                                 f"{type(seq_ids).__name__}")
            seq_ids = [self._check_seq_id(s, "seq_ids") for s in seq_ids]
            if len(set(seq_ids)) != len(seq_ids):
                raise ValueError(f"seq_ids must be distinct (one token per sequence), got {seq_ids}")
        self._check_rows(k, "k", None if chunk else len(seq_ids))
        self._check_rows(v, "v", k.shape[0])
        counts = [k.shape[0]] if chunk else [1] * len(seq_ids)

        # Plan: which free pages go to which sequence, and the slot of every row.
        need = []
        for s, n in zip(seq_ids, counts):
            pages_after = -(-(self._lens[s] + n) // self.page_size)
            if pages_after > self.max_pages_per_seq:
                raise RuntimeError(f"PagedKVCache: sequence {s} would need {pages_after} pages, more than "
                                   f"max_pages_per_seq = {self.max_pages_per_seq}; nothing was appended")
            need.append(pages_after - len(self._pages[s]))
        if sum(need) > len(self._free):
            raise RuntimeError(f"PagedKVCache is full: appending needs {sum(need)} new pages, {len(self._free)} "
                               f"are free; nothing was appended (free sequences to make room)")
        new_pages = [[self._free[j] for j in range(sum(need[:i]), sum(need[:i + 1]))] for i in range(len(need))]
        slots = []
        for s, n, fresh in zip(seq_ids, counts, new_pages):
            table = self._pages[s] + fresh
            slots += [table[t // self.page_size] * self.page_size + t % self.page_size
                      for t in range(self._lens[s], self._lens[s] + n)]
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=self.device)
        if self.kv_format is None:
            ops.paged_cache_append(self.k_pages, self.v_pages, self.key_min, self.key_max, k, v, slot_mapping)
        else:
            self._append_quantized(seq_ids, counts, k, v, slot_mapping)

        # Commit the host bookkeeping and the device tables.
        for _ in range(sum(need)):
            self._free.popleft()
        for s, n, fresh in zip(seq_ids, counts, new_pages):
            if fresh:
                start = len(self._pages[s])
                self._pages[s] += fresh
                self.block_table[s, start:start + len(fresh)] = torch.tensor(fresh, dtype=torch.int32,
                                                                             device=self.device)
            self._lens[s] += n
        self.cache_seqlens[torch.tensor(seq_ids, dtype=torch.int64, device=self.device)] = torch.tensor(
            [self._lens[s] for s in seq_ids], dtype=torch.int32, device=self.device)

    def _append_quantized(self, seq_ids, counts, k, v, slot_mapping):
        """Sets the key offset of sequences appended to for the first time (the mean of their
        first chunk), then quantizes and stores the rows and folds the keys into key_min /
        key_max in one kernel (paged_cache_append_quantized)."""
        if k.shape[0] == 0:
            return
        key_offset = token_seq = None
        if self.key_offset is not None:
            start = 0
            for s, n in zip(seq_ids, counts):
                if self._lens[s] == 0:  # a sequence's first chunk sets its offset
                    self.key_offset[s] = k[start:start + n].float().mean(0)
                start += n
            key_offset = self.key_offset
            token_seq = torch.tensor(seq_ids, device=self.device).repeat_interleave(
                torch.tensor(counts, device=self.device))
        ops.paged_cache_append_quantized(self.k_pages, self.v_pages, self.k_scale, self.k_zero, self.v_scale,
                                         self.v_zero, self.key_min, self.key_max, k, v, slot_mapping, key_offset,
                                         token_seq, self.kv_format, self.group_size or 0, self.rotate_keys)

    def free(self, seq_id):
        """Return the pages of sequence `seq_id` to the free list and empty it."""
        seq_id = self._check_seq_id(seq_id, "seq_id")
        self._free.extend(self._pages[seq_id])
        self._pages[seq_id] = []
        self._lens[seq_id] = 0
        self.block_table[seq_id] = -1
        self.cache_seqlens[seq_id] = 0
