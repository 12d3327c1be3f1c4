"""The compute definition of the fused MLA prologue as one TensorIR PrimFunc (no schedule).

``fused_rope_rmsnorm_func(config)`` returns a block-based PrimFunc whose stages read like
SPEC.md. The PrimFunc declares its tensors, asserts its entry contract, makes the views the
branches address, and calls the four branches, each a macro, each locating its own token
(``locate``) because on the GPU they run in different thread blocks; ``row(t)`` is cache row
``k_cache[slot[t] // page_size, slot[t] % page_size]``:

    q branch     q_locate  t           q_pos[t]: position of token t if it has a freqs row,
                                       else -1; q_state[t]: PADDING, OK or ERROR
                 q_freqs   t, j, p     cos/sin of pair j at q_pos[t] (0 without a position)
                 q_load    t, h, j, p  q_in  = q_rope[t, h, pair j, elem p]   (if positioned)
                 q_rope    t, h, j, p  q_out = rope(q_in[t, h, j, :], freqs[q_pos[t], j])[p]
                 q_store   t, h, j, p  q_rope_output[t, h, pair j, elem p] = q_out  (if OK)
    k branch     k_locate, k_freqs, k_load, k_rope, k_store: the same on row(t)[kv_norm_dim:]
    norm branch  norm_locate, norm_load (the latent: row(t)[:kv_norm_dim]),
                 norm_sumsq  t, c (reduction)  sumsq[t] = sum_c float32(x[t, c])^2
                 norm_scale  t                 scale[t] = rsqrt(sumsq[t] / kv_norm_dim + eps)
                 norm_apply  t, c              y[t, c] = dtype(gamma_dtype(gamma_dtype(x * scale[t])
                                                                    * gamma[c]))
                                               (``norm_rounding="once"``: dtype(x * scale[t]
                                               * gamma[c]), one rounding)
                 norm_store  t, c              row(t)[c] = y[t, c]
    count branch count_locate, count_errors  t errors[0] += 1 if token t is an ERROR

Two forms (``config.write_through``), one body: in place, the k and norm branches load the
cache row itself; write-through, they load token t's row of ``kv_input`` (the projection's
output) instead, never read the cache, and (``config.kv_output``) their stores also write
``kv_output[t]``. An fp8 cache (``config.cache_dtype``) adds a stage per branch,
``k_quant`` and ``norm_quant`` (``t, ...``: ``fp8(saturate(out / k_scale))``), between the
last compute stage and the store: the value is first rounded to ``dtype``, as SPEC.md asks.

Two addressings (``config.addressing``), one body: each locate stage is either
``locate_by_offsets`` (the request found from ``input_row_offsets``, the position from
``cache_lengths``, the page from ``lookup_table``) or ``locate_by_slots`` (``positions[t]``
and ``slot_mapping[t]``, read directly), and both give every branch the same per-token
values: the position and one slot, ``page * page_size + row``. The cos/sin table's layout
(``config.freqs_layout``) is a stride of its pair view: ``(2, 1)`` for interleaved pairs,
``(1, rope_dim / 2)`` for cosines then sines. With ``config.pdl`` the PrimFunc names what may be
read before the wait for the kernel before (``grid_dependency.py``): nothing, or with
``config.pdl_early_indices`` the index tensors.

Indices that point nowhere (SPEC.md): ``locate`` checks every index it follows, so no input
makes the kernel read or write outside its tensors. A token whose position has no freqs
row, whose logical page is past the lookup table's width, whose physical page is ``>=
num_pages`` or whose slot is ``>= num_pages * page_size``, or that no request claims
(offsets not ascending from 0), is an ERROR: none of its rows is written, and
``count_errors`` counts it. A negative physical page or slot, or a token past
``slot_mapping``, means "no cache row" (vLLM's padding slot): the q row is still roped. Rows
of ``q_rope`` past ``offsets[batch]`` (past ``positions``) are PADDING: never read or
written.

Loads and stores are stages of their own, guarded, so that a schedule can stage rows through
registers with wide vector accesses and untouched rows are never accessed. Rope pairs are
addressed through views of shape ``[..., rope_dim / 2, 2]`` whose strides encode the pairing
(interleaved: ``(2, 1)``; NeoX: ``(1, rope_dim / 2)``), so one body serves both modes. The
cache is updated in place: loads read it through ``*_in`` views and stores write it through
others of the same memory, which keeps the dataflow a stage pipeline; a row is stored only
after the stages before have read all of it.

The entry asserts what the kernel was built for: row strides
that are multiples of ``config.alignment`` bytes (buffers declare the same alignment for
their data pointers, which ``alignment_check.CheckDataAlignment`` asserts), a finite,
non-negative epsilon, and (slots) no more positions than q rows nor slots than positions.

Unscheduled, the PrimFunc builds for ``llvm``; ``schedules/`` maps it onto GPU thread blocks.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm.ir import PointerType
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

from .block_groups import BLOCK_GROUPS
from .config import ITEMSIZE, OpConfig
from .exact_math import div_rn, round_to
from .fp8 import saturating_fp8
from .grid_dependency import GRID_DEPENDENCY
from .overlap_check import ALIAS, WRITTEN

OP_NAME = "fused_rope_rmsnorm"
# token states written by ``locate``
PADDING, OK, ERROR = 0, 1, 2


def _f32(x):
    return T.Cast("float32", x)


def _declare(name: str, *args, **kwargs):
    """``T.decl_buffer(*args, **kwargs)`` named ``name`` (as the parser names ``name =
    T.decl_buffer(...)``), for helpers that make views."""
    buffer = T.decl_buffer(*args, **kwargs)
    IRBuilder.name(name, buffer)
    return buffer


def _optional_buffer(present: bool, name: str, handle, *args, **kwargs):
    """``T.match_buffer(handle, ...)`` named ``name`` if ``present``, else None (its handle
    then stays unused, and ``_without_unused_handles`` drops it)."""
    if not present:
        return None
    buffer = T.match_buffer(handle, *args, **kwargs)
    IRBuilder.name(name, buffer)
    return buffer


def _without_unused_handles(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """``func`` without the handle parameters that no buffer was matched to."""
    params = [p for p in func.params if not isinstance(p.ty, PointerType)]
    return tvm.tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def _elements(index, *buffers) -> list:
    """``buffer[index]`` of each of ``buffers`` that is not None (a block's writes)."""
    return [buffer[index] for buffer in buffers if buffer is not None]


@dataclasses.dataclass(frozen=True)
class _Index:
    """The buffers a token is located through (those of the other addressing are None), the
    freqs table's rows and ``end``, the number of cache rows (``num_pages * page_size``)."""

    offsets: tvm.tirx.Buffer | None
    cache_lengths: tvm.tirx.Buffer | None
    table: tvm.tirx.Buffer | None
    positions: tvm.tirx.Buffer | None
    slots: tvm.tirx.Buffer | None
    max_seq_len: tvm.tirx.PrimExpr
    end: tvm.tirx.PrimExpr

    def readable(self, vt, pos: tvm.tirx.Buffer) -> tvm.tirx.PrimExpr:
        """Whether token ``vt``'s rows of q and ``kv_input`` may be read: it is real. Located
        by slots, that is ``vt < len(positions)``, known before any index is loaded, so the
        row loads need not wait for the locate's; by offsets, it has a position (``pos[vt]
        >= 0``; the offsets it takes are loaded anyway)."""
        if self.positions is not None:
            return vt < self.positions.shape[0]
        return pos[vt] >= 0

    def regions(self) -> list:
        """The whole of each buffer (what a locate stage may read)."""
        buffers = (self.offsets, self.cache_lengths, self.table, self.positions, self.slots)
        return [tvm.tirx.BufferRegion(b, [tvm.ir.Range(0, d) for d in b.shape])
                for b in buffers if b is not None]


def _rotate(x0, x1, cos, sin, p):
    """Element ``p`` of the pair ``(x0, x1)`` rotated by ``(cos, sin)``, all float32."""
    return T.if_then_else(p == 0, x0 * cos - x1 * sin, x0 * sin + x1 * cos)


def fused_rope_rmsnorm_func(config: OpConfig) -> tvm.tirx.PrimFunc:
    """The fused op as an unscheduled block-based PrimFunc named ``fused_rope_rmsnorm``.

    Parameters of the PrimFunc, in call order (``n`` tokens, ``H`` heads, ``R`` rope_dim,
    ``D`` kv_norm_dim, ``W = D + R``; every other dim symbolic too; [bracketed]: only in
    the write-through form, or only with an fp8 cache):

    - q_rope ``[n, H, R]`` dtype, strides ``(qs0, qs1, 1)``
    - q_rope_output ``[n, H, R]`` dtype, strides ``(os0, os1, 1)``; may be ``q_rope`` itself
    - [kv_input ``[n, W]`` dtype, strides ``(is0, 1)``: the new rows, never written]
    - [kv_output ``[n, W]`` dtype, strides ``(vs0, 1)`` (``config.kv_output``): receives
      token t's new row]
    - input_row_offsets ``[batch + 1]`` offsets_dtype
    - freqs_cis ``[max_seq_len, R]`` freqs_dtype, contiguous
    - gamma ``[D]`` gamma_dtype
    - k_cache ``[num_pages, page_size, W]`` cache_element, strides ``(ks0, ks1, 1)``
    - [k_scale ``[1]`` float32 (fp8 cache): the cache stores ``value / k_scale``]
    - lookup_table ``[batch, max_pages]`` int32, strides ``(ls0, 1)``
    - cache_lengths ``[batch]`` int32
    - errors ``[1]`` int32: the number of ERROR tokens is added to it
    - epsilon float32, finite and non-negative

    Every tensor of ``dtype`` or the cache's dtype must start at a multiple of
    ``config.alignment`` bytes (so must ``freqs_cis`` and ``gamma``), and its row strides
    be multiples of it: the compiled entry refuses other tensors before launching.
    """
    # static dims as 64-bit constants, like the symbolic ones (the ABI binds int64 shapes)
    H, R, D, PS, W, R2, ONE = (T.int64(v) for v in (
        config.num_q_heads, config.rope_dim, config.kv_norm_dim, config.page_size,
        config.row_width, config.rope_dim // 2, 1))
    dtype, gdtype, fdtype = config.dtype, config.gamma_dtype, config.freqs_dtype
    cdtype = config.cache_element
    WRITE_THROUGH, KV_OUTPUT = config.write_through, config.kv_output
    FP8 = config.cache_dtype is not None
    SLOTS, ROUND_ONCE = config.addressing == "slots", config.norm_rounding == "once"
    # with PDL, what is read before the wait for the kernel before: nothing, or the indices
    INDEX_NAMES = ["positions", "slot_mapping"] if SLOTS else [
        "offsets", "lookup_table", "cache_lengths"]
    EARLY_READS = {GRID_DEPENDENCY: INDEX_NAMES if config.pdl_early_indices else []
                   } if config.pdl else {}
    # the entry refuses written tensors that share memory with another argument, but the
    # output of q may be q itself (an in-place update with its strides)
    CHECKS = {WRITTEN: ["q_rope_output", "k_cache", *(["kv_output"] if KV_OUTPUT else []),
                        "errors"], ALIAS: ["q_rope_output", "q_rope"]}
    FUNC_ATTRS = {"global_symbol": OP_NAME, BLOCK_GROUPS: "vouched", **EARLY_READS, **CHECKS}
    ZERO, TWO, NONE = T.int64(0), T.int64(2), T.int64(-1)
    pj, pp = (TWO, ONE) if config.interleaved else (ONE, R2)  # pair-view strides of (j, p)
    # the cos/sin table's pair view [max_seq_len, R/2, 2]: (cos, sin) adjacent, or R/2 apart
    freqs_strides = (R, TWO, ONE) if config.freqs_layout == "interleaved" else (R, ONE, R2)

    def align(dtype_name: str) -> int:
        """Data-pointer alignment a buffer of ``dtype_name`` declares (and the entry checks)."""
        return max(config.alignment, ITEMSIZE[dtype_name])

    def aligned(stride, dtype_name: str = dtype):
        """``stride`` as a visible multiple of the elements of ``dtype_name`` the alignment
        holds (equal to it: the entry asserts it), so that vector accesses through the views
        are provably aligned."""
        elems = T.int64(config.aligned_elems(dtype_name))
        return stride // elems * elems

    def pair_strides(*row_strides, dtype_name: str = dtype):
        """Strides of a ``[..., R/2, 2]`` pair view of rows with strides ``(*row_strides,
        1)``."""
        return (*(aligned(s, dtype_name) for s in row_strides), pj, pp)

    def multiples(dtype_name: str, *strides):
        """The strides are multiples of the elements of ``dtype_name`` the alignment holds."""
        elems = T.int64(config.aligned_elems(dtype_name))
        return tvm.tirx.all(*(stride % elems == ZERO for stride in strides))

    def refusal(name: str, dtype_name: str) -> tuple:
        """The entry's ValueError for a tensor whose strides this kernel was not built for."""
        elems = config.aligned_elems(dtype_name)
        return ("ValueError", [f"{name}'s strides must be multiples of {elems} elements "
                               f"({config.alignment} bytes), the alignment this kernel was "
                               "built for"])

    def in_cache(slot, index):
        """The token has a cache row (its slot is a row of a physical page)."""
        return tvm.tirx.all(ZERO <= slot, slot < index.end)

    def row_views(name: str, rows, dtype_name: str, *strides) -> tuple:
        """Views of the rows ``[..., W]`` of buffer ``rows`` (leading strides ``strides``):
        ``{name}_rows``, the whole rows, and ``{name}_pairs`` ``[..., R/2, 2]``, their rope
        part; ``(None, None)`` without the buffer."""
        if rows is None:
            return None, None
        lead = tuple(rows.shape[:-1])
        whole = _declare(f"{name}_rows", (*lead, W), dtype_name, data=rows.data,
                         elem_offset=rows.elem_offset,
                         strides=(*(aligned(s, dtype_name) for s in strides), ONE))
        pairs = _declare(f"{name}_pairs", (*lead, R2, TWO), dtype_name, data=rows.data,
                         elem_offset=rows.elem_offset + D,
                         strides=pair_strides(*strides, dtype_name=dtype_name))
        return whole, pairs

    def scaled(value, k_scale):
        """``value`` (dtype) over the cache's scale, correctly rounded float32 (the value
        rounded to dtype on every target first: see ``exact_math``)."""
        return div_rn(round_to(dtype, _f32(value)), k_scale[0])

    # fmt: off
    @T.macro
    def record(vt, index, real, positioned, p, row, pos, slot, state):
        """Write a located token's outputs (each optional; see ``locate_stage``)."""
        if pos is not None:
            pos[vt] = T.Select(positioned, p, NONE)
        if slot is not None:
            slot[vt] = row
        if state is not None:
            state[vt] = T.Select(real, T.Select(row < index.end, OK, ERROR), PADDING)

    @T.macro
    def locate_by_offsets(vt, index, pos, slot, state):
        """Find token ``vt``'s request, position and cache row from ``input_row_offsets``,
        ``cache_lengths`` and ``lookup_table``, checking every index on the way (``pos``,
        ``slot``, ``state`` as for ``locate_stage``).

        Request ``min(token, batch - 1)`` is tried first, its offsets and cache length loaded
        in one round with ``offsets[batch]``: right for every token of a decode step (one new
        token per request), which so skips the log2(batch) dependent loads of the binary
        search that finds the request otherwise. The search compares tokens and offsets in 32
        bits (a token index is below 2^31; larger offsets, which no valid call has, only make
        the search pick a wrong request, whose index stays in range); the position is
        computed and checked in 64 bits, so no length overflows it. Loads behind a failed
        check are never issued."""
        offsets, cache_lengths, lookup_table = index.offsets, index.cache_lengths, index.table
        batch: T.let = T.Cast("int32", offsets.shape[0] - ONE)
        token: T.let = T.Cast("int32", vt)
        request = T.alloc_buffer((1,), "int32", scope="local")  # -1: no request claims vt
        first = T.alloc_buffer((1,), "int32", scope="local")  # the request's first token
        length = T.alloc_buffer((1,), "int32", scope="local")  # its cache length
        lo = T.alloc_buffer((1,), "int32", scope="local")
        hi = T.alloc_buffer((1,), "int32", scope="local")
        request[0] = -1
        first[0] = 0
        length[0] = 0
        real: T.let = token < T.Cast("int32", offsets[batch])
        if batch > 0:
            guess: T.let = T.min(token, batch - 1)
            guess_first: T.let = T.Cast("int32", offsets[guess])
            guess_length: T.let = cache_lengths[guess]
            if guess_first <= token and token < T.Cast("int32", offsets[guess + 1]):
                request[0] = guess
                first[0] = guess_first
                length[0] = guess_length
            elif real:
                lo[0] = 0
                hi[0] = batch - 1
                while lo[0] < hi[0]:  # the last request starting at or before the token
                    mid: T.int32 = (lo[0] + hi[0] + 1) >> 1
                    if T.Cast("int32", offsets[mid]) <= token:
                        lo[0] = mid
                    else:
                        hi[0] = mid - 1
                if T.Cast("int32", offsets[lo[0]]) <= token and token < T.Cast("int32", offsets[lo[0] + 1]):  # noqa: E501
                    request[0] = lo[0]
                    first[0] = T.Cast("int32", offsets[lo[0]])
                    length[0] = cache_lengths[lo[0]]
        p: T.let = T.Cast("int64", length[0]) + vt - T.Cast("int64", first[0])
        positioned: T.let = real and request[0] >= 0 and ZERO <= p and p < index.max_seq_len
        listed: T.let = positioned and p // PS < lookup_table.shape[1]
        row: T.let = T.if_then_else(
            listed, T.Cast("int64", lookup_table[request[0], p // PS]) * PS + p % PS,
            index.end)
        record(vt, index, real, positioned, p, row, pos, slot, state)

    @T.macro
    def locate_by_slots(vt, index, pos, slot, state):
        """Read token ``vt``'s position and cache row from ``positions`` and ``slot_mapping``
        (``pos``, ``slot``, ``state`` as for ``locate_stage``): tokens past ``positions``
        are padding, tokens past ``slot_mapping`` have no cache row. Loads behind a failed
        check are never issued."""
        real: T.let = vt < index.positions.shape[0]
        p: T.let = T.if_then_else(real, T.Cast("int64", index.positions[vt]), NONE)
        positioned: T.let = real and ZERO <= p and p < index.max_seq_len
        row: T.let = T.if_then_else(
            positioned, T.if_then_else(vt < index.slots.shape[0],
                                       T.Cast("int64", index.slots[vt]), NONE), index.end)
        record(vt, index, real, positioned, p, row, pos, slot, state)

    locate = locate_by_slots if SLOTS else locate_by_offsets

    # a macro's later calls get suffixed block names ("k_locate_1"): each stage call takes a
    # macro of its own from these factories
    def locate_stage():
        @T.macro
        def stage(name, n, index, pos, slot, state):
            """A stage ``name`` locating every token through ``index``. Writes (each output
            optional): ``pos[t]`` the token's position if it is real and has a freqs row,
            else -1; ``slot[t]`` its cache row as ``page * page_size + row`` (negative: no
            cache row), or ``index.end`` if the token is not OK (so: it is OK iff ``slot <
            end``, and has a cache row iff also ``slot >= 0``); ``state[t]`` PADDING, OK or
            ERROR."""
            for t in range(n):
                with T.sblock(name):
                    vt = T.axis.spatial(n, t)
                    T.reads(index.regions())
                    T.writes(_elements(vt, pos, slot, state))
                    locate(vt, index, pos, slot, state)
        return stage

    def freqs_stage():
        @T.macro
        def stage(name, n, pos, freqs, freqs_pairs):
            """A stage ``name``: ``freqs[t] = freqs_pairs[pos[t]]`` (0 without a position)."""
            for t, j, p in T.grid(n, R2, TWO):
                with T.sblock(name):
                    vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                    if pos[vt] >= ZERO:
                        freqs[vt, vj, vp] = freqs_pairs[pos[vt], vj, vp]
                    else:
                        freqs[vt, vj, vp] = T.Cast(fdtype, 0)
        return stage

    @T.macro
    def q_branch(n, q_pairs, out_pairs, freqs_pairs, index):
        """q_rope_output[t] = rope(q_rope[t], freqs[pos]) for every OK token t."""
        q_pos = T.sblock_alloc_buffer((n,), "int64")
        q_state = T.sblock_alloc_buffer((n,), "int32")
        q_freqs = T.sblock_alloc_buffer((n, R2, TWO), fdtype)
        q_in = T.sblock_alloc_buffer((n, H, R2, TWO), dtype)
        q_out = T.sblock_alloc_buffer((n, H, R2, TWO), dtype)
        locate_stage()("q_locate", n, index, q_pos, None, q_state)
        freqs_stage()("q_freqs", n, q_pos, q_freqs, freqs_pairs)
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
                    _f32(q_in[vt, vh, vj, ZERO]), _f32(q_in[vt, vh, vj, ONE]),
                    _f32(q_freqs[vt, vj, ZERO]), _f32(q_freqs[vt, vj, ONE]), vp))
        for t, h, j, p in T.grid(n, H, R2, TWO):
            with T.sblock("q_store"):
                vt, vh, vj, vp = T.axis.remap("SSSS", [t, h, j, p])
                if q_state[vt] == OK:
                    out_pairs[vt, vh, vj, vp] = q_out[vt, vh, vj, vp]

    @T.macro
    def k_branch(n, k_source, k_pairs, output_pairs, freqs_pairs, k_scale, index):
        """row(t)[D:] = rope(source(t), freqs[pos]) for every token t with a row (and
        output_pairs[t] for every OK token, if given); source(t) is row(t)[D:] in place,
        else kv_input[t, D:]."""
        k_pos = T.sblock_alloc_buffer((n,), "int64")
        k_slot = T.sblock_alloc_buffer((n,), "int64")
        k_freqs = T.sblock_alloc_buffer((n, R2, TWO), fdtype)
        k_in = T.sblock_alloc_buffer((n, R2, TWO), dtype)
        k_out = T.sblock_alloc_buffer((n, R2, TWO), dtype)
        if FP8:
            k_quantized = T.sblock_alloc_buffer((n, R2, TWO), cdtype)
        locate_stage()("k_locate", n, index, k_pos, k_slot, None)
        freqs_stage()("k_freqs", n, k_pos, k_freqs, freqs_pairs)
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock("k_load"):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                if WRITE_THROUGH:
                    if index.readable(vt, k_pos):
                        k_in[vt, vj, vp] = k_source[vt, vj, vp]
                    else:
                        k_in[vt, vj, vp] = T.Cast(dtype, 0)
                else:
                    if in_cache(k_slot[vt], index):
                        k_in[vt, vj, vp] = k_source[k_slot[vt] // PS, k_slot[vt] % PS, vj, vp]
                    else:
                        k_in[vt, vj, vp] = T.Cast(dtype, 0)
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock("k_rope"):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                k_out[vt, vj, vp] = T.Cast(dtype, _rotate(
                    _f32(k_in[vt, vj, ZERO]), _f32(k_in[vt, vj, ONE]),
                    _f32(k_freqs[vt, vj, ZERO]), _f32(k_freqs[vt, vj, ONE]), vp))
        if FP8:
            for t, j, p in T.grid(n, R2, TWO):
                with T.sblock("k_quant"):
                    vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                    k_quantized[vt, vj, vp] = saturating_fp8(
                        cdtype, scaled(k_out[vt, vj, vp], k_scale))
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock("k_store"):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                if in_cache(k_slot[vt], index):
                    if FP8:
                        k_pairs[k_slot[vt] // PS, k_slot[vt] % PS, vj, vp] = k_quantized[
                            vt, vj, vp]
                    else:
                        k_pairs[k_slot[vt] // PS, k_slot[vt] % PS, vj, vp] = k_out[vt, vj, vp]
                if output_pairs is not None:
                    if k_slot[vt] < index.end:  # the token is OK
                        output_pairs[vt, vj, vp] = k_out[vt, vj, vp]

    @T.macro
    def norm_branch(n, norm_source, k_rows, output_rows, gamma, epsilon, k_scale, index):
        """row(t)[:D] = rmsnorm(source(t)) for every token t with a row (and output_rows[t]
        for every OK token, if given); source(t) is row(t)[:D] in place, else
        kv_input[t, :D]."""
        norm_pos = T.sblock_alloc_buffer((n,), "int64")
        norm_slot = T.sblock_alloc_buffer((n,), "int64")
        norm_in = T.sblock_alloc_buffer((n, D), dtype)
        sumsq = T.sblock_alloc_buffer((n,), "float32")
        scale = T.sblock_alloc_buffer((n,), "float32")
        norm_out = T.sblock_alloc_buffer((n, D), dtype)
        if FP8:
            norm_quantized = T.sblock_alloc_buffer((n, D), cdtype)
        locate_stage()("norm_locate", n, index, norm_pos, norm_slot, None)
        for t, c in T.grid(n, D):
            with T.sblock("norm_load"):
                vt, vc = T.axis.remap("SS", [t, c])
                if WRITE_THROUGH:
                    if index.readable(vt, norm_pos):
                        norm_in[vt, vc] = norm_source[vt, vc]
                    else:
                        norm_in[vt, vc] = T.Cast(dtype, 0)
                else:
                    if in_cache(norm_slot[vt], index):
                        norm_in[vt, vc] = norm_source[norm_slot[vt] // PS, norm_slot[vt] % PS,
                                                      vc]
                    else:
                        norm_in[vt, vc] = T.Cast(dtype, 0)
        for t, c in T.grid(n, D):
            with T.sblock("norm_sumsq"):
                vt, vc = T.axis.remap("SR", [t, c])
                with T.init():
                    sumsq[vt] = T.float32(0)
                sumsq[vt] = sumsq[vt] + _f32(norm_in[vt, vc]) * _f32(norm_in[vt, vc])
        for t in range(n):
            with T.sblock("norm_scale"):
                vt = T.axis.spatial(n, t)
                scale[vt] = T.rsqrt(sumsq[vt] / T.float32(D) + epsilon)
        for t, c in T.grid(n, D):
            with T.sblock("norm_apply"):
                vt, vc = T.axis.remap("SS", [t, c])
                normed = T.meta_var(_f32(norm_in[vt, vc]) * scale[vt])
                if ROUND_ONCE:
                    norm_out[vt, vc] = T.Cast(dtype, normed * _f32(gamma[vc]))
                else:  # rounded to gamma's dtype, times gamma, rounded to gamma's dtype, then
                    # to dtype (a single rounding when they are the same)
                    product = T.meta_var(round_to(gdtype, normed) * _f32(gamma[vc]))
                    norm_out[vt, vc] = T.Cast(dtype, product if gdtype == dtype else round_to(
                        gdtype, product))
        if FP8:
            for t, c in T.grid(n, D):
                with T.sblock("norm_quant"):
                    vt, vc = T.axis.remap("SS", [t, c])
                    norm_quantized[vt, vc] = saturating_fp8(
                        cdtype, scaled(norm_out[vt, vc], k_scale))
        for t, c in T.grid(n, D):
            with T.sblock("norm_store"):
                vt, vc = T.axis.remap("SS", [t, c])
                if in_cache(norm_slot[vt], index):
                    if FP8:
                        k_rows[norm_slot[vt] // PS, norm_slot[vt] % PS, vc] = norm_quantized[
                            vt, vc]
                    else:
                        k_rows[norm_slot[vt] // PS, norm_slot[vt] % PS, vc] = norm_out[vt, vc]
                if output_rows is not None:
                    if norm_slot[vt] < index.end:  # the token is OK
                        output_rows[vt, vc] = norm_out[vt, vc]

    @T.macro
    def count_branch(n, errors, index):
        """errors[0] += the number of ERROR tokens (a schedule running tokens in parallel
        makes the accumulation atomic)."""
        count_state = T.sblock_alloc_buffer((n,), "int32")
        locate_stage()("count_locate", n, index, None, None, count_state)
        for t in range(n):
            with T.sblock("count_errors"):
                vt = T.axis.spatial(n, t)
                T.reads(count_state[vt])
                T.writes(errors[0])
                if count_state[vt] == ERROR:
                    errors[0] = errors[0] + 1

    @T.prim_func(s_tir=True)
    def fused_rope_rmsnorm(
        q_handle: T.handle, out_handle: T.handle, kv_input_handle: T.handle,
        kv_output_handle: T.handle, offsets_handle: T.handle, freqs_handle: T.handle,
        gamma_handle: T.handle, k_handle: T.handle, k_scale_handle: T.handle,
        lookup_handle: T.handle, lengths_handle: T.handle, positions_handle: T.handle,
        slots_handle: T.handle, errors_handle: T.handle, epsilon: T.float32,
    ):
        # the branches become one launch (MergeBlockGroups): they write disjoint memory, which
        # the pass cannot see, as the k and norm branches write other columns of the same rows
        T.func_attr(FUNC_ATTRS)
        # 64-bit sizes and strides: a layer view of a multi-layer cache spans > 2^31 elements
        n, batch, max_seq_len, num_pages, max_pages, m, s = (
            T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64())
        qs0, qs1, os0, os1, is0, vs0, ks0, ks1, ls0 = (
            T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(),
            T.int64(), T.int64())
        q_rope = T.match_buffer(q_handle, (n, H, R), dtype, strides=(qs0, qs1, ONE),
                                align=align(dtype))
        q_rope_output = T.match_buffer(out_handle, (n, H, R), dtype, strides=(os0, os1, ONE),
                                       align=align(dtype))
        kv_input = T.meta_var(_optional_buffer(
            WRITE_THROUGH, "kv_input", kv_input_handle, (n, W), dtype, strides=(is0, ONE),
            align=align(dtype)))
        kv_output = T.meta_var(_optional_buffer(
            KV_OUTPUT, "kv_output", kv_output_handle, (n, W), dtype, strides=(vs0, ONE),
            align=align(dtype)))
        offsets = T.meta_var(_optional_buffer(
            not SLOTS, "offsets", offsets_handle, (batch + ONE,), config.offsets_dtype,
            align=4))
        freqs_cis = T.match_buffer(freqs_handle, (max_seq_len, R), fdtype, align=align(fdtype))
        gamma = T.match_buffer(gamma_handle, (D,), gdtype, align=align(gdtype))
        k_cache = T.match_buffer(k_handle, (num_pages, PS, W), cdtype, strides=(ks0, ks1, ONE),
                                 align=align(cdtype))
        k_scale = T.meta_var(_optional_buffer(FP8, "k_scale", k_scale_handle, (ONE,),
                                              "float32", align=4))
        lookup_table = T.meta_var(_optional_buffer(
            not SLOTS, "lookup_table", lookup_handle, (batch, max_pages), "int32",
            strides=(ls0, ONE), align=4))
        cache_lengths = T.meta_var(_optional_buffer(
            not SLOTS, "cache_lengths", lengths_handle, (batch,), "int32", align=4))
        positions = T.meta_var(_optional_buffer(
            SLOTS, "positions", positions_handle, (m,), config.positions_dtype,
            align=ITEMSIZE[config.positions_dtype]))
        slot_mapping = T.meta_var(_optional_buffer(
            SLOTS, "slot_mapping", slots_handle, (s,), config.slots_dtype,
            align=ITEMSIZE[config.slots_dtype]))
        errors = T.match_buffer(errors_handle, (ONE,), "int32", align=4)
        assert multiples(dtype, qs0, qs1), refusal("q_rope", dtype)
        assert multiples(dtype, os0, os1), refusal("q_rope_output", dtype)
        assert multiples(cdtype, ks0, ks1), refusal("k_cache", cdtype)
        if WRITE_THROUGH:
            assert multiples(dtype, is0), refusal("kv_input", dtype)
        if KV_OUTPUT:
            assert multiples(dtype, vs0), refusal("kv_output", dtype)
        assert T.isfinite(epsilon) and epsilon >= T.float32(0), (
            "ValueError", ["epsilon must be finite and non-negative"])
        if SLOTS:
            assert m <= n, ("ValueError", ["positions has more entries than q_rope's rows"])
            assert s <= m, ("ValueError", ["slot_mapping has more entries than positions"])

        index = T.meta_var(_Index(offsets, cache_lengths, lookup_table, positions,
                                  slot_mapping, max_seq_len, num_pages * PS))
        q_pairs = T.decl_buffer((n, H, R2, TWO), dtype, data=q_rope.data,
                                elem_offset=q_rope.elem_offset, strides=pair_strides(qs0, qs1))
        out_pairs = T.decl_buffer((n, H, R2, TWO), dtype, data=q_rope_output.data,
                                  elem_offset=q_rope_output.elem_offset,
                                  strides=pair_strides(os0, os1))
        freqs_pairs = T.decl_buffer((max_seq_len, R2, TWO), fdtype, data=freqs_cis.data,
                                    elem_offset=freqs_cis.elem_offset, strides=freqs_strides)
        k_rows, k_pairs = T.meta_var(row_views("k", k_cache, cdtype, ks0, ks1))
        q_branch(n, q_pairs, out_pairs, freqs_pairs, index)
        if WRITE_THROUGH:  # the k and norm branches read kv_input (and write kv_output)
            input_rows, input_pairs = T.meta_var(row_views("input", kv_input, dtype, is0))
            output_rows, output_pairs = T.meta_var(row_views("output", kv_output, dtype, vs0))
            k_branch(n, input_pairs, k_pairs, output_pairs, freqs_pairs, k_scale, index)
            norm_branch(n, input_rows, k_rows, output_rows, gamma, epsilon, k_scale, index)
        else:  # the k and norm branches update the cache rows in place, through views that
            # read them (a stage pipeline: a row is stored after the stages before read it)
            k_in_rows, k_in_pairs = T.meta_var(row_views("k_in", k_cache, dtype, ks0, ks1))
            k_branch(n, k_in_pairs, k_pairs, None, freqs_pairs, None, index)
            norm_branch(n, k_in_rows, k_rows, None, gamma, epsilon, None, index)
        count_branch(n, errors, index)
    # fmt: on

    return _without_unused_handles(fused_rope_rmsnorm)
