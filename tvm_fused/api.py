"""The torch-facing entry points: ``fused_rope_rmsnorm`` (tokens addressed by request offsets,
cache lengths and a page table, as MAX does) and ``fused_rope_rmsnorm_slots`` (by positions and
a slot mapping, as vLLM, SGLang and FlashInfer do). One definition and one kernel cache serve
both: the addressing is a static option of the op (``OpConfig.addressing``)."""

from __future__ import annotations

import functools

import torch

from . import dispatch
from .arguments import (
    OFFSETS,
    SLOTS,
    check_arguments,
    check_contents,
    check_slot_contents,
)
from .schedules import ScheduleConfig

_VECTOR_BYTES = 16  # the widest access the schedules use


def _alignment(q_rope, out, freqs_cis, gamma, k_cache, kv_input, kv_output) -> int:
    """The largest power of two up to 16 dividing every pointer and row stride, in bytes: the
    alignment the kernel for these tensors is built for (its entry refuses any other).
    (``gamma`` and ``freqs_cis`` are compact and ``out``, ``kv_input`` and ``kv_output``
    share q's element size, or the kernel's entry checks refuse them.)"""
    q0, q1, _ = q_rope.stride()
    o0, o1, _ = out.stride()
    k0, k1, _ = k_cache.stride()
    f0, _ = freqs_cis.stride()
    bits = ((q0 | q1 | o0 | o1) * q_rope.element_size() | (k0 | k1) * k_cache.element_size()
            | f0 * freqs_cis.element_size() | q_rope.data_ptr() | out.data_ptr()
            | k_cache.data_ptr() | freqs_cis.data_ptr() | gamma.data_ptr() | _VECTOR_BYTES)
    for rows in (kv_input, kv_output):
        if rows is not None:
            bits |= rows.stride(0) * rows.element_size() | rows.data_ptr()
    return bits & -bits  # the lowest set bit


def _device(index: int) -> torch.device:
    """The device of ``Tensor.get_device()``'s ``index`` (-1: the CPU)."""
    return torch.device("cpu") if index < 0 else torch.device("cuda", index)


@functools.cache
def _scratch_errors(index: int) -> torch.Tensor:
    """The error counter of calls that pass none, on device ``index`` (``get_device()``;
    its count is not read)."""
    return torch.zeros(1, dtype=torch.int32, device=_device(index))


@functools.cache
def _unit_scale(index: int) -> torch.Tensor:
    """``k_scale`` of fp8 calls that pass none, on device ``index``: 1."""
    return torch.ones(1, dtype=torch.float32, device=_device(index))


