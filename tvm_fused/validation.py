"""Argument checks of ``fused_rope_rmsnorm``, run before anything is written.

``check_arguments`` looks only at tensor metadata (no device sync): dtypes, ranks, shapes,
devices, strides. ``check_contents`` reads the index tensors (a device sync on GPU) and
proves every position, page and offset in range, so an invalid call raises instead of
writing out of bounds.
"""

from __future__ import annotations

import torch

DATA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FREQS_DTYPES = (torch.float32, torch.bfloat16)
OFFSETS_DTYPES = (torch.uint32, torch.int32)


def _require(cond: bool, message, error=ValueError) -> None:
    """Raise ``error(message())`` unless ``cond``; messages are built only on failure (this
    runs on every call of the op, whose budget is a few microseconds)."""
    if not cond:
        raise error(message())


def _check_tensor(name: str, value, rank: int, dtypes: tuple, dtype_rule: str = "one of") -> None:
    _require(isinstance(value, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got "
             f"{type(value).__name__}", TypeError)
    _require(value.dtype in dtypes, lambda: f"{name} must have dtype {dtype_rule} "
             f"{[str(d).removeprefix('torch.') for d in dtypes]}, got "
             f"{str(value.dtype).removeprefix('torch.')}", TypeError)
    _require(value.dim() == rank,
             lambda: f"{name} must have {rank} dims, got shape {tuple(value.shape)}")
    _require(value.dim() == 0 or value.shape[-1] <= 1 or value.stride(-1) == 1, lambda:
             f"{name} must be contiguous in its last dim, got strides {value.stride()}")


def check_arguments(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                    cache_lengths, out) -> None:
    """Raise TypeError/ValueError naming the argument for any malformed input."""
    _check_tensor("q_rope", q_rope, 3, DATA_DTYPES)
    _check_tensor("input_row_offsets", input_row_offsets, 1, OFFSETS_DTYPES)
    _check_tensor("freqs_cis", freqs_cis, 2, FREQS_DTYPES)
    _check_tensor("gamma", gamma, 1, DATA_DTYPES)
    _check_tensor("k_cache", k_cache, 3, (q_rope.dtype,), "of q_rope")
    _check_tensor("lookup_table", lookup_table, 2, (torch.int32,))
    _check_tensor("cache_lengths", cache_lengths, 1, (torch.int32,))
    if out is not None:
        _check_tensor("out", out, 3, (q_rope.dtype,), "of q_rope")
        _require(out.shape == q_rope.shape, lambda: f"out must have the shape of q_rope "
                 f"{tuple(q_rope.shape)}, got {tuple(out.shape)}")
        _require(out.data_ptr() != q_rope.data_ptr() or out.stride() == q_rope.stride(), lambda:
                 "out starts where q_rope does but has other strides: pass q_rope itself for "
                 "an in-place update")

    rope_dim = q_rope.shape[2]
    _require(rope_dim % 2 == 0,
             lambda: f"q_rope's last dim (rope_dim) must be even, got {rope_dim}")
    _require(freqs_cis.shape[1] == rope_dim, lambda: f"freqs_cis must have rope_dim={rope_dim} "
             f"columns, got shape {tuple(freqs_cis.shape)}")
    _require(freqs_cis.is_contiguous(), lambda: "freqs_cis must be contiguous")
    kv_norm_dim = gamma.shape[0]
    _require(kv_norm_dim > 0, lambda: "gamma must not be empty")
    _require(k_cache.shape[2] == kv_norm_dim + rope_dim, lambda:
             f"k_cache rows must hold kv_norm_dim + rope_dim = {kv_norm_dim} + {rope_dim} "
             f"elements (gamma and q_rope's sizes), got shape {tuple(k_cache.shape)}")
    page_size = k_cache.shape[1]
    _require(page_size > 0 and page_size & (page_size - 1) == 0, lambda:
             f"k_cache's page size (dim 1) must be a power of two, got {page_size}")
    batch = cache_lengths.shape[0]
    _require(input_row_offsets.shape[0] == batch + 1, lambda:
             f"input_row_offsets must have batch + 1 = {batch + 1} entries (cache_lengths "
             f"has {batch}), got {input_row_offsets.shape[0]}")
    _require(lookup_table.shape[0] == batch, lambda: f"lookup_table must have batch = {batch} rows "
             f"(cache_lengths has {batch}), got shape {tuple(lookup_table.shape)}")
    for name, tensor in (("gamma", gamma), ("input_row_offsets", input_row_offsets),
                         ("cache_lengths", cache_lengths)):
        _require(tensor.is_contiguous(), lambda name=name: f"{name} must be contiguous")

    device = q_rope.device
    _require(device.type in ("cuda", "cpu"), lambda: f"q_rope must be on a CUDA device or the CPU, "
             f"got {device}")
    named = (("input_row_offsets", input_row_offsets), ("freqs_cis", freqs_cis),
             ("gamma", gamma), ("k_cache", k_cache), ("lookup_table", lookup_table),
             ("cache_lengths", cache_lengths), ("out", out))
    for name, tensor in named:
        if tensor is not None:
            _require(tensor.device == device,
                     lambda name=name, tensor=tensor: f"{name} is on {tensor.device} but "
                     f"q_rope is on {device}: all tensors must be on one device")


def check_contents(q_rope, input_row_offsets, freqs_cis, k_cache, lookup_table,
                   cache_lengths) -> None:
    """Raise ValueError unless every offset, position and page of the call is in range."""
    offsets = input_row_offsets.to(torch.int64).cpu()
    lengths = cache_lengths.to(torch.int64).cpu()
    _require(int(offsets[0]) == 0,
             lambda: f"input_row_offsets must start at 0, got {int(offsets[0])}")
    counts = offsets[1:] - offsets[:-1]
    _require(bool((counts >= 0).all()), lambda: "input_row_offsets must be non-decreasing, got "
             f"{offsets.tolist()}")
    _require(int(offsets[-1]) <= q_rope.shape[0],
             lambda: f"input_row_offsets[-1] = {int(offsets[-1])} exceeds q_rope's "
             f"{q_rope.shape[0]} rows")
    _require(bool((lengths >= 0).all()), lambda: "cache_lengths must be non-negative")
    active = counts > 0
    if not bool(active.any()):
        return
    last_pos = (lengths + counts - 1)[active]
    _require(int(last_pos.max()) < freqs_cis.shape[0], lambda: f"position {int(last_pos.max())} is "
             f"beyond freqs_cis's {freqs_cis.shape[0]} rows")
    page_size = k_cache.shape[1]
    last_page = last_pos // page_size
    _require(int(last_page.max()) < lookup_table.shape[1],
             lambda: f"position {int(last_pos.max())} "
             f"needs logical page {int(last_page.max())}, beyond lookup_table's "
             f"{lookup_table.shape[1]} columns")
    table = lookup_table.to(torch.int64).cpu()[active]
    first_page = lengths[active] // page_size
    cols = torch.arange(table.shape[1])
    used = (cols >= first_page[:, None]) & (cols <= last_page[:, None])
    pages = table[used]
    _require(bool(((pages >= 0) & (pages < k_cache.shape[0])).all()), lambda: "lookup_table maps a "
             f"written position to a page outside k_cache's {k_cache.shape[0]} pages")
