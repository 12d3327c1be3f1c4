"""CheckDataAlignment: the compiled entry refuses data pointers a kernel was not built for.

``T.match_buffer(..., align=N)`` declares that a tensor argument's data pointer is a multiple
of ``N`` bytes, and TVM compiles on that promise (``MakePackedAPI`` marks the pointer with a
``storage_alignment`` attribute; vector accesses rely on it), but checks nothing. A torch view
can start anywhere (``q[..., 1:]``), and a misaligned vector access on a GPU ends the
process's CUDA context. This pass, run right after ``MakePackedAPI``, adds to the entry, for
every argument with an alignment above 1, an assertion on the pointer in its DLTensor, so
that a misaligned tensor raises ``ValueError`` before the launch.
"""

from __future__ import annotations

import tvm
from tvm.tirx import stmt as S

from . import ir
from .dltensor import argument_handle, data_pointer

_STORAGE_ALIGNMENT = "storage_alignment"


def _dltensor_of(buffer, stmt) -> tvm.tirx.Var | None:
    """The DLTensor handle whose data field ``buffer`` is declared on, under ``stmt``."""
    handles = [argument_handle(decl) for decl in ir.find(
        stmt, S.DeclBuffer, lambda decl: decl.buffer.name == buffer.name)]
    return next((handle for handle in handles if handle is not None), None)


def _pointer_check(buffer, handle, alignment: int) -> list:
    """Statements asserting that ``handle``'s data pointer is ``alignment``-byte aligned."""
    decl, pointer = data_pointer(handle, f"{buffer.name}_dltensor")
    aligned = tvm.tirx.FloorMod(pointer, tvm.tirx.const(alignment, "uint64")) == \
        tvm.tirx.const(0, "uint64")
    message = (f"{buffer.name}'s data pointer must be a multiple of {alignment} bytes, the "
               "alignment this kernel was built for")
    return [decl,
            # (condition, kind, message): the FFI's order; the Python wrapper names them
            # (kind, condition, ...) but passes them through in the order given
            S.AssertStmt(aligned, tvm.ir.StringImm("ValueError"), [tvm.ir.StringImm(message)])]


def _checked(stmt: S.AttrStmt) -> S.Stmt:
    """A ``storage_alignment`` mark above 1 with the assertion of its pointer's alignment
    first in its body; any other statement as it is."""
    if stmt.attr_key != _STORAGE_ALIGNMENT or int(stmt.value) <= 1:
        return stmt
    handle = _dltensor_of(stmt.node, stmt.body)
    if handle is None:
        raise ValueError(f"CheckDataAlignment: no DLTensor found for {stmt.node.name}")
    body = S.SeqStmt([*_pointer_check(stmt.node, handle, int(stmt.value)), stmt.body])
    return S.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.CheckDataAlignment")
def CheckDataAlignment(func, _mod, _ctx):
    """Assert at the entry of a packed ``func`` every alignment its arguments declare."""
    return func.with_body(ir.replace(func.body, S.AttrStmt, _checked))
