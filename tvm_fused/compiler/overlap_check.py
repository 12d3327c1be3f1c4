"""CheckNoOverlap: the compiled entry refuses a written tensor that shares memory with
another argument.

The op writes some of its tensors while it reads the others, in parallel: a written tensor
overlapping any other argument gives a race, whatever the values. Python could check this
before each launch, but at about as much host time as the launch itself; compiled into the
entry, the check costs a few comparisons. This pass, run right after ``MakePackedAPI``, adds
to the entry of a PrimFunc with a ``WRITTEN`` attribute (the names of the tensor arguments
it writes), after the arguments are bound, for each written tensor ``w`` and every other
tensor argument ``o``, an assertion that the byte ranges ``[start, start + extent)`` of the
two (``extent``: ``(1 + sum((shape_i - 1) * stride_i)) * itemsize``, none when a dim is 0)
are disjoint, or interleave (``_interleaved``: column slices of one buffer, such as the
two parts of a head-padded attention query ``buf[:, :H, :D]`` and ``buf[:, :H, D:]``).
``ALIAS`` names one pair ``(w, o)`` that may start at the same address (an
in-place update), when ``w`` then has ``o``'s strides too. A refused call raises
``ValueError`` before the launch.
"""

from __future__ import annotations

import tvm
from tvm.tirx import stmt as S

from . import ir
from .dltensor import argument_handle, data_pointer

WRITTEN = "tvm_fused.written"
ALIAS = "tvm_fused.alias"
_U64 = "uint64"


def _u64(value) -> tvm.ir.PrimExpr:
    return tvm.tirx.Cast(_U64, value)


class _Span:
    """A tensor argument's bytes: ``start``, ``end``, whether it has any (``decl`` declares
    the view of its DLTensor that ``start`` reads)."""

    def __init__(self, buffer, handle):
        self.name = buffer.name
        self.strides = list(buffer.strides)
        self.shape = list(buffer.shape)
        self.itemsize = buffer.dtype.bits // 8
        self.decl, self.start = data_pointer(handle, f"{buffer.name}_start")
        shape = list(buffer.shape)
        if self.strides:
            elements = 1 + sum((_u64(d) - 1) * _u64(s) for d, s in zip(shape, self.strides))
        else:
            elements = _u64(1)
            for d in shape:
                elements = elements * _u64(d)
        self.end = self.start + _u64(elements) * (buffer.dtype.bits // 8)
        self.filled = tvm.tirx.const(True, "bool")
        for d in shape:
            self.filled = tvm.tirx.And(self.filled, d > 0)


def _interleaved(w: _Span, o: _Span):
    """Whether ``w`` and ``o`` hold disjoint columns of the same rows: equal byte strides
    (but the last, 1), each a multiple of the innermost (a row), and ``o``'s columns, at
    ``d = (o.start - w.start) mod row`` bytes past ``w``'s, after ``w``'s and within the row.
    False where either has no strides or their ranks differ."""
    rank = len(w.shape)
    if rank < 2 or rank != len(o.shape) or not w.strides or not o.strides:
        return tvm.tirx.const(False, "bool")
    outer_w = [_u64(s) * w.itemsize for s in w.strides[:-1]]
    outer_o = [_u64(s) * o.itemsize for s in o.strides[:-1]]
    row = outer_w[-1]
    same = row > tvm.tirx.const(0, _U64)
    for sw, so in zip(outer_w, outer_o):
        same = tvm.tirx.And(same, sw == so)
    safe_row = tvm.tirx.Max(row, tvm.tirx.const(1, _U64))
    for sw in outer_w[:-1]:
        same = tvm.tirx.And(same, sw % safe_row == tvm.tirx.const(0, _U64))
    d = (o.start % safe_row + safe_row - w.start % safe_row) % safe_row
    width_w = _u64(w.shape[-1]) * w.itemsize
    width_o = _u64(o.shape[-1]) * o.itemsize
    return tvm.tirx.And(same, tvm.tirx.And(width_w <= d, d + width_o <= row))


def _checks(spans: dict, written: list, alias) -> list:
    """Assertions that each written span is disjoint from every other."""
    checks = []
    for name in written:
        w = spans[name]
        for other, o in spans.items():
            if other == name:
                continue
            overlap = tvm.tirx.And(tvm.tirx.And(w.filled, o.filled), tvm.tirx.And(
                tvm.tirx.And(w.start < o.end, o.start < w.end),
                tvm.tirx.Not(_interleaved(w, o))))
            message = (f"{name} overlaps {other} in memory: the op writes {name} while it "
                       f"reads {other}")
            if alias is not None and (name, other) == alias:
                same = w.start == o.start
                overlap = tvm.tirx.And(overlap, tvm.tirx.Not(same))
                strides = tvm.tirx.const(True, "bool")
                for ws, os in zip(w.strides, o.strides):
                    strides = tvm.tirx.And(strides, ws == os)
                checks.append(S.AssertStmt(
                    tvm.tirx.Or(tvm.tirx.Not(tvm.tirx.And(w.filled, same)), strides),
                    tvm.ir.StringImm("ValueError"),
                    [tvm.ir.StringImm(f"{name} starts where {other} does but has other "
                                      f"strides")]))
            checks.append(S.AssertStmt(tvm.tirx.Not(overlap), tvm.ir.StringImm("ValueError"),
                                       [tvm.ir.StringImm(message)]))
    return checks


def _is_argument(stmt) -> bool:
    return isinstance(stmt, S.DeclBuffer) and argument_handle(stmt) is not None


def _with_checks(sequence: S.SeqStmt, written: list, alias) -> S.SeqStmt:
    """The statement sequence that declares the tensor arguments, with the checks after the
    last declaration."""
    decls = [(i, s) for i, s in enumerate(sequence.seq) if _is_argument(s)]
    spans = {s.buffer.name: _Span(s.buffer, argument_handle(s)) for _, s in decls}
    missing = [name for name in written if name not in spans]
    if missing:
        raise ValueError(f"CheckNoOverlap: no tensor argument named {missing}")
    last = decls[-1][0] + 1
    inserted = [span.decl for span in spans.values()] + _checks(spans, written, alias)
    return S.SeqStmt([*sequence.seq[:last], *inserted, *sequence.seq[last:]])


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.CheckNoOverlap")
def CheckNoOverlap(func, _mod, _ctx):
    """Assert at the entry of a packed ``func`` with ``WRITTEN`` that its written tensor
    arguments share no memory with any other."""
    written = func.attrs.get(WRITTEN) if func.attrs is not None else None
    if written is None:
        return func
    alias = func.attrs.get(ALIAS)
    alias = None if alias is None else tuple(str(name) for name in alias)
    sequences = ir.find(func.body, S.SeqStmt,
                        lambda sequence: any(_is_argument(s) for s in sequence.seq))
    if not sequences:
        raise ValueError("CheckNoOverlap: no tensor argument declarations found")
    checked = _with_checks(sequences[0], [str(name) for name in written], alias)
    return func.with_body(ir.replace(func.body, S.SeqStmt, lambda sequence: checked
                                     if sequence.same_as(sequences[0]) else sequence))
