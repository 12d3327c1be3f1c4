"""HoistLoopGuards: ``for i: if c: body`` becomes ``if c: for i: body`` where the loop's whole
body is that one guard and ``c`` reads no memory and does not use ``i``.

A stage that a schedule computes at a thread's row carries the row's guard (``row < n``, the
row loop split by threads) inside its loops over the row's values; once TVM unrolls them,
nvcc keeps one branch per value (each re-reading the thread index), dozens on the decode's
critical path in fp8_ds_mla's tile stages. TVM's HoistIfThenElse leaves guards on thread
indices in place unless told to move them, and then also moves them across the thread
launches of the block groups, which must stay at the top of the function until they are
merged: this pass moves guards out of loops only. It runs where HoistIfThenElse does, before
the loops are unrolled.
"""

from __future__ import annotations

import tvm
from tvm.tirx import stmt as S

from . import ir


def _hoisted(loop: S.For) -> S.Stmt:
    """``loop`` with its guard outside it, where the guard allows; else ``loop``."""
    guard = loop.body
    if not isinstance(guard, S.IfThenElse) or guard.else_case is not None:
        return loop
    condition = guard.condition
    if (ir.contains(condition, tvm.ir.TensorLoad)
            or ir.contains(condition, tvm.tirx.Var, lambda var: var.same_as(loop.loop_var))):
        return loop
    return S.IfThenElse(condition, S.For(
        loop.loop_var, loop.min, loop.extent, loop.kind, guard.then_case,
        loop.thread_binding, loop.annotations, loop.step), None)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.HoistLoopGuards")
def HoistLoopGuards(func, _mod, _ctx):
    """Move the loop-invariant guards of ``func``'s loops outside them (innermost first, so
    a guard leaves a whole nest)."""
    return func.with_body(ir.replace(func.body, S.For, _hoisted))
