"""Argument checks of ``fused_rope_rmsnorm``, run before anything is written.

``check_arguments`` looks only at metadata (no device sync): dtypes, ranks, shapes, devices,
strides, epsilon, the form's tensors (``kv_input``, ``kv_output``, ``k_scale``; an fp8
cache only write-through), the addressing's index tensors (``form.OFFSETS``: offsets, page table
and cache lengths; ``form.SLOTS``: positions and slot mapping), and that no tensor the op writes
overlaps another argument in memory.
``check_contents`` and ``check_slot_contents`` read the index tensors (a device sync on GPU)
and prove every position, page, slot and offset in range and every written cache row
distinct, so an invalid call raises instead of losing rows (the kernel itself skips and
counts such tokens).
"""

from __future__ import annotations

import torch

from . import form
from .form import dtype_name
from .tokens import locate_tokens

DATA_DTYPES, FREQS_DTYPES, OFFSETS_DTYPES, FP8_DTYPES, INDEX_DTYPES = (
    tuple(getattr(torch, name) for name in names)
    for names in (form.DTYPES, form.FREQS_DTYPES, form.OFFSETS_DTYPES, form.FP8_DTYPES,
                  form.INDEX_DTYPES))


def _checked_layout(name: str, value, rank: int, dtypes: tuple, dtype_rule: str = "one of"):
    """``(shape, strides)`` of tensor argument ``name`` once its type, dtype, rank and
    last-dim contiguity are checked (each tensor's metadata is read once: it runs per call)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {dtype_rule} "
                        f"{[dtype_name(d) for d in dtypes]}, got "
                        f"{dtype_name(value.dtype)}")
    shape, strides = value.shape, value.stride()
    if len(shape) != rank:
        raise ValueError(f"{name} must have {rank} dims, got shape {tuple(shape)}")
    if rank and shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {strides}")
    return shape, strides


def _contiguous(shape, strides) -> bool:
    if 0 in shape:  # no elements (a table without rope columns)
        return True
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


FLOAT32_MAX = torch.finfo(torch.float32).max


def _interleaved(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold disjoint columns of the same rows (the rule of the
    kernel's entry, ``compiler/overlap_check.py``)."""
    if a.dim() < 2 or a.dim() != b.dim():
        return False
    outer = [s * a.itemsize for s in a.stride()[:-1]]
    row = outer[-1]
    if row <= 0 or outer != [s * b.itemsize for s in b.stride()[:-1]] or any(
            s % row for s in outer):
        return False
    d = (b.data_ptr() - a.data_ptr()) % row
    return a.shape[-1] * a.itemsize <= d and d + b.shape[-1] * b.itemsize <= row


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses of a tensor's elements (empty: ``(0, 0)``)."""
    start, last = tensor.data_ptr(), 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if not size:
            return 0, 0
        last += (size - 1) * stride
    return start, start + last * tensor.itemsize


WRITTEN = ("out", "q_nope_out", "k_cache", "kv_output", "errors")  # what the op writes


def _check_own_memory(name: str, tensor) -> None:
    """A tensor the op writes must not be an expanded or otherwise self-overlapping view
    (two of its elements at one address: two tokens would write one location)."""
    if tensor is None:
        return
    reach = 0  # the largest offset, in elements, reached by the dims checked so far
    for size, stride in sorted((d for d in zip(tensor.shape, tensor.stride()) if d[0] > 1),
                               key=lambda d: d[1]):
        if stride <= reach:
            raise ValueError(f"{name} is a self-overlapping view (strides "
                             f"{tensor.stride()} for shape {tuple(tensor.shape)}, e.g. from "
                             f"expand): the op would write one address for two elements; "
                             f"give {name} memory of its own")
        reach += (size - 1) * stride