def fused_rope_rmsnorm(
    q_rope: torch.Tensor,
    input_row_offsets: torch.Tensor,
    freqs_cis: torch.Tensor,
    gamma: torch.Tensor,
    k_cache: torch.Tensor,
    lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor,
    *,
    kv_input: torch.Tensor | None = None,
    kv_output: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    epsilon: float = 1e-6,
    out: torch.Tensor | None = None,
    errors: torch.Tensor | None = None,
    interleaved: bool = True,
    freqs_layout: str = "interleaved",
    norm_rounding: str = "before_gamma",
    pdl: bool | str = False,
    validate: bool | None = None,
    schedule: ScheduleConfig | None = None,
) -> torch.Tensor:
    """MLA prologue in one launch: RoPE on q, RoPE and RMSNorm of the new cache rows.

    For request ``b``'s ``i``-th new token ``t = offsets[b] + i`` at ``pos = cache_lengths[b]
    + i``, with ``row = k_cache[lookup_table[b, pos // page_size], pos % page_size]`` and
    ``x`` the token's new latent row (``D + R`` elements)::

        out[t, h]   = rope(q_rope[t, h], freqs_cis[pos])                 every head h
        row[:D]     = dtype(gamma.dtype(x[:D] * rsqrt(mean(x[:D]^2) + epsilon)) * gamma)
        row[D:]     = rope(x[D:], freqs_cis[pos])

    Two forms. Write-through (``kv_input`` given; how engines call it): ``x = kv_input[t]``,
    the projection's output, and the cache row is written, never read; ``kv_output[t]``
    (if given) receives the same row; ``k_cache`` may be fp8 (``float8_e4m3fn``,
    ``float8_e5m2``): each value is computed in q's dtype, then stored as
    ``fp8(saturate(value / k_scale))``, nearest even. In place (no ``kv_input``): ``x`` is
    the cache row itself, which the caller has written (un-normed) before the call.

    ``rope`` rotates pairs ``(x[2j], x[2j+1])`` (``interleaved``) or ``(x[j], x[j + R/2])``
    by ``(cos, sin) = freqs_cis[pos, 2j : 2j+2]`` (``freqs_layout="interleaved"``) or
    ``freqs_cis[pos, (j, R/2 + j)]`` (``"split"``: cosines, then sines) in float32. Rows of
    ``q_rope`` (and ``kv_input``, ``kv_output``) past ``input_row_offsets[-1]`` are neither
    read nor written.

    Indices that point nowhere never make the kernel read or write outside its tensors. A
    negative physical page in ``lookup_table`` means "no cache row": the token's q row (and
    ``kv_output`` row) is still written. A token whose position has no ``freqs_cis`` row,
    whose logical page is past ``lookup_table``'s width or whose physical page is
    ``>= num_pages`` (or that no request claims: offsets not ascending from 0) is an error:
    none of its rows is written, and the kernel adds the number of such tokens to
    ``errors``. Two tokens mapped to one cache row leave it holding either's values (or a
    mix), in bounds. ``validate=True`` raises ``ValueError`` for each of these instead,
    before anything is written.

    Parameters
    ----------
    q_rope : ``[n, H, R]`` bf16/fp16/fp32; any strides with a contiguous last dim.
    input_row_offsets : ``[batch + 1]`` uint32 or int32, prefix sums of new tokens.
    freqs_cis : ``[max_seq_len, R]`` fp32 or bf16, contiguous; cos and sin of each pair per
        row, as ``freqs_layout`` says.
    gamma : ``[D]`` bf16/fp16/fp32, the RMSNorm weight.
    k_cache : ``[num_pages, page_size, D + R]`` in q_rope's dtype (or fp8, write-through),
        any strides with a contiguous last dim (a layer of a multi-layer cache works).
    lookup_table : ``[batch, max_pages]`` int32, physical page of each logical page.
    cache_lengths : ``[batch]`` int32, tokens in the cache before this step.
    kv_input : ``[n, D + R]`` in q_rope's dtype, any row stride with a contiguous last dim
        (a column slice of the projection output works): selects the write-through form.
        Not modified.
    kv_output : ``[n, D + R]`` in q_rope's dtype, any row stride: receives each written
        token's new row (write-through only); must not overlap any other argument.
    k_scale : a one-element float32 tensor on the op's device (an fp8 cache only; default
        1): the cache stores ``value / k_scale``.
    epsilon : RMSNorm epsilon, finite and non-negative.
    out : ``[n, H, R]`` in q_rope's dtype, receives roped q; may be ``q_rope`` itself, else
        must not overlap any other argument. A new contiguous tensor if None (its padding
        and error rows are left uninitialized).
    errors : a one-element int32 tensor on the op's device, or None; the number of error
        tokens (see above) is added to it, on the device (no sync).
    interleaved : GPT-J pairs if True, NeoX (half-split) pairs if False.
    freqs_layout : ``"interleaved"`` (MAX's ``freqs_cis``) or ``"split"`` (vLLM's
        ``cos_sin_cache``), independent of the pairing.
    norm_rounding : ``"before_gamma"`` (the spec's, HF's and vLLM's: ``x * rsqrt`` rounded to
        gamma's dtype before the gamma product) or ``"once"`` (SGLang's and FlashInfer's:
        ``x * rsqrt * gamma`` in float32, rounded once).
    pdl : programmatic dependent launch (sm_90 and newer; ignored on the CPU): the kernel
        is launched while the kernel before it in the stream still runs, and lets the next
        kernel launch at once. ``True``: it waits for the kernel before to complete before
        any memory access, so it is right whatever that kernel writes (the launch and the
        address arithmetic overlap it). ``"early-indices"``: it also reads
        ``input_row_offsets``, ``cache_lengths`` and ``lookup_table`` (slots: ``positions``
        and ``slot_mapping``) before the wait, which saves one more memory round at decode;
        the kernel right before must then not write those index tensors (in a decode step
        it is the projection GEMM; the indices were written at the step's start).
        ``False``: a plain launch.
    validate : the kernel's compiled entry always refuses, before the launch, malformed
        tensors (dtype, rank, shape, strides, device, alignment), a bad epsilon and a written
        tensor that shares memory with another argument; Python's metadata checks then run
        to name the problem. True: those checks in Python first, and the proof that every
        position, page and offset is in range and every written cache row distinct (a device
        sync). None (default): the same on the CPU; on a GPU the entry's checks alone (the
        call stays sync-free and CUDA-graph capturable, at the host time of ``False``).
        False: the entry's checks alone.
    schedule : a block-group schedule to use instead of the one decided for this token
        count's bucket on this GPU (``tuning_logs/``), or without decisions, the default.

    Returns
    -------
    ``out`` (or the new tensor) holding the roped q.

    Example
    -------
    Write-through, from a column slice of a fused projection output, into an fp8 cache:

    >>> qkv = torch.randn(3, 1536 + 576, dtype=torch.bfloat16)   # q_a | kv_a, 3 tokens
    >>> q = torch.randn(3, 16, 64, dtype=torch.bfloat16)
    >>> k_cache = torch.zeros(4, 16, 576, dtype=torch.float8_e4m3fn)
    >>> angles = torch.arange(64.)[:, None] * 0.1 ** torch.arange(32.)[None]
    >>> freqs = torch.stack((angles.cos(), angles.sin()), -1).flatten(1)
    >>> q_out = fused_rope_rmsnorm(
    ...     q, torch.tensor([0, 3], dtype=torch.int32), freqs,
    ...     torch.ones(512, dtype=torch.bfloat16), k_cache,
    ...     torch.tensor([[2, 0]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
    ...     kv_input=qkv[:, 1536:])
    >>> q_out.shape, k_cache[2, 5:8].float().abs().sum(-1).gt(0).tolist()
    (torch.Size([3, 16, 64]), [True, True, True])
    """
    return _checked_launch(
        q_rope, freqs_cis, gamma, k_cache, (input_row_offsets, lookup_table, cache_lengths),
        out, kv_input, kv_output, k_scale, errors, epsilon,
        ("offsets", interleaved, freqs_layout, norm_rounding, pdl), validate, schedule,
        "freqs_cis")


