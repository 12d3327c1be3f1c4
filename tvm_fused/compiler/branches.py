"""The branches of the definition, each a macro of stages named after what they do (the table
in ``definition.py``): q rope, k rope, norm, error count. Every branch locates its tokens
itself (``locate.py``); loads and stores are stages of their own, so that a schedule can
stage rows through registers with wide accesses. Cache rows are accessed only where the
token has one (guarded); the rows of q and ``kv_input`` are loaded for every token ``t < n``
unguarded (both tensors have ``n`` rows), so that they are in flight while the token is
located instead of waiting for it (a load round less per decode call). ``row(t)`` is cache
row ``k_cache[slot[t] // page_size, slot[t] % page_size]``.
"""

from __future__ import annotations

import functools
import operator

import tvm
from tvm.script import tirx as T

from ..form import DS_MLA_TILE, ITEMSIZE
from . import tile_max
from .exact_math import quantizer_div, round_to
from .fp8 import saturating_fp8
from .layout import Layout, declare, f32
from .locate import ERROR, OK, freqs_stage, locate_stage


def _rotate(x0, x1, cos, sin, p):
    """Element ``p`` of the pair ``(x0, x1)`` rotated by ``(cos, sin)``, all float32."""
    return T.if_then_else(p == 0, x0 * cos - x1 * sin, x0 * sin + x1 * cos)


# fmt: off
def q_branch(layout: Layout):
    """``q_rope_output[t] = rope(q_rope[t], freqs[pos])`` for every OK token t."""
    H, R2, TWO, ZERO, ONE, dtype = (layout.H, layout.R2, layout.TWO, layout.ZERO, layout.ONE,
                                    layout.dtype)

    odtype = layout.odtype

    @T.macro
    def branch(n, q_pairs, out_pairs, freqs_pairs, q_scale, index):
        q_pos = T.sblock_alloc_buffer((n,), layout.index_dtype)
        q_state = T.sblock_alloc_buffer((n,), "int32")
        q_freqs = T.sblock_alloc_buffer((n, R2, TWO), layout.fdtype)
        q_in = T.sblock_alloc_buffer((n, H, R2, TWO), dtype)
        q_out = T.sblock_alloc_buffer((n, H, R2, TWO), dtype)
        if odtype != dtype:
            q_quantized = T.sblock_alloc_buffer((n, H, R2, TWO), odtype)
        locate_stage(layout)("q_locate", n, index, q_pos, None, q_state)
        freqs_stage(layout)("q_freqs", n, q_pos, q_freqs, freqs_pairs)
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_load"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                q_in[vt, vh, vj, vp] = q_pairs[vt, vh, vj, vp]
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_rope"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                q_out[vt, vh, vj, vp] = T.Cast(dtype, _rotate(
                    f32(q_in[vt, vh, vj, ZERO]), f32(q_in[vt, vh, vj, ONE]),
                    f32(q_freqs[vt, vj, ZERO]), f32(q_freqs[vt, vj, ONE]), vp))
        if odtype != dtype:
            for t, h, j, p in T.grid(n, H, R2, TWO):
                with T.sblock("q_quant"):
                    vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                    q_quantized[vt, vh, vj, vp] = saturating_fp8(
                        odtype, layout.scaled(q_out[vt, vh, vj, vp], q_scale))
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_store"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                if q_state[vt] == OK:
                    if odtype != dtype:
                        out_pairs[vt, vh, vj, vp] = q_quantized[vt, vh, vj, vp]
                    else:
                        out_pairs[vt, vh, vj, vp] = q_out[vt, vh, vj, vp]
    return branch


def nope_copy_dtype(form) -> str:
    """The dtype in which the nope branch moves ``q_nope`` (a copy, without an fp8 query):
    4-byte words where the alignment allows (CUDA's codegen names no vector of 8 16-bit
    values), else q's dtype."""
    if form.out_dtype is None and form.alignment >= 4:
        return "uint32"
    return form.dtype