def _check_no_overlap(spans: list) -> None:
    """No tensor named in ``WRITTEN`` may share memory with another of ``spans`` (``(name,
    tensor, start, end)``, q_rope first), but ``out`` may be ``q_rope`` itself, and column
    slices of one buffer may interleave (``_interleaved``)."""
    q_start = spans[0][2]
    written = [span for name in WRITTEN for span in spans if span[0] == name]
    for name, tensor, start, end in written:
        if start == end:
            continue
        for other, other_tensor, other_start, other_end in spans:
            if (start < other_end and other_start < end and other != name
                    and not (name == "out" and other == "q_rope" and start == q_start)
                    and not _interleaved(tensor, other_tensor)):
                raise ValueError(f"{name} overlaps {other} in memory: the op writes {name} "
                                 f"while it reads {other}; give {name} memory of its own")


def _named(q_rope, freqs_cis, gamma, k_cache, index_items, **tensors) -> tuple:
    """``(name, tensor)`` of every tensor argument (None if not given), q_rope first
    (``tensors``: the keyword tensors, by name)."""
    return (("q_rope", q_rope), (tensors.pop("freqs_name"), freqs_cis), ("gamma", gamma),
            ("k_cache", k_cache), *index_items, *tensors.items())


def _check_one_element(name: str, value, dtype: torch.dtype) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype:
        expected = dtype_name(dtype)
        article = "an" if expected[0] in "aeiou" else "a"
        raise TypeError(f"{name} must be {article} {expected} torch.Tensor, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() > 1 or value.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor, got shape "
                         f"{tuple(value.shape)}")


def _check_form(q_shape, q_dtype, cache_dtype, kv_input, kv_output, k_scale,
                cache_format: str) -> None:
    """The write-through tensors (``kv_input``, ``kv_output``, ``k_scale``) and the cache
    dtype each form allows (q's; fp8 too, write-through; uint8 for fp8_ds_mla)."""
    if cache_format not in form.CACHE_FORMATS:
        raise ValueError(f"cache_format must be one of {form.CACHE_FORMATS}, got "
                         f"{cache_format!r}")
    ds_mla = cache_format == "fp8_ds_mla"
    if ds_mla != (cache_dtype == torch.uint8):
        raise TypeError("k_cache must be uint8 exactly for cache_format='fp8_ds_mla', got "
                        f"{dtype_name(cache_dtype)} with cache_format={cache_format!r}")
    if ds_mla and (kv_input is None or k_scale is not None or q_dtype == torch.float32):
        raise ValueError("the fp8_ds_mla cache needs the write-through form (kv_input), a "
                         "bfloat16 or float16 q (its rope part is stored in q's dtype) and "
                         "no k_scale (its tiles carry their own scales)")
    if kv_input is None:
        for name, value in (("kv_output", kv_output), ("k_scale", k_scale)):
            if value is not None:
                raise ValueError(f"{name} needs kv_input (the write-through form)")
        if cache_dtype != q_dtype:
            raise TypeError(f"k_cache must have the dtype of q_rope "
                            f"({dtype_name(q_dtype)}) in place; an fp8 cache needs "
                            "kv_input (the write-through form)")
        return
    if k_scale is not None:
        if cache_dtype not in FP8_DTYPES:
            raise ValueError("k_scale applies to an fp8 k_cache only")
        _check_one_element("k_scale", k_scale, torch.float32)
    for name, rows in (("kv_input", kv_input), ("kv_output", kv_output)):
        if rows is None:
            continue
        shape, _ = _checked_layout(name, rows, 2, (q_dtype,), "of q_rope")
        if shape[0] != q_shape[0]:
            raise ValueError(f"{name} must have q_rope's {q_shape[0]} rows, got shape "
                             f"{tuple(shape)}")


