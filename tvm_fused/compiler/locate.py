"""The locator stages: from a token to its position and cache row, by offsets or by slots.

Each branch locates its own tokens (on the GPU the branches run in different thread blocks).
A locate stage writes, per token ``t`` (each output optional): ``pos[t]``, its position if it
is real and has a freqs row, else -1; ``slot[t]``, its cache row as ``page * page_size +
row`` (negative: no cache row), or ``index.end`` if the token is not OK (so: it is OK iff
``slot < end``, and has a cache row iff also ``slot >= 0``); ``state[t]``, PADDING, OK or
ERROR. Every index is checked before it is followed, and loads behind a failed check are
never issued: no input makes the kernel read outside its tensors.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import tvm
from tvm.script import tirx as T

from .eager_load import eager
from .layout import Layout

PADDING, OK, ERROR = 0, 1, 2  # token states


@dataclasses.dataclass(frozen=True)
class Index:
    """The buffers a token is located through (those of the other addressing are None), the
    freqs table's rows and ``end``, the number of cache rows (``num_pages * page_size``)."""

    offsets: tvm.tirx.Buffer | None
    cache_lengths: tvm.tirx.Buffer | None
    table: tvm.tirx.Buffer | None
    positions: tvm.tirx.Buffer | None
    slots: tvm.tirx.Buffer | None
    max_seq_len: tvm.tirx.PrimExpr
    end: tvm.tirx.PrimExpr

    def in_cache(self, slot) -> tvm.tirx.PrimExpr:
        """The token has a cache row (its slot is a row of a physical page)."""
        return tvm.tirx.all(tvm.tirx.IntImm(self.end.ty.dtype, 0) <= slot, slot < self.end)

    def regions(self) -> list:
        """The whole of each buffer (what a locate stage may read)."""
        buffers = (self.offsets, self.cache_lengths, self.table, self.positions, self.slots)
        return [tvm.tirx.BufferRegion(b, [tvm.ir.Range(0, d) for d in b.shape])
                for b in buffers if b is not None]


class Located(NamedTuple):
    """A located token: ``real`` (not padding), ``positioned`` (it has a freqs row), its
    ``position`` and ``row`` (its slot, or ``end`` if it is not OK)."""

    real: tvm.tirx.PrimExpr
    positioned: tvm.tirx.PrimExpr
    position: tvm.tirx.PrimExpr
    row: tvm.tirx.PrimExpr


def _elements(index, *buffers) -> list:
    """``buffer[index]`` of each of ``buffers`` that is not None (a block's writes)."""
    return [buffer[index] for buffer in buffers if buffer is not None]