def _words(layout: Layout, name: str, buffer, dtype: str):
    """A view of ``buffer`` ``[n, H, D]`` (row strides multiples of the unit) in ``dtype``'s
    units, its strides visible multiples of the alignment (so that CUDA's codegen can prove
    a vector of words aligned and load it whole)."""
    if dtype == buffer.dtype:
        return buffer
    ratio = layout.const(tvm.DataType(dtype).bits // buffer.dtype.bits)
    n, heads, dims = buffer.shape
    s0, s1, _ = (layout.aligned(s, str(buffer.dtype)) for s in buffer.strides)
    return declare(name, (n, heads, dims // ratio), dtype, data=buffer.data,
                   elem_offset=buffer.elem_offset // ratio,
                   strides=(s0 // ratio, s1 // ratio, layout.ONE))


def nope_staged(form) -> bool:
    """Whether the nope branch of an fp8 query loads ``q_nope`` as 4-byte words into
    registers first (where the alignment allows; else its quantization reads ``q_nope``)."""
    return form.out_dtype is not None and form.alignment >= 4


def _half(word, which, dtype: str):
    """The 16-bit value ``which`` (0: the low half, the first in memory) of a ``uint32``
    word, as ``dtype``."""
    bits = T.Cast("uint16", T.shift_right(word, T.Cast("uint32", which * 16)))
    return T.reinterpret(dtype, bits)


def nope_branch(layout: Layout):
    """``q_nope_out[t] = q_nope[t]`` (an fp8 output: ``fp8(saturate(value / q_scale))``) for
    every OK token t: the attention query's other columns, located like q's. A copy with no
    staging: the store reads ``q_nope`` itself, only for OK tokens; an fp8 query stages a
    vector of 4-byte words in registers (``nope_load``: CUDA's codegen names no vector of
    8 bf16 loaded from a strided view) and quantizes its halves (``nope_quant``), so that
    both ends stay vectors."""
    H, odtype, unit = layout.H, layout.odtype, nope_copy_dtype(layout.form)
    fp8 = odtype != layout.dtype
    staged = nope_staged(layout.form)
    width = layout.const(layout.form.kv_norm_dim * ITEMSIZE[layout.dtype] // ITEMSIZE[unit])

    @T.macro
    def branch(n, q_nope, q_nope_out, q_scale, index):
        source = T.meta_var(_words(layout, "q_nope_words", q_nope, unit))
        target = T.meta_var(_words(layout, "q_nope_out_words", q_nope_out, odtype if fp8 else unit))
        nope_state = T.sblock_alloc_buffer((n,), "int32")
        if fp8:
            nope_quantized = T.sblock_alloc_buffer((n, H, width), odtype)
        if staged:
            words = T.meta_var(_words(layout, "q_nope_words", q_nope, "uint32"))
            nope_in = T.sblock_alloc_buffer((n, H, width // 2), "uint32")
        locate_stage(layout)("nope_locate", n, index, None, None, nope_state)
        if staged:
            for t, h, w in T.grid(n, H, width // 2):
                with T.sblock("nope_load"):  # every row of q_nope is in bounds
                    vt, vh, vw = T.axis.remap("SSS", [t, h, w])
                    nope_in[vt, vh, vw] = words[vt, vh, vw]
        if fp8:
            for t, h, c in T.grid(n, H, width):
                with T.sblock("nope_quant"):
                    vt, vh, vc = T.axis.remap("SSS", [t, h, c])
                    if staged:
                        nope_quantized[vt, vh, vc] = saturating_fp8(odtype, layout.scaled(
                            _half(nope_in[vt, vh, vc // 2], vc % 2, layout.dtype), q_scale))
                    else:  # every row of q_nope is in bounds
                        nope_quantized[vt, vh, vc] = saturating_fp8(
                            odtype, layout.scaled(source[vt, vh, vc], q_scale))
        for t, h, c in T.grid(n, H, width):
            with T.sblock("nope_store"):
                vt, vh, vc = T.axis.remap("SSS", [t, h, c])
                if nope_state[vt] == OK:
                    if fp8:
                        target[vt, vh, vc] = nope_quantized[vt, vh, vc]
                    else:
                        target[vt, vh, vc] = source[vt, vh, vc]
    return branch


def k_branch(layout: Layout):
    """``row(t)[D:] = rope(source(t), freqs[pos])`` for every token t with a row (and
    ``output_pairs[t]`` for every OK token, if given); ``source(t)`` is ``row(t)[D:]`` in
    place, else ``kv_input[t, D:]``; an fp8 cache stores ``k_quant``'s values."""
    PS, R2, TWO, ZERO, ONE, dtype, cdtype = (layout.PS, layout.R2, layout.TWO, layout.ZERO,
                                             layout.ONE, layout.dtype, layout.cdtype)

    @T.macro
    def branch(n, k_source, k_pairs, output_pairs, freqs_pairs, k_scale, index):
        k_pos = T.sblock_alloc_buffer((n,), layout.index_dtype)
        k_slot = T.sblock_alloc_buffer((n,), layout.index_dtype)
        k_freqs = T.sblock_alloc_buffer((n, R2, TWO), layout.fdtype)
        k_in = T.sblock_alloc_buffer((n, R2, TWO), dtype)
        k_out = T.sblock_alloc_buffer((n, R2, TWO), dtype)
        if layout.fp8:
            k_quantized = T.sblock_alloc_buffer((n, R2, TWO), cdtype)
        locate_stage(layout)("k_locate", n, index, k_pos, k_slot, None)
        freqs_stage(layout)("k_freqs", n, k_pos, k_freqs, freqs_pairs)
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock("k_load"):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                if layout.write_through:
                    k_in[vt, vj, vp] = k_source[vt, vj, vp]
                else:
                    if index.in_cache(k_slot[vt]):
                        k_in[vt, vj, vp] = k_source[k_slot[vt] // PS, k_slot[vt] % PS, vj, vp]
                    else:
                        k_in[vt, vj, vp] = T.Cast(dtype, 0)
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock("k_rope"):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                k_out[vt, vj, vp] = T.Cast(dtype, _rotate(
                    f32(k_in[vt, vj, ZERO]), f32(k_in[vt, vj, ONE]),
                    f32(k_freqs[vt, vj, ZERO]), f32(k_freqs[vt, vj, ONE]), vp))
        if layout.fp8:
            for t, j, p in T.grid(n, R2, TWO):
                with T.sblock("k_quant"):
                    vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                    k_quantized[vt, vj, vp] = saturating_fp8(
                        cdtype, layout.scaled(k_out[vt, vj, vp], k_scale))
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock("k_store"):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                if index.in_cache(k_slot[vt]):
                    if layout.fp8:
                        k_pairs[k_slot[vt] // PS, k_slot[vt] % PS, vj, vp] = k_quantized[
                            vt, vj, vp]
                    else:
                        k_pairs[k_slot[vt] // PS, k_slot[vt] % PS, vj, vp] = k_out[vt, vj, vp]
                if output_pairs is not None:
                    if k_slot[vt] < index.end:  # the token is OK
                        output_pairs[vt, vj, vp] = k_out[vt, vj, vp]
    return branch


def norm_branch(layout: Layout):
    """``row(t)[:D] = rmsnorm(source(t))`` for every token t with a row (and
    ``output_rows[t]`` for every OK token, if given); ``source(t)`` is ``row(t)[:D]`` in
    place, else ``kv_input[t, :D]``; an fp8 cache stores ``norm_quant``'s values."""
    PS, D, dtype, gdtype, cdtype = layout.PS, layout.D, layout.dtype, layout.gdtype, layout.cdtype

    quantized = layout.fp8 or layout.ds_mla

    @T.macro
    def branch(n, norm_source, cache_rows, output_rows, gamma, epsilon, k_scale, index):
        # the cache's row view and (fp8_ds_mla) its tile scales' view
        k_rows, k_scales = T.meta_var(cache_rows)
        norm_slot = T.sblock_alloc_buffer((n,), layout.index_dtype)
        norm_in = T.sblock_alloc_buffer((n, D), dtype)
        sumsq = T.sblock_alloc_buffer((n,), "float32")
        scale = T.sblock_alloc_buffer((n,), "float32")
        norm_out = T.sblock_alloc_buffer((n, D), dtype)
        if layout.fp8:
            norm_quantized = T.sblock_alloc_buffer((n, D), cdtype)
        if layout.ds_mla:
            norm_quantized = T.sblock_alloc_buffer((n, D), DS_MLA_FP8)
            tile_scales = T.sblock_alloc_buffer((n, layout.TILES), "float32")
        locate_stage(layout)("norm_locate", n, index, None, norm_slot, None)
        for t, c in T.grid(n, D):
            with T.sblock("norm_load"):
                vt, vc = T.axis.remap("SS", [t, c])
                if layout.write_through:
                    norm_in[vt, vc] = norm_source[vt, vc]
                else:
                    if index.in_cache(norm_slot[vt]):
                        norm_in[vt, vc] = norm_source[norm_slot[vt] // PS, norm_slot[vt] % PS,
                                                      vc]
                    else:
                        norm_in[vt, vc] = T.Cast(dtype, 0)
        for t, c in T.grid(n, D):
            with T.sblock("norm_sumsq"):
                vt, vc = T.axis.remap("SR", [t, c])
                with T.init():
                    sumsq[vt] = T.float32(0)
                sumsq[vt] = sumsq[vt] + f32(norm_in[vt, vc]) * f32(norm_in[vt, vc])
        for t in range(n):
            with T.sblock("norm_scale"):
                vt = T.axis.spatial(n, t)
                scale[vt] = T.rsqrt(sumsq[vt] / T.float32(D) + epsilon)
        for t, c in T.grid(n, D):
            with T.sblock("norm_apply"):
                vt, vc = T.axis.remap("SS", [t, c])
                normed = T.meta_var(f32(norm_in[vt, vc]) * scale[vt])
                if layout.round_once:
                    norm_out[vt, vc] = T.Cast(dtype, normed * f32(gamma[vc]))
                else:  # rounded to gamma's dtype, times gamma, rounded to gamma's dtype, then
                    # to dtype (a single rounding when they are the same)
                    product = T.meta_var(round_to(gdtype, normed) * f32(gamma[vc]))
                    norm_out[vt, vc] = T.Cast(dtype, product if gdtype == dtype else round_to(
                        gdtype, product))
        if layout.fp8:
            for t, c in T.grid(n, D):
                with T.sblock("norm_quant"):
                    vt, vc = T.axis.remap("SS", [t, c])
                    norm_quantized[vt, vc] = saturating_fp8(
                        cdtype, layout.scaled(norm_out[vt, vc], k_scale))
        if layout.ds_mla:
            tile_stages(layout)(n, norm_out, tile_scales, norm_quantized)
        for t, c in T.grid(n, D):
            with T.sblock("norm_store"):
                vt, vc = T.axis.remap("SS", [t, c])
                if index.in_cache(norm_slot[vt]):
                    if quantized:
                        k_rows[norm_slot[vt] // PS, norm_slot[vt] % PS, vc] = norm_quantized[
                            vt, vc]
                    else:
                        k_rows[norm_slot[vt] // PS, norm_slot[vt] % PS, vc] = norm_out[vt, vc]
                if output_rows is not None:
                    if norm_slot[vt] < index.end:  # the token is OK
                        output_rows[vt, vc] = norm_out[vt, vc]
        if layout.ds_mla:
            for t, i in T.grid(n, layout.TILES):
                with T.sblock("norm_scale_store"):
                    vt, vi = T.axis.remap("SS", [t, i])
                    if index.in_cache(norm_slot[vt]):
                        k_scales[norm_slot[vt] // PS, norm_slot[vt] % PS, vi] = tile_of(
                            tile_scales, vt, vi, layout.form.scale_tiles)
    return branch


DS_MLA_FP8 = "float8_e4m3fn"
_FLT_MIN = 2.0**-126  # the smallest normal float32
_CANONICAL_NAN = 0x7FC00000  # a quiet float32 NaN, sign clear
_FLOAT32_INF = 0x7F800000


# The tile stages choose values without a select: TVM turns a select whose operands read a
# buffer into a branch (RewriteUnsafeSelect), and nvcc keeps those branches, a few dozen
# per row, each re-reading the thread index, on the decode's critical path.


def _all_ones_if(condition):
    """``0xFFFFFFFF`` where ``condition`` holds, else 0 (uint32; a select of constants: no
    branch)."""
    return T.Select(condition, T.uint32(0xFFFFFFFF), T.uint32(0))


def _where_finite(x, otherwise: int):
    """``x`` (float32) where it is finite (neither NaN nor ±inf), else the float32 of bits
    ``otherwise``, on the bits (a mask from one comparison)."""
    bits = T.reinterpret("uint32", x)
    keep = _all_ones_if((bits & T.uint32(_FLOAT32_INF)) != T.uint32(_FLOAT32_INF))
    return T.reinterpret("float32", (bits & keep) | (T.uint32(otherwise) & ~keep))


def _finite_magnitude_bits(x):
    """The bits of ``|x|`` (float32) where it is finite, else 0: a uint32 that orders as the
    magnitudes do."""
    magnitude = T.reinterpret("uint32", x) & T.uint32(0x7FFFFFFF)
    return magnitude & _all_ones_if(magnitude < T.uint32(_FLOAT32_INF))


def _one_if(condition):
    """1.0 where ``condition`` holds, else 0.0 (float32)."""
    return T.Cast("float32", condition)


def _tile_scale(rule: str, amax):
    """The float32 scale of a tile whose finite values reach ``amax``: ``max(amax / 448,
    FLT_MIN)`` (``"raw"``), or ``2^ceil(log2(max(amax / 448, 1e-4)))`` (``"pow2"``, on the
    bits: the exponent, one up where any mantissa bit is set)."""
    ratio = quantizer_div(amax, T.float32(448))
    if rule == "raw":
        return T.max(ratio, T.float32(_FLT_MIN))
    bits = T.reinterpret("uint32", T.max(ratio, T.float32(1e-4)))
    exponent = (bits >> T.uint32(23)) + T.Cast("uint32", (bits & T.uint32(0x7FFFFF)) != 0)
    return T.reinterpret("float32", exponent << T.uint32(23))


def _pick(values: list, tile):
    """``values[tile]`` of finite float32 values, each read at a constant index, as the sum
    of each value times ``tile == i`` (exact: one term is the value, the others ±0): on the
    GPU a thread's tile depends on its index, and a register array indexed by it would live
    in local memory."""
    terms = [value * _one_if(tile == tvm.tirx.IntImm(tile.ty.dtype, i))
             for i, value in enumerate(values)]
    return functools.reduce(operator.add, terms)


def tile_of(buffer, vt, tile, tiles: int):
    """``buffer[vt, tile]`` (the tiles' scales) among the ``tiles`` (``_pick``)."""
    return _pick([buffer[vt, tvm.tirx.IntImm(tile.ty.dtype, i)] for i in range(tiles)], tile)


def tile_stages(layout: Layout):
    """fp8_ds_mla's quantization of the normed rows ``values [n, D]`` (q's dtype) by tiles of
    128: each value's share of its tile's amax (the bits of ``|v|`` if finite, else 0; each
    value rounded to q's dtype first, as ``kv_output`` holds it), each tile's ``amax`` (one
    reduction over the whole row for all the tiles, each value counting 0 in the other
    tiles, by a mask: a tuple of uint32 maxima, ``tile_max.py``, that a GPU schedule reduces
    in one allreduce, and where nvcc knows a thread's value is not in a tile, a max with 0
    it drops), the tiles' scales (``_tile_scale``), and each value as
    ``e4m3(saturate(v / scale))``, a non-finite value divided as NaN (NaN stays NaN). No
    stage selects on a value it reads (``_all_ones_if``, ``_pick``)."""
    D, TILES, TILE, dtype = layout.D, layout.TILES, layout.const(DS_MLA_TILE), layout.dtype
    rule, tiles = layout.form.tile_scale, layout.form.scale_tiles

    @T.macro
    def stages(n, values, scales, quantized):
        share = T.sblock_alloc_buffer((n, D), "uint32")
        amax = T.meta_var(tile_max.alloc_maxima(n, tiles))
        for t, c in T.grid(n, D):
            with T.sblock("norm_tile_share"):
                vt, vc = T.axis.remap("SS", [t, c])
                value = T.meta_var(round_to(dtype, f32(values[vt, vc])))
                share[vt, vc] = _finite_magnitude_bits(value)
        for t, c in T.grid(n, D):
            with T.sblock("norm_tile_amax"):
                vt, vc = T.axis.remap("SR", [t, c])
                with T.init():
                    tile_max.init_maxima(amax, vt)
                tile_max.update_maxima(amax, vt, [
                    share[vt, vc] & _all_ones_if(vc // TILE == layout.const(i))
                    for i in range(tiles)])
        for t, i in T.grid(n, TILES):
            with T.sblock("norm_tile_scale"):
                vt, vi = T.axis.remap("SS", [t, i])
                scales[vt, vi] = _tile_scale(rule, _pick(
                    [T.reinterpret("float32", m[vt]) for m in amax], vi))
        for t, c in T.grid(n, D):
            with T.sblock("norm_quant"):
                vt, vc = T.axis.remap("SS", [t, c])
                value = T.meta_var(round_to(dtype, f32(values[vt, vc])))
                quantized[vt, vc] = saturating_fp8(DS_MLA_FP8, quantizer_div(
                    _where_finite(value, _CANONICAL_NAN),
                    tile_of(scales, vt, vc // TILE, tiles)))
    return stages


def count_branch(layout: Layout):
    """``errors[0] +=`` the number of ERROR tokens (a schedule running tokens in parallel
    makes the accumulation atomic)."""

    @T.macro
    def branch(n, errors, index):
        count_state = T.sblock_alloc_buffer((n,), "int32")
        locate_stage(layout)("count_locate", n, index, None, None, count_state)
        for t in range(n):
            with T.sblock("count_errors"):
                vt = T.axis.spatial(n, t)
                T.reads(count_state[vt])
                T.writes(errors[0])
                if count_state[vt] == ERROR:
                    errors[0] = errors[0] + 1
    return branch
# fmt: on