def _check_out(q_rope, q_shape, q_strides, out, q_scale):
    """``out`` (q's dtype, or fp8 with an optional ``q_scale``); returns its dtype."""
    if out is None:
        if q_scale is not None:
            raise ValueError("q_scale applies to an fp8 out only")
        return q_rope.dtype
    out_shape, out_strides = _checked_layout("out", out, 3, (q_rope.dtype, *FP8_DTYPES),
                                             "of q_rope or fp8:")
    if out_shape != q_shape:
        raise ValueError(f"out must have the shape of q_rope {tuple(q_shape)}, got "
                         f"{tuple(out_shape)}")
    if out.data_ptr() == q_rope.data_ptr() and q_rope.numel() and (
            out_strides != q_strides or out.dtype != q_rope.dtype):
        raise ValueError("out starts where q_rope does but has other strides or another "
                         "dtype: pass q_rope itself for an in-place update")
    if q_scale is not None:
        if out.dtype not in FP8_DTYPES:
            raise ValueError("q_scale applies to an fp8 out only")
        _check_one_element("q_scale", q_scale, torch.float32)
    return out.dtype


def _check_q_nope(q_shape, q_dtype, out_dtype, kv_norm_dim: int, q_nope, q_nope_out) -> None:
    """``q_nope [n, H, D]`` in q's dtype and ``q_nope_out`` of its shape in out's dtype, both
    or neither."""
    if (q_nope is None) != (q_nope_out is None):
        raise ValueError("q_nope and q_nope_out go together: pass both or neither")
    if q_nope is None:
        return
    expected = (q_shape[0], q_shape[1], kv_norm_dim)
    for name, tensor, dtype, rule in (("q_nope", q_nope, q_dtype, "of q_rope"),
                                      ("q_nope_out", q_nope_out, out_dtype, "of out")):
        shape, _ = _checked_layout(name, tensor, 3, (dtype,), rule)
        if tuple(shape) != expected:
            raise ValueError(f"{name} must have shape [tokens, heads, kv_norm_dim] = "
                             f"{list(expected)} (q_rope's and gamma's sizes), got "
                             f"{list(shape)}")


def check_scales(**scales) -> None:
    """Raise ValueError unless each given scale (a one-element tensor) is finite and
    positive (reads it: a device sync)."""
    for name, scale in scales.items():
        if scale is not None:
            value = float(scale.reshape(()).item())
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be finite and positive, got {value}")


