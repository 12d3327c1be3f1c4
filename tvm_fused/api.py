"""The torch-facing entry points: ``fused_rope_rmsnorm`` (tokens addressed by request offsets,
cache lengths and a page table, as MAX does) and ``fused_rope_rmsnorm_slots`` (by positions
and a slot mapping, as vLLM, SGLang and FlashInfer do).

Every call finds its kernel in the kernel map (``dispatch.py``) under a key built from its
tensors' metadata and its options, then launches it on torch's current stream.

What both entry points share:

- ``rope`` rotates pairs ``(x[2j], x[2j+1])`` (``interleaved``, GPT-J) or ``(x[j], x[j +
  R/2])`` (NeoX) by ``(cos, sin) = table[pos, 2j : 2j+2]`` (``freqs_layout="interleaved"``)
  or ``table[pos, (j, R/2 + j)]`` (``"split"``: cosines, then sines) in float32;
  ``rmsnorm(x) = dtype(gamma.dtype(x * rsqrt(mean(x^2) + epsilon)) * gamma)``, or with
  ``norm_rounding="once"`` ``dtype(x * rsqrt(...) * gamma)`` rounded once.
- Two forms. Write-through (``kv_input`` given; how engines call it): the token's latent row
  is ``kv_input[t]``, the projection's output, and the cache row is written, never read;
  ``kv_output[t]`` (if given) receives the same row; ``k_cache`` may be fp8 (each value
  computed in q's dtype, then stored as ``fp8(saturate(value / k_scale))``, nearest even).
  In place: the latent row is the cache row itself, which the caller wrote before the call.
- Indices that point nowhere never make the kernel read or write outside its tensors. A
  negative page or slot means "no cache row": the token's q row (and ``kv_output`` row) is
  still written. A token whose position has no table row, whose page is past the table or
  the cache, or that no request claims is an error: none of its rows is written, and the
  kernel adds the number of such tokens to ``errors``. ``validate=True`` raises
  ``ValueError`` for each of these instead, before anything is written.
- ``validate``: the kernel's compiled entry always refuses, before the launch, malformed
  tensors (dtype, rank, shape, strides, device, alignment), a bad epsilon and a written tensor
  that shares memory with another argument; Python's metadata checks then name the problem.
  True: those checks in Python first, and the proof that every index is in range and every
  written cache row distinct (a device sync). None (default): the same on the CPU; on a GPU
  the entry's checks alone (the call stays sync-free and CUDA-graph capturable). False: the
  entry's checks alone.
- ``pdl`` (sm_90 and newer; ignored on the CPU): programmatic dependent launch. True: the
  kernel may launch while the kernel before still runs, and waits for it before any memory
  access. ``"early-indices"``: it also reads the index tensors before the wait (the kernel
  right before must then not write them). False: a plain launch.
- ``schedule``: a block-group schedule to use instead of the one decided for this token
  count's bucket on this GPU (``tuning_logs/``), or without decisions, the default.

Engines that capture calls into CUDA graphs call ``tvm_fused.prepare(form, device)`` first:
it builds every kernel of the form and allocates its scratch tensors, so that a captured
call builds and allocates nothing.
"""

from __future__ import annotations

import torch

from .arguments import (
    check_arguments,
    check_contents,
    check_scales,
    check_slot_contents,
    check_table_layout,
)
from .dispatch import KERNELS, lookup
from .form import INDEX_REFUSAL, ITEMSIZE, OFFSETS, SLOTS

_VECTOR_BYTES = 16  # the widest access the schedules use
FIRST_INDEX_BITS = 32  # the index width a call tries first (64: every call wide)
# bytes per element of each dtype a tensor of the op may have (any other: the entry refuses)
_ITEMSIZE = {getattr(torch, name): size for name, size in ITEMSIZE.items()}


