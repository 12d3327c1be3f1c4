"""The branches of the definition, each a macro of stages named after what they do (the table
in ``definition.py``): q rope, k rope, norm, error count. Every branch locates its tokens
itself (``locate.py``); loads and stores are stages of their own, guarded, so that a
schedule can stage rows through registers with wide accesses and untouched rows are never
accessed. ``row(t)`` is cache row ``k_cache[slot[t] // page_size, slot[t] % page_size]``.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .exact_math import round_to
from .fp8 import saturating_fp8
from .layout import Layout, f32
from .locate import ERROR, OK, freqs_stage, locate_stage


def _rotate(x0, x1, cos, sin, p):
    """Element ``p`` of the pair ``(x0, x1)`` rotated by ``(cos, sin)``, all float32."""
    return T.if_then_else(p == 0, x0 * cos - x1 * sin, x0 * sin + x1 * cos)


# fmt: off
def q_branch(layout: Layout):
    """``q_rope_output[t] = rope(q_rope[t], freqs[pos])`` for every OK token t."""
    H, R2, TWO, ZERO, ONE, dtype = (layout.H, layout.R2, layout.TWO, layout.ZERO, layout.ONE,
                                    layout.dtype)

    @T.macro
    def branch(n, q_pairs, out_pairs, freqs_pairs, index):
        q_pos = T.sblock_alloc_buffer((n,), "int64")
        q_state = T.sblock_alloc_buffer((n,), "int32")
        q_freqs = T.sblock_alloc_buffer((n, R2, TWO), layout.fdtype)
        q_in = T.sblock_alloc_buffer((n, H, R2, TWO), dtype)
        q_out = T.sblock_alloc_buffer((n, H, R2, TWO), dtype)
        locate_stage(layout)("q_locate", n, index, q_pos, None, q_state)
        freqs_stage(layout)("q_freqs", n, q_pos, q_freqs, freqs_pairs)
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_load"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                if index.readable(vt, q_pos):
                    q_in[vt, vh, vj, vp] = q_pairs[vt, vh, vj, vp]
                else:
                    q_in[vt, vh, vj, vp] = T.Cast(dtype, 0)
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_rope"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                q_out[vt, vh, vj, vp] = T.Cast(dtype, _rotate(
                    f32(q_in[vt, vh, vj, ZERO]), f32(q_in[vt, vh, vj, ONE]),
                    f32(q_freqs[vt, vj, ZERO]), f32(q_freqs[vt, vj, ONE]), vp))
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_store"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                if q_state[vt] == OK:
                    out_pairs[vt, vh, vj, vp] = q_out[vt, vh, vj, vp]
    return branch


def k_branch(layout: Layout):
    """``row(t)[D:] = rope(source(t), freqs[pos])`` for every token t with a row (and
    ``output_pairs[t]`` for every OK token, if given); ``source(t)`` is ``row(t)[D:]`` in
    place, else ``kv_input[t, D:]``; an fp8 cache stores ``k_quant``'s values."""
    PS, R2, TWO, ZERO, ONE, dtype, cdtype = (layout.PS, layout.R2, layout.TWO, layout.ZERO,
                                             layout.ONE, layout.dtype, layout.cdtype)

    @T.macro
    def branch(n, k_source, k_pairs, output_pairs, freqs_pairs, k_scale, index):
        k_pos = T.sblock_alloc_buffer((n,), "int64")
        k_slot = T.sblock_alloc_buffer((n,), "int64")
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
                    if index.readable(vt, k_pos):
                        k_in[vt, vj, vp] = k_source[vt, vj, vp]
                    else:
                        k_in[vt, vj, vp] = T.Cast(dtype, 0)
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

    @T.macro
    def branch(n, norm_source, k_rows, output_rows, gamma, epsilon, k_scale, index):
        norm_pos = T.sblock_alloc_buffer((n,), "int64")
        norm_slot = T.sblock_alloc_buffer((n,), "int64")
        norm_in = T.sblock_alloc_buffer((n, D), dtype)
        sumsq = T.sblock_alloc_buffer((n,), "float32")
        scale = T.sblock_alloc_buffer((n,), "float32")
        norm_out = T.sblock_alloc_buffer((n, D), dtype)
        if layout.fp8:
            norm_quantized = T.sblock_alloc_buffer((n, D), cdtype)
        locate_stage(layout)("norm_locate", n, index, norm_pos, norm_slot, None)
        for t, c in T.grid(n, D):
            with T.sblock("norm_load"):
                vt, vc = T.axis.remap("SS", [t, c])
                if layout.write_through:
                    if index.readable(vt, norm_pos):
                        norm_in[vt, vc] = norm_source[vt, vc]
                    else:
                        norm_in[vt, vc] = T.Cast(dtype, 0)
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
        for t, c in T.grid(n, D):
            with T.sblock("norm_store"):
                vt, vc = T.axis.remap("SS", [t, c])
                if index.in_cache(norm_slot[vt]):
                    if layout.fp8:
                        k_rows[norm_slot[vt] // PS, norm_slot[vt] % PS, vc] = norm_quantized[
                            vt, vc]
                    else:
                        k_rows[norm_slot[vt] // PS, norm_slot[vt] % PS, vc] = norm_out[vt, vc]
                if output_rows is not None:
                    if norm_slot[vt] < index.end:  # the token is OK
                        output_rows[vt, vc] = norm_out[vt, vc]
    return branch


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