def check_arguments(q_rope, freqs_cis, gamma, k_cache, index: dict, *, out=None,
                    kv_input=None, kv_output=None, k_scale=None, errors=None, q_nope=None,
                    q_nope_out=None, q_scale=None, cache_format: str = "plain",
                    epsilon=1e-6, freqs_name: str = "freqs_cis") -> None:
    """Raise TypeError/ValueError naming the argument for any malformed input. ``index``
    maps the names of ``form.OFFSETS`` or of ``form.SLOTS`` to their tensors;
    ``freqs_name`` is what the caller calls the cos/sin table."""
    q_shape, q_strides = _checked_layout("q_rope", q_rope, 3, DATA_DTYPES)
    freqs_shape, freqs_strides = _checked_layout(freqs_name, freqs_cis, 2, FREQS_DTYPES)
    gamma_shape, gamma_strides = _checked_layout("gamma", gamma, 1, DATA_DTYPES)
    cache_shape, _ = _checked_layout("k_cache", k_cache, 3,
                                     (q_rope.dtype, *FP8_DTYPES, torch.uint8),
                                     "of q_rope, fp8 or uint8 (fp8_ds_mla):")
    _check_form(q_shape, q_rope.dtype, k_cache.dtype, kv_input, kv_output, k_scale,
                cache_format)
    out_dtype = _check_out(q_rope, q_shape, q_strides, out, q_scale)
    _check_q_nope(q_shape, q_rope.dtype, out_dtype, gamma_shape[0], q_nope, q_nope_out)
    for name, written in (("out", out), ("q_nope_out", q_nope_out), ("k_cache", k_cache),
                          ("kv_output", kv_output)):
        _check_own_memory(name, written)

    if errors is not None:
        _check_one_element("errors", errors, torch.int32)
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon <= FLOAT32_MAX:
        raise ValueError(f"epsilon must be a finite non-negative float32, got {epsilon!r}")

    rope_dim = q_shape[2]
    kv_norm_dim = gamma_shape[0]
    row = cache_shape[2] if cache_format == "plain" else None
    if freqs_shape[1] != rope_dim:
        if freqs_shape[1] == (row or 0) - kv_norm_dim:  # the table and the cache agree
            raise ValueError(f"q_rope's last dim must be rope_dim = {freqs_shape[1]} (the "
                             f"columns of {freqs_name} and of k_cache's rows past gamma's "
                             f"{kv_norm_dim}), got shape {tuple(q_shape)}: pass the rope "
                             f"part of q, e.g. q[..., -{freqs_shape[1]}:]")
        raise ValueError(f"{freqs_name} must have rope_dim={rope_dim} columns, got shape "
                         f"{tuple(freqs_shape)}")
    if rope_dim % 2 != 0:
        raise ValueError(f"q_rope's last dim (rope_dim) must be even, got {rope_dim}")
    if not _contiguous(freqs_shape, freqs_strides):
        raise ValueError(f"{freqs_name} must be contiguous")
    if kv_norm_dim <= 0:
        raise ValueError("gamma must not be empty")
    if row is not None and row != kv_norm_dim + rope_dim and row > rope_dim:
        _blame_row_or_gamma(row, kv_norm_dim, rope_dim, kv_input)
    if cache_format == "fp8_ds_mla":
        _check_ds_mla_row(cache_shape[2], kv_norm_dim, rope_dim)
    for name, rows in (("k_cache", k_cache if cache_format == "plain" else None),
                       ("kv_input", kv_input), ("kv_output", kv_output)):
        if rows is not None and rows.shape[-1] != kv_norm_dim + rope_dim:
            raise ValueError(f"{name} rows must hold kv_norm_dim + rope_dim = {kv_norm_dim} "
                             f"+ {rope_dim} elements (gamma and q_rope's sizes), got shape "
                             f"{tuple(rows.shape)}")
    page_size = cache_shape[1]
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"k_cache's page size (dim 1) must be a power of two, got {page_size}")
    if not _contiguous(gamma_shape, gamma_strides):
        raise ValueError("gamma must be contiguous")
    if "positions" in index:
        _check_slots(q_shape[0], **index)
    else:
        _check_offsets(**index)

    on_cuda = q_rope.is_cuda
    if not on_cuda and not q_rope.is_cpu:
        raise ValueError(f"q_rope must be on a CUDA device or the CPU, got {q_rope.device}")
    device = q_rope.get_device()  # an int: cheaper than comparing torch.device objects
    named = _named(q_rope, freqs_cis, gamma, k_cache, index.items(), out=out,
                   kv_input=kv_input, kv_output=kv_output, k_scale=k_scale, errors=errors,
                   q_nope=q_nope, q_nope_out=q_nope_out, q_scale=q_scale,
                   freqs_name=freqs_name)
    for name, tensor in named[1:]:
        if tensor is not None:
            same = tensor.is_cuda and tensor.get_device() == device if on_cuda else \
                tensor.is_cpu
            if not same:
                raise ValueError(f"{name} is on {tensor.device} but q_rope is on "
                                 f"{q_rope.device}: all tensors must be on one device")
    _check_no_overlap([(name, tensor, *_span(tensor)) for name, tensor in named
                       if tensor is not None])


def _blame_row_or_gamma(row: int, kv_norm_dim: int, rope_dim: int, kv_input) -> None:
    """Raise for k_cache rows of ``row`` elements that are not gamma's ``kv_norm_dim`` plus
    ``rope_dim``, naming the one at fault: the one ``kv_input``'s rows disagree with, else
    the one whose latent width is not a multiple of 16 (widths are: 512 in DeepSeek's
    MLA), else both."""
    width = None if kv_input is None else kv_input.shape[-1]
    gamma_wrong = width == row or (width is None and kv_norm_dim % 16 != 0
                                   and (row - rope_dim) % 16 == 0)
    if gamma_wrong:
        raise ValueError(f"gamma must have kv_norm_dim = {row - rope_dim} elements (k_cache's "
                         f"rows of {row} less rope_dim {rope_dim}), got {kv_norm_dim}")
    if width == kv_norm_dim + rope_dim or (row - rope_dim) % 16 != 0:
        raise ValueError(f"k_cache rows must hold kv_norm_dim + rope_dim = {kv_norm_dim} + "
                         f"{rope_dim} elements (gamma and q_rope's sizes), got {row}")
    raise ValueError(f"gamma's {kv_norm_dim} elements and k_cache's rows of {row} disagree: "
                     f"k_cache rows must hold len(gamma) + rope_dim ({rope_dim}) elements")


