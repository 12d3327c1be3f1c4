"""LowerAtomicAdd: accumulations that a schedule marks shared become CUDA ``atomicAdd``.

A definition states an accumulation with serial semantics, ``acc[i] = acc[i] + value``, as
the op's error count does. A schedule that runs its iterations on many threads at once marks
the block::

    sch.annotate(block, ATOMIC_ADD, 1)

and this pass, run after blocks are lowered (the mark is then a ``pragma_`` attribute around
the block's statements), turns every such store under the mark into
``atomicAdd(&acc[i], value)``. Any other store under the mark is an error, and so is the mark
on a target other than CUDA (the CPU schedule keeps such a block on one thread instead).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm.backend.cuda.op import cuda_atomic_add
from tvm.tirx import stmt as S

ATOMIC_ADD = "pragma_tvm_fused_atomic_add"


def _marked(stmt) -> bool:
    return isinstance(stmt, S.AttrStmt) and stmt.attr_key == ATOMIC_ADD


def _atomic(store: S.BufferStore) -> S.Evaluate:
    """``acc[i] = acc[i] + v`` (either operand order) as ``atomicAdd(&acc[i], v)``."""
    value = store.value
    if isinstance(value, tvm.tirx.Add):
        for own, other in ((value.a, value.b), (value.b, value.a)):
            if (isinstance(own, tvm.ir.TensorLoad) and own.source.same_as(store.buffer)
                    and all(tvm_ffi.structural_equal(x, y)
                            for x, y in zip(own.indices, store.indices))):
                return S.Evaluate(cuda_atomic_add(tvm.tirx.address_of(own), other))
    raise ValueError(f"LowerAtomicAdd: a store under {ATOMIC_ADD} must add to the value it "
                     f"overwrites, got {store}")


def _rewrite(stmt, marked: bool):
    """``stmt`` with the marks dropped and the stores under them made atomic."""
    if _marked(stmt):
        return _rewrite(stmt.body, True)
    if marked and isinstance(stmt, S.BufferStore):
        return _atomic(stmt)
    if isinstance(stmt, S.SeqStmt):
        return S.SeqStmt([_rewrite(s, marked) for s in stmt.seq])
    if isinstance(stmt, S.AttrStmt):
        return S.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _rewrite(stmt.body, marked))
    if isinstance(stmt, S.IfThenElse):
        else_case = None if stmt.else_case is None else _rewrite(stmt.else_case, marked)
        return S.IfThenElse(stmt.condition, _rewrite(stmt.then_case, marked), else_case)
    if isinstance(stmt, S.For):
        return S.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
                     _rewrite(stmt.body, marked), stmt.thread_binding, stmt.annotations,
                     stmt.step)
    if isinstance(stmt, S.While):
        return S.While(stmt.condition, _rewrite(stmt.body, marked))
    return stmt  # a leaf (Bind, DeclBuffer, Evaluate, ...)


def _has_mark(stmt) -> bool:
    children = stmt.seq if isinstance(stmt, S.SeqStmt) else [
        c for c in (getattr(stmt, "body", None), getattr(stmt, "then_case", None),
                    getattr(stmt, "else_case", None)) if c is not None]
    return _marked(stmt) or any(_has_mark(c) for c in children)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.LowerAtomicAdd")
def LowerAtomicAdd(func, _mod, _ctx):
    """Make the marked accumulations of ``func`` atomic (CUDA only)."""
    if not _has_mark(func.body):
        return func
    target = func.attrs.get("target") if func.attrs is not None else None
    if target is None or target.kind.name != "cuda":
        raise ValueError(f"LowerAtomicAdd: {ATOMIC_ADD} needs a CUDA target, got {target}")
    body = _rewrite(func.body, False)
    if _has_mark(body):
        raise ValueError(f"LowerAtomicAdd: {ATOMIC_ADD} inside a statement it cannot rewrite")
    return func.with_body(body)