def fused_rope_rmsnorm(
    q_rope: torch.Tensor, input_row_offsets: torch.Tensor, freqs_cis: torch.Tensor,
    gamma: torch.Tensor, k_cache: torch.Tensor, lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor, *, kv_input: torch.Tensor | None = None,
    kv_output: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
    epsilon: float = 1e-6, out: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
    q_nope: torch.Tensor | None = None, q_nope_out: torch.Tensor | None = None,
    errors: torch.Tensor | None = None, cache_format: str = "plain", tile_scale: str = "raw",
    interleaved: bool = True, freqs_layout: str = "interleaved",
    norm_rounding: str = "before_gamma", pdl: bool | str = False, validate: bool | None = None,
    schedule=None,
) -> torch.Tensor:
    """MLA prologue in one launch: RoPE on q, RoPE and RMSNorm of the new cache rows.

    For request ``b``'s ``i``-th new token ``t = offsets[b] + i`` at ``pos = cache_lengths[b]
    + i``, with ``row = k_cache[lookup_table[b, pos // page_size], pos % page_size]`` and
    ``x`` the token's new latent row (``D + R`` elements; see the module's docstring)::

        out[t, h] = rope(q_rope[t, h], freqs_cis[pos])                   every head h
        row[:D]   = rmsnorm(x[:D]),  row[D:] = rope(x[D:], freqs_cis[pos])

    Rows of ``q_rope`` (and ``kv_input``, ``kv_output``) past ``input_row_offsets[-1]`` are
    neither read nor written.

    Parameters
    ----------
    q_rope : ``[n, H, R]`` bf16/fp16/fp32; any strides with a contiguous last dim.
    input_row_offsets : ``[batch + 1]`` uint32 or int32, prefix sums of new tokens.
    freqs_cis : ``[max_seq_len, R]`` fp32 or bf16, contiguous; each row's cos and sin as
        ``freqs_layout`` says.
    gamma : ``[D]`` bf16/fp16/fp32, the RMSNorm weight.
    k_cache : ``[num_pages, page_size, D + R]`` in q's dtype (or fp8, write-through), any
        strides with a contiguous last dim (a layer of a multi-layer cache works).
    lookup_table : ``[batch, max_pages]`` int32, physical page of each logical page.
    cache_lengths : ``[batch]`` int32, tokens in the cache before this step.
    kv_input : ``[n, D + R]`` in q's dtype, any row stride (a column slice of the
        projection output works): selects the write-through form. Not modified.
    kv_output : ``[n, D + R]`` in q's dtype: receives each written token's new row
        (write-through only); must not overlap any other argument.
    k_scale : a one-element float32 tensor on the op's device (an fp8 cache only; default
        1): the cache stores ``value / k_scale``.
    epsilon : RMSNorm epsilon, finite and non-negative.
    out : ``[n, H, R]`` in q's dtype, receives roped q; may be ``q_rope`` itself, else must
        not overlap any other argument (but column slices of one buffer interleave: see
        ``q_nope_out``). A new contiguous tensor if None (its padding and error rows are
        left uninitialized). fp8 (``float8_e4m3fn`` or ``float8_e5m2``): the fp8 attention
        query, each value ``fp8(saturate(value / q_scale))`` of the roped value in q's dtype.
    q_scale : a one-element float32 tensor, finite and positive (an fp8 ``out`` only;
        default 1).
    q_nope, q_nope_out : ``[n, H, D]``, in q's and in ``out``'s dtype, any strides with a
        contiguous last dim (both or neither): the op also writes ``q_nope_out[t] =
        q_nope[t]`` (quantized like ``out``) for every token whose q row it writes. With
        ``out = buf[:, :H, D:]`` and ``q_nope_out = buf[:, :H, :D]`` of one ``[n, H_pad, D +
        R]`` buffer, one launch writes the whole attention query of an MLA decode kernel.
    errors : a one-element int32 tensor on the op's device, or None; the number of error
        tokens is added to it, on the device (no sync).
    cache_format : ``"plain"`` (rows of ``D + R`` values) or ``"fp8_ds_mla"``: DeepSeek-V3.2's
        row in a ``uint8 [num_pages, page_size, D + 4 D/128 + 2 R]`` cache (656 bytes for
        DeepSeek; any page stride), written by the write-through form: the normed latent in
        e4m3 per tile of 128 values, the tiles' float32 scales, the roped rope part in q's
        dtype (bf16 or fp16). No ``k_scale``.
    tile_scale : fp8_ds_mla's tile scales: ``"raw"`` (``max(amax / 448, FLT_MIN)``, vLLM's)
        or ``"pow2"`` (``2^ceil(log2(max(amax / 448, 1e-4)))``, FlashMLA's reference).
    interleaved, freqs_layout, norm_rounding, pdl, validate, schedule : see the module.

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
    return _launch("offsets", (q_rope, out, freqs_cis, gamma, k_cache, kv_input, kv_output,
                               k_scale, errors, q_nope, q_nope_out, q_scale),
                   (input_row_offsets, lookup_table, cache_lengths),
                   (interleaved, freqs_layout, norm_rounding, pdl, cache_format, tile_scale),
                   epsilon, validate, schedule)


def fused_rope_rmsnorm_slots(
    q_rope: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor, gamma: torch.Tensor, k_cache: torch.Tensor, *,
    kv_input: torch.Tensor | None = None, kv_output: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, epsilon: float = 1e-6,
    out: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
    q_nope: torch.Tensor | None = None, q_nope_out: torch.Tensor | None = None,
    errors: torch.Tensor | None = None, cache_format: str = "plain", tile_scale: str = "raw",
    interleaved: bool = True, freqs_layout: str = "split", norm_rounding: str = "before_gamma",
    pdl: bool | str = False, validate: bool | None = None, schedule=None,
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

    Rows of ``q_rope`` (and ``kv_input``, ``kv_output``) from ``len(positions)`` on are
    neither read nor written.

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
        of an engine's uint8 cache), or vLLM's uint8 ``fp8_ds_mla`` cache ``[num_blocks,
        block_size, 656]`` with ``cache_format="fp8_ds_mla"``.

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
    return _launch("slots", (q_rope, out, cos_sin_cache, gamma, k_cache, kv_input, kv_output,
                             k_scale, errors, q_nope, q_nope_out, q_scale),
                   (positions, slot_mapping),
                   (interleaved, freqs_layout, norm_rounding, pdl, cache_format, tile_scale),
                   epsilon, validate, schedule)


def _default_proves_contents(q_rope) -> bool:
    """Whether ``validate=None`` proves the index contents too: everywhere but on a GPU (the
    GPU default stays sync-free and CUDA-graph capturable)."""
    return not (isinstance(q_rope, torch.Tensor) and q_rope.is_cuda)


# A call's tensors travel as one tuple, in this order (the index tensors, in the order of
# the addressing's entry point, and the options travel apart):
TENSORS = ("q_rope", "out", "freqs", "gamma", "k_cache", "kv_input", "kv_output", "k_scale",
           "errors", "q_nope", "q_nope_out", "q_scale")


def _launch(addressing, tensors, indices, options, epsilon, validate, schedule):
    """Check the arguments as ``validate`` asks, find the kernel and launch it; returns out.
    When the kernel's entry refuses the tensors, ``check_arguments`` names the problem.
    ``tensors``: in ``TENSORS`` order; ``options``: interleaved, freqs_layout, norm_rounding,
    pdl, cache_format, tile_scale."""
    if validate is None:
        validate = _default_proves_contents(tensors[0])
    if validate:
        _check(addressing, tensors, indices, options, epsilon, contents=True)
    try:
        return _run(addressing, tensors, indices, options, epsilon, schedule)
    except Exception as error:  # the entry (or the form) refused the call: name the problem
        failure = error
    _check(addressing, tensors, indices, options, epsilon, contents=False)
    raise failure


def _check(addressing, tensors, indices, options, epsilon, *, contents: bool) -> None:
    """``check_arguments`` of a call, then if ``contents`` the proof of its index contents and
    its scales (a device sync)."""
    q_rope, out, freqs, gamma, k_cache, kv_input, kv_output, k_scale, errors, q_nope, \
        q_nope_out, q_scale = tensors
    names, freqs_name = (SLOTS, "cos_sin_cache") if addressing == "slots" else (
        OFFSETS, "freqs_cis")
    check_arguments(q_rope, freqs, gamma, k_cache, dict(zip(names, indices)), out=out,
                    kv_input=kv_input, kv_output=kv_output, k_scale=k_scale, errors=errors,
                    q_nope=q_nope, q_nope_out=q_nope_out, q_scale=q_scale,
                    cache_format=options[4], epsilon=epsilon, freqs_name=freqs_name)
    if contents:
        check_scales(k_scale=k_scale, q_scale=q_scale)
        check_table_layout(freqs, options[1], freqs_name)
    if contents and addressing == "slots":
        check_slot_contents(*indices, freqs, k_cache)
    elif contents:
        check_contents(q_rope, indices[0], freqs, k_cache, *indices[1:])


def _run(addressing, tensors, indices, options, epsilon, schedule):
    """Launch the kernel of the call's key (``dispatch.CallKey``'s fields, in order) on these
    tensors. Its alignment is the largest power of two up to 16 dividing every data pointer
    and row stride, in bytes (``freqs`` and ``gamma`` are compact, and ``kv_input``,
    ``kv_output`` and ``q_nope`` share q's element size, ``q_nope_out`` out's, or the
    kernel's entry refuses them). The kernel indexes in 32 bits; where its entry refuses
    tensors too large for that (``INDEX_REFUSAL``), before writing anything, the call goes to
    the 64-bit kernel of the same key: nothing on the host measures a tensor's span."""
    q_rope, out, freqs, gamma, k_cache, kv_input, kv_output, _, _, q_nope, q_nope_out, _ = \
        tensors
    shape, dtype, cache_dtype = q_rope.shape, q_rope.dtype, k_cache.dtype
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=q_rope.device)
    if shape[0] == 0:
        return out
    freqs_dtype, size, out_size = freqs.dtype, _ITEMSIZE[dtype], _ITEMSIZE[out.dtype]
    q0, q1, _ = q_rope.stride()
    o0, o1, _ = out.stride()
    k0, k1, _ = k_cache.stride()
    bits = ((q0 | q1) * size | (o0 | o1) * out_size | (k0 | k1) * _ITEMSIZE[cache_dtype]
            | shape[2] * _ITEMSIZE[freqs_dtype] | q_rope.data_ptr() | out.data_ptr()
            | k_cache.data_ptr() | freqs.data_ptr() | gamma.data_ptr() | _VECTOR_BYTES)
    if kv_input is not None:
        bits |= kv_input.stride()[0] * size | kv_input.data_ptr()
    if kv_output is not None:
        bits |= kv_output.stride()[0] * size | kv_output.data_ptr()
    if q_nope is not None:
        n0, n1, _ = q_nope.stride()
        bits |= (n0 | n1) * size | q_nope.data_ptr()
    if q_nope_out is not None:
        n0, n1, _ = q_nope_out.stride()
        bits |= (n0 | n1) * out_size | q_nope_out.data_ptr()
    key = (q_rope.get_device(), dtype, shape[1], shape[2], gamma.shape[0], k_cache.shape[1],
           cache_dtype, out.dtype, freqs_dtype, gamma.dtype,
           (indices[0].dtype, indices[1].dtype), addressing, *options, kv_input is not None,
           kv_output is not None, q_nope is not None, bits & -bits, FIRST_INDEX_BITS, schedule)
    try:
        return _call(KERNELS.get(key) or lookup(key), addressing, tensors, out, indices,
                     epsilon)
    except ValueError as error:
        if FIRST_INDEX_BITS == 64 or INDEX_REFUSAL not in str(error):
            raise
    wide = (*key[:-2], 64, schedule)
    return _call(KERNELS.get(wide) or lookup(wide), addressing, tensors, out, indices, epsilon)


def _call(entry, addressing, tensors, out, indices, epsilon):
    """Launch ``entry``'s kernel (a ``dispatch.Prepared``) on the call's tensors, with its
    scratch tensors for the error count and scales the call does not pass; returns out."""
    q_rope, _, freqs, gamma, k_cache, kv_input, kv_output, k_scale, errors, q_nope, \
        q_nope_out, q_scale = tensors
    k_scale = entry.scale("k_scale", k_scale)
    q_scale = entry.scale("q_scale", q_scale)
    if errors is None:
        errors = entry.errors
    elif errors.dim() != 1:
        errors = errors.reshape(1)
    offsets, table, lengths = indices if addressing == "offsets" else (None, None, None)
    positions, slots = indices if addressing == "slots" else (None, None)
    entry.kernel(q_rope.shape[0])(*entry.arguments((
        q_rope, out, q_nope, q_nope_out, kv_input, kv_output, offsets, freqs, gamma, k_cache,
        k_scale, q_scale, table, lengths, positions, slots, errors, float(epsilon))))
    return out