def _check_ds_mla_row(row_bytes: int, kv_norm_dim: int, rope_dim: int) -> None:
    """An fp8_ds_mla row: ``D`` e4m3 bytes, a float32 scale per 128, ``R`` 16-bit values."""
    if kv_norm_dim % form.DS_MLA_TILE:
        raise ValueError(f"the fp8_ds_mla cache quantizes tiles of {form.DS_MLA_TILE}: "
                         f"gamma's length (kv_norm_dim) must be a multiple, got {kv_norm_dim}")
    expected = kv_norm_dim + 4 * kv_norm_dim // form.DS_MLA_TILE + 2 * rope_dim
    if row_bytes != expected:
        raise ValueError(f"k_cache rows must hold the fp8_ds_mla row of D + 4 D/128 + 2 R = "
                         f"{expected} bytes (D = {kv_norm_dim}, R = {rope_dim}), got "
                         f"{row_bytes}")


def _check_offsets(input_row_offsets, lookup_table, cache_lengths) -> None:
    """The index tensors of ``form.OFFSETS``: dtypes, ranks, one batch size, contiguity."""
    offsets_shape, offsets_strides = _checked_layout("input_row_offsets", input_row_offsets,
                                                     1, OFFSETS_DTYPES)
    table_shape, _ = _checked_layout("lookup_table", lookup_table, 2, (torch.int32,))
    lengths_shape, lengths_strides = _checked_layout("cache_lengths", cache_lengths, 1,
                                                     (torch.int32,))
    batch = lengths_shape[0]
    if offsets_shape[0] != batch + 1:
        raise ValueError(f"input_row_offsets must have batch + 1 = {batch + 1} entries "
                         f"(cache_lengths has {batch}), got {offsets_shape[0]}")
    if table_shape[0] != batch:
        raise ValueError(f"lookup_table must have batch = {batch} rows "
                         f"(cache_lengths has {batch}), got shape {tuple(table_shape)}")
    for name, shape, strides in (("input_row_offsets", offsets_shape, offsets_strides),
                                 ("cache_lengths", lengths_shape, lengths_strides)):
        if not _contiguous(shape, strides):
            raise ValueError(f"{name} must be contiguous")


