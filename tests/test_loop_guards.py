"""HoistLoopGuards on small PrimFuncs: a loop-invariant guard that is a loop's whole body goes
outside the loop nest; a guard that uses the loop's variable or reads memory stays."""

import tvm
from tvm.script import tirx as T
from tvm.tirx import stmt as S

from tvm_fused.compiler import ir
from tvm_fused.compiler.loop_guards import HoistLoopGuards


def guarded_nest(guard: str):
    """``for i, j: if <guard>: out[i, j] = a[i, j] + 1`` with guard ``"n"`` (``n > 0``),
    ``"i"`` (``i < n``) or ``"load"`` (``a[0, 0] > 0``)."""

    # fmt: off
    @T.prim_func(s_tir=True)
    def func(a_handle: T.handle, out_handle: T.handle, n: T.int32):
        a = T.match_buffer(a_handle, (4, 8), "float32")
        out = T.match_buffer(out_handle, (4, 8), "float32")
        for i, j in T.grid(4, 8):
            if guard == "n":
                if n > 0:
                    out[i, j] = a[i, j] + T.float32(1)
            elif guard == "i":
                if i < n:
                    out[i, j] = a[i, j] + T.float32(1)
            elif a[0, 0] > T.float32(0):
                out[i, j] = a[i, j] + T.float32(1)
    # fmt: on
    return func


def _outermost(func) -> S.Stmt:
    return ir.find(func.body, (S.For, S.IfThenElse))[0]


def test_an_invariant_guard_leaves_the_whole_nest():
    func = HoistLoopGuards(tvm.IRModule({"main": guarded_nest("n")}))["main"]
    outer = _outermost(func)
    assert isinstance(outer, S.IfThenElse)
    assert len(ir.find(func.body, S.IfThenElse)) == 1
    loops = ir.find(outer.then_case, S.For)
    assert [int(loop.extent) for loop in loops] == [4, 8]


def test_guards_on_the_loop_or_on_memory_stay_inside():
    for guard, loops_outside in (("i", 1), ("load", 2)):
        func = HoistLoopGuards(tvm.IRModule({"main": guarded_nest(guard)}))["main"]
        assert isinstance(_outermost(func), S.For)
        guard_stmt = ir.find(func.body, S.IfThenElse)[0]
        enclosing = [loop for loop in ir.find(func.body, S.For)
                     if ir.contains(loop.body, S.IfThenElse,
                                    lambda node: node.same_as(guard_stmt))]
        # "i < n" may leave j's loop (it does not use j), never i's; a read stays in both
        assert len(enclosing) == loops_outside