# fmt: off
def locator(layout: Layout):
    """The macro ``locate(vt, index, pos, slot, state)`` of ``layout``'s addressing."""
    # positions and rows are computed and checked in 64 bits (an index past 2^31 must not
    # wrap into range); what is recorded is in range, or -1 / ``end``, in the layout's dtype
    PS, ZERO, NONE = (T.int64(v) for v in (layout.form.page_size, 0, -1))

    @T.macro
    def record(vt, index, located, pos, slot, state):
        """Write a located token's outputs (each optional)."""
        if pos is not None:
            pos[vt] = layout.index(T.Select(located.positioned, located.position, NONE))
        if slot is not None:
            slot[vt] = layout.index(located.row, NONE, T.Cast("int64", index.end))
        if state is not None:
            state[vt] = T.Select(located.real, T.Select(located.row < T.Cast("int64", index.end),
                                                         OK, ERROR),
                                 PADDING)

    @T.macro
    def locate_by_offsets(vt, index, pos, slot, state):
        """Find token ``vt``'s request, position and cache row from ``input_row_offsets``,
        ``cache_lengths`` and ``lookup_table``.

        Request ``min(token, batch - 1)`` is tried first, its offsets and cache length loaded
        in one round with ``offsets[batch]`` (``eager``: the CUDA compiler would otherwise
        wait for the first to decide whether the others are needed): right for every token
        of a decode step (one new token per request), which so skips the log2(batch)
        dependent loads of the binary search that finds the request otherwise. The search
        compares tokens and offsets in 32 bits (a token index is below 2^31; larger offsets,
        which no valid call has, only make the search pick a wrong request, whose index
        stays in range); the position is computed and checked in 64 bits, so no length
        overflows it."""
        offsets, cache_lengths, lookup_table = index.offsets, index.cache_lengths, index.table
        batch: T.let = T.Cast("int32", offsets.shape[0]) - 1
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
            guess_first: T.let = T.Cast("int32", eager(offsets[guess]))
            guess_next: T.let = T.Cast("int32", eager(offsets[guess + 1]))
            guess_length: T.let = eager(cache_lengths[guess])
            hit: T.let = guess_first <= token and token < guess_next
            request[0] = T.Select(hit, guess, -1)
            first[0] = T.Select(hit, guess_first, 0)
            length[0] = T.Select(hit, guess_length, 0)
            if not hit and real:
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
        p: T.let = T.Cast("int64", length[0]) + T.Cast("int64", vt) - T.Cast("int64", first[0])
        positioned: T.let = (real and request[0] >= 0 and ZERO <= p
                             and p < T.Cast("int64", index.max_seq_len))
        listed: T.let = positioned and p // PS < T.Cast("int64", lookup_table.shape[1])
        row: T.let = T.if_then_else(
            listed, T.Cast("int64", lookup_table[request[0], T.Cast("int32", p // PS)]) * PS
            + p % PS, T.Cast("int64", index.end))
        located = T.meta_var(Located(real, positioned, p, row))
        record(vt, index, located, pos, slot, state)

    @T.macro
    def locate_by_slots(vt, index, pos, slot, state):
        """Read token ``vt``'s position and cache row from ``positions`` and ``slot_mapping``:
        tokens past ``positions`` are padding, tokens past ``slot_mapping`` have no cache
        row."""
        real: T.let = vt < index.positions.shape[0]
        p: T.let = T.if_then_else(real, T.Cast("int64", index.positions[vt]), NONE)
        positioned: T.let = real and ZERO <= p and p < T.Cast("int64", index.max_seq_len)
        row: T.let = T.if_then_else(
            positioned, T.if_then_else(vt < index.slots.shape[0],
                                       T.Cast("int64", index.slots[vt]), NONE),
            T.Cast("int64", index.end))
        located = T.meta_var(Located(real, positioned, p, row))
        record(vt, index, located, pos, slot, state)

    return locate_by_slots if layout.slots else locate_by_offsets


# a macro's later calls get suffixed block names ("k_locate_1"): each stage call takes a macro
# of its own from these factories
def locate_stage(layout: Layout):
    """A macro ``stage(name, n, index, pos, slot, state)``: a stage ``name`` locating every
    token through ``index`` (see the module's docstring)."""
    locate = locator(layout)

    @T.macro
    def stage(name, n, index, pos, slot, state):
        for t in range(n):
            with T.sblock(name):
                vt = T.axis.spatial(n, t)
                T.reads(index.regions())
                T.writes(_elements(vt, pos, slot, state))
                locate(vt, index, pos, slot, state)
    return stage


def freqs_stage(layout: Layout):
    """A macro ``stage(name, n, pos, freqs, freqs_pairs)``: a stage ``name`` reading
    ``freqs[t] = freqs_pairs[pos[t]]`` (0 without a position)."""
    R2, TWO, ZERO, fdtype = layout.R2, layout.TWO, layout.ZERO, layout.fdtype

    @T.macro
    def stage(name, n, pos, freqs, freqs_pairs):
        for t, j, p in T.grid(n, R2, TWO):
            with T.sblock(name):
                vt, vj, vp = T.axis.remap("SSS", [t, j, p])
                if pos[vt] >= ZERO:
                    freqs[vt, vj, vp] = freqs_pairs[pos[vt], vj, vp]
                else:
                    freqs[vt, vj, vp] = T.Cast(fdtype, 0)
    return stage
# fmt: on