def _check_slots(tokens: int, positions, slot_mapping) -> None:
    """The index tensors of ``form.SLOTS``: int64 or int32 vectors, contiguous, ``slot_mapping``
    no longer than ``positions``, ``positions`` no longer than q's ``tokens`` rows."""
    (length,), _ = _checked_layout("positions", positions, 1, INDEX_DTYPES)
    (slots,), _ = _checked_layout("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    if length > tokens:
        raise ValueError(f"positions has {length} entries, more than q_rope's {tokens} rows")
    if slots > length:
        raise ValueError(f"slot_mapping has {slots} entries, more than positions' {length}")


def check_contents(q_rope, input_row_offsets, freqs_cis, k_cache, lookup_table,
                   cache_lengths) -> None:
    """Raise ValueError unless every offset, position and page of the call is in range and no
    two new tokens map to one cache row (a negative page, "no cache row", is in range)."""
    offsets = input_row_offsets.to(torch.int64).cpu()
    lengths = cache_lengths.to(torch.int64).cpu()
    if int(offsets[0]) != 0:
        raise ValueError(f"input_row_offsets must start at 0, got {int(offsets[0])}")
    counts = offsets[1:] - offsets[:-1]
    if not bool((counts >= 0).all()):
        raise ValueError(f"input_row_offsets must be non-decreasing, got {offsets.tolist()}")
    if int(offsets[-1]) > q_rope.shape[0]:
        raise ValueError(f"input_row_offsets[-1] = {int(offsets[-1])} exceeds q_rope's "
                         f"{q_rope.shape[0]} rows")
    if not bool((lengths >= 0).all()):
        raise ValueError("cache_lengths must be non-negative")
    tokens = locate_tokens(offsets, lengths, lookup_table, freqs_cis.shape[0],
                           k_cache.shape[0], k_cache.shape[1])
    if tokens.pos.numel() and int(tokens.pos.max()) >= freqs_cis.shape[0]:
        raise ValueError(f"position {int(tokens.pos.max())} is beyond freqs_cis's "
                         f"{freqs_cis.shape[0]} rows")
    logical = tokens.pos // k_cache.shape[1]
    if logical.numel() and int(logical.max()) >= lookup_table.shape[1]:
        raise ValueError(f"position {int(tokens.pos.max())} needs logical page "
                         f"{int(logical.max())}, beyond lookup_table's "
                         f"{lookup_table.shape[1]} columns")
    if not bool(tokens.q_written.all()):
        raise ValueError(f"lookup_table maps a written position to page "
                         f"{int(tokens.page.max())}, beyond k_cache's {k_cache.shape[0]} pages")
    rows = (tokens.page * k_cache.shape[1] + tokens.row)[tokens.row_written]
    if rows.unique().numel() != rows.numel():
        raise ValueError("two new tokens map to one cache row: lookup_table shares a page "
                         "between requests whose new positions meet")


def check_table_layout(freqs_cis, freqs_layout: str, name: str) -> None:
    """Raise ValueError if the table's row 0 (position 0: every cosine nonzero, every sine
    0) has the other layout's pattern: ``"interleaved"`` pairs ``(cos, sin)``, ``"split"``
    all cosines then all sines (a table of one pair fits both)."""
    rope_dim = freqs_cis.shape[1]
    if freqs_cis.shape[0] == 0 or rope_dim < 4:
        return
    zero = (freqs_cis[0] == 0).cpu()
    half = rope_dim // 2
    looks = {"interleaved": bool(zero[1::2].all() and not zero[0::2].any()),
             "split": bool(zero[half:].all() and not zero[:half].any())}
    other = "split" if freqs_layout == "interleaved" else "interleaved"
    if looks[other] and not looks[freqs_layout]:
        raise ValueError(f"{name} is a {other} table (its row 0, position 0, has the sines "
                         f"{'past the cosines' if other == 'split' else 'between them'}), but "
                         f"freqs_layout is {freqs_layout!r}: pass freqs_layout={other!r}")


def check_slot_contents(positions, slot_mapping, freqs_cis, k_cache) -> None:
    """Raise ValueError unless every position has a freqs row, every slot is below
    ``num_pages * page_size`` and no two tokens share a slot (a negative slot, "no cache
    row", is in range)."""
    pos = positions.to(torch.int64).cpu()
    slots = slot_mapping.to(torch.int64).cpu()
    unlisted = pos[(pos < 0) | (pos >= freqs_cis.shape[0])]
    if unlisted.numel():
        raise ValueError(f"position {int(unlisted[0])} has no row in the cos/sin table's "
                         f"{freqs_cis.shape[0]} rows")
    rows = k_cache.shape[0] * k_cache.shape[1]
    if slots.numel() and int(slots.max()) >= rows:
        raise ValueError(f"slot {int(slots.max())} is beyond k_cache's {rows} rows "
                         f"({k_cache.shape[0]} pages of {k_cache.shape[1]})")
    written = slots[slots >= 0]
    if written.unique().numel() != written.numel():
        raise ValueError("two tokens map to one cache row: slot_mapping repeats a slot")