def fused_rope_rmsnorm_slots(
    q_rope: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    gamma: torch.Tensor,
    k_cache: torch.Tensor,
    *,
    kv_input: torch.Tensor | None = None,
    kv_output: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    epsilon: float = 1e-6,
    out: torch.Tensor | None = None,
    errors: torch.Tensor | None = None,
    interleaved: bool = True,
    freqs_layout: str = "split",
    norm_rounding: str = "before_gamma",
    pdl: bool | str = False,
    validate: bool | None = None,
    schedule: ScheduleConfig | None = None,
) -> torch.Tensor:
    """The op of ``fused_rope_rmsnorm`` with engine addressing: what vLLM's RMSNorm, rotary
    embedding and ``concat_and_cache_mla`` (or SGLang's RMSNorm, rotary and
    ``set_mla_kv_buffer``) do in three launches, in one.

    Token ``t < len(positions)`` is at ``pos = positions[t]``; if ``t < len(slot_mapping)``
    and ``slot = slot_mapping[t] >= 0``, its cache row is ``k_cache[slot // page_size, slot
    % page_size]``, else it has none (vLLM's padding slot -1; SGLang's ``[size, 1, 576]``
    buffer is a cache of page size 1)::

        out[t, h] = rope(q_rope[t, h], cos_sin_cache[pos])               every head h
        row[:D]   = rmsnorm(x[:D]),  row[D:] = rope(x[D:], cos_sin_cache[pos])

    with ``x`` the token's new latent row: ``kv_input[t]`` (write-through, the projection
    output's ``kv_a`` columns; ``kv_output[t]`` receives the same row) or the cache row
    itself (in place). Rows of ``q_rope`` (and ``kv_input``, ``kv_output``) from
    ``len(positions)`` on are neither read nor written.

    A position without a table row or a slot ``>= num_pages * page_size`` makes the token an
    error: none of its rows is written and ``errors`` counts it; ``validate=True`` raises
    ``ValueError`` instead, as it does for two tokens with one slot.

    Parameters
    ----------
    positions : ``[m]`` int64 or int32, ``m <= n``: each token's position.
    slot_mapping : ``[s]`` int64 or int32, ``s <= m``: each token's cache row
        ``page * page_size + row``, negative for none.
    cos_sin_cache : ``[max_position, R]`` fp32 or bf16, contiguous: vLLM's table (cosines in
        ``[0, R/2)``, sines in ``[R/2, R)``) by default; MAX's interleaved one with
        ``freqs_layout="interleaved"``.
    k_cache : ``[num_pages, page_size, D + R]`` (vLLM: ``[num_blocks, block_size, 576]``;
        SGLang: ``kv_buffer [size, 1, 576]``), q's dtype or fp8 (write-through; a ``.view``
        of an engine's uint8 cache).

    Everything else is as for ``fused_rope_rmsnorm``.

    Example
    -------
    vLLM's DeepSeek layer, the latent from the fused ``q_a | kv_a`` projection output, two
    decode tokens and one CUDA-graph padding row (slot -1):

    >>> q = torch.randn(3, 16, 192, dtype=torch.bfloat16)       # q_b_proj output, per head
    >>> qkv = torch.randn(3, 1536 + 576, dtype=torch.bfloat16)
    >>> kv_cache = torch.zeros(4, 64, 576, dtype=torch.bfloat16)  # [num_blocks, block_size, 576]
    >>> angles = torch.arange(128.)[:, None] * 0.1 ** torch.arange(32.)[None]
    >>> cos_sin_cache = torch.cat((angles.cos(), angles.sin()), -1)
    >>> _ = fused_rope_rmsnorm_slots(
    ...     q[..., 128:], torch.tensor([7, 70, 0]), torch.tensor([135, 6, -1]), cos_sin_cache,
    ...     torch.ones(512, dtype=torch.bfloat16), kv_cache, kv_input=qkv[:, 1536:],
    ...     out=q[..., 128:])
    >>> kv_cache[2, 7].ne(0).any().item(), kv_cache[0, 6].ne(0).any().item()
    (True, True)
    """
    return _checked_launch(
        q_rope, cos_sin_cache, gamma, k_cache, (positions, slot_mapping), out, kv_input,
        kv_output, k_scale, errors, epsilon,
        ("slots", interleaved, freqs_layout, norm_rounding, pdl), validate, schedule,
        "cos_sin_cache")


