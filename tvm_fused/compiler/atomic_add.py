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

from . import ir

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


def _unmarked(stmt: S.AttrStmt):
    """A marked statement's body, its stores made atomic; any other statement as it is."""
    return ir.replace(stmt.body, S.BufferStore, _atomic) if _marked(stmt) else stmt


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.LowerAtomicAdd")
def LowerAtomicAdd(func, _mod, _ctx):
    """Make the marked accumulations of ``func`` atomic (CUDA only)."""
    if not ir.contains(func.body, S.AttrStmt, _marked):
        return func
    target = func.attrs.get("target") if func.attrs is not None else None
    if target is None or target.kind.name != "cuda":
        raise ValueError(f"LowerAtomicAdd: {ATOMIC_ADD} needs a CUDA target, got {target}")
    return func.with_body(ir.replace(func.body, S.AttrStmt, _unmarked))