def _default_proves_contents(q_rope) -> bool:
    """Whether ``validate=None`` proves the index contents too: everywhere but on a GPU (the
    GPU default stays sync-free and CUDA-graph capturable)."""
    return not (isinstance(q_rope, torch.Tensor) and q_rope.is_cuda)


def _checked_launch(q_rope, freqs, gamma, k_cache, indices, out, kv_input, kv_output, k_scale,
                    errors, epsilon, options, validate, schedule, freqs_name):
    """Check the arguments as ``validate`` asks, then launch (``indices``: the addressing's
    index tensors in ``OFFSETS`` or ``SLOTS`` order; ``options``: addressing, interleaved,
    freqs_layout, norm_rounding, pdl).

    The metadata checks are the kernel's compiled entry's: dtypes, ranks, shapes, strides,
    devices, alignment, epsilon, and that no written tensor shares memory with another
    argument, before it launches. When the entry refuses a call, ``check_arguments`` runs to
    name the problem. ``validate`` (True, or None off the GPU) adds them in Python first,
    and the proof of the index contents.
    """
    if validate is None:
        validate = _default_proves_contents(q_rope)
    if validate:
        _check(q_rope, freqs, gamma, k_cache, indices, out, kv_input, kv_output, k_scale,
               errors, epsilon, options, freqs_name)
        if options[0] == "slots":
            check_slot_contents(*indices, freqs, k_cache)
        else:
            offsets, table, lengths = indices
            check_contents(q_rope, offsets, freqs, k_cache, table, lengths)
    try:
        return _run(q_rope, freqs, gamma, k_cache, indices, out, kv_input, kv_output, k_scale,
                    errors, epsilon, options, schedule)
    except Exception:  # the entry (or the build) refused the tensors: name the bad one
        _check(q_rope, freqs, gamma, k_cache, indices, out, kv_input, kv_output, k_scale,
               errors, epsilon, options, freqs_name)
        raise


def _names(options) -> tuple[str, ...]:
    """The names of the index tensors of a call with ``options`` (its addressing first)."""
    return SLOTS if options[0] == "slots" else OFFSETS


def _check(q_rope, freqs, gamma, k_cache, indices, out, kv_input, kv_output, k_scale, errors,
           epsilon, options, freqs_name) -> None:
    """``check_arguments`` of a call, its index tensors named after its addressing."""
    check_arguments(q_rope, freqs, gamma, k_cache, dict(zip(_names(options), indices)), out,
                    kv_input, kv_output, k_scale, errors, epsilon, freqs_name=freqs_name)


def _one_element(tensor: torch.Tensor) -> torch.Tensor:
    """A one-element tensor as the kernel's ``[1]`` buffer (a view only when it is not)."""
    return tensor if tensor.dim() == 1 else tensor.reshape(1)


def _run(q_rope, freqs, gamma, k_cache, indices, out, kv_input, kv_output, k_scale, errors,
         epsilon, options, schedule):
    """Pick (build on first use) the kernel for these tensors and launch it; returns out.
    Malformed or overlapping tensors make the kernel's compiled entry checks (dtypes, ranks,
    shapes, strides, alignment, devices, epsilon, overlap) raise before the launch, and so
    do tensors the form has no place for (a kernel without them takes fewer arguments, or
    its config refuses them).

    The kernel last used under the call's quick key (``dispatch.recent_kernel``) is tried first,
    then the one of its full signature for 16-byte aligned tensors: building the signature,
    and finding the alignment even more, costs more host time than the call, and nearly
    every call has that alignment and the dtypes of the last call under its key. If the
    entry refuses the tensors, the kernel built for their alignment (if lower) is used."""
    shape = q_rope.shape
    tokens, heads = shape[0], shape[1]
    index = q_rope.get_device()
    if out is None:
        out = torch.empty(shape, dtype=q_rope.dtype, device=q_rope.device)
    if tokens == 0:
        return out
    write_through, has_output = kv_input is not None, kv_output is not None
    errors = _scratch_errors(index) if errors is None else _one_element(errors)
    if k_scale is not None:
        scale = (_one_element(k_scale),)
    elif k_cache.dtype != q_rope.dtype:
        scale = (_unit_scale(index),)
    else:
        scale = ()
    # the kernel's parameters: offsets before the table, the page table and lengths (or the
    # positions and slots) after the cache's scale
    if options[0] == "offsets":
        before, after = indices[:1], indices[1:]
    else:
        before, after = (), indices
    rows = (kv_input, kv_output) if has_output else (kv_input,) if write_through else ()
    args = (q_rope, out, *rows, *before, freqs, gamma, k_cache, *scale, *after, errors,
            float(epsilon))
    quick = (index, heads, k_cache.dtype, options, write_through, has_output, schedule)
    recent = dispatch.recent_kernel(quick, tokens)
    if recent is not None:
        try:
            recent(*args)
            return out
        except Exception:  # tensors of another signature: refused before the launch
            pass
    device = q_rope.device
    key = dispatch.signature(device, q_rope, freqs, gamma, k_cache, indices, options,
                             write_through, has_output, _VECTOR_BYTES, schedule)
    try:
        dispatch.kernel(key, tokens, quick)(*args)
    except Exception:
        alignment = _alignment(q_rope, out, freqs, gamma, k_cache, kv_input, kv_output)
        if alignment == _VECTOR_BYTES:
            raise
        key = dispatch.signature(device, q_rope, freqs, gamma, k_cache, indices, options,
                                 write_through, has_output, alignment, schedule)
        dispatch.kernel(key, tokens)(*args)
    return out
