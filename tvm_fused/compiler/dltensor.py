"""A packed function's tensor arguments as TIR sees them after ``MakePackedAPI``: each is a
``DeclBuffer`` whose data is the ``data`` field of the argument's DLTensor
(``tvm_struct_get``, through reinterpret casts). The entry-check passes read the data
pointer of such an argument as an integer through a view of its DLTensor, whose first field
it is (TIR has no pointer-to-integer cast)."""

from __future__ import annotations

import tvm
from tvm.ir import PointerType, PrimType
from tvm.tirx import stmt as S

_STRUCT_GET = tvm.ir.Op.get("tirx.tvm_struct_get")
_DATA_FIELD = 1  # DLTensor field index of ``data`` in ``tvm_struct_get``


def argument_handle(decl: S.DeclBuffer):
    """The DLTensor handle a buffer declaration takes its data from, or None (a view)."""
    data = decl.data
    while isinstance(data, tvm.ir.Call) and not data.op.same_as(_STRUCT_GET):
        data = data.args[0]  # through reinterpret casts
    if isinstance(data, tvm.ir.Call) and int(data.args[2]) == _DATA_FIELD:
        return data.args[0]
    return None


def data_pointer(handle, name: str) -> tuple[S.DeclBuffer, tvm.ir.PrimExpr]:
    """A declaration of the DLTensor ``handle``'s first word as a uint64 buffer ``name``, and
    that word (the tensor's data pointer) under it."""
    header = tvm.tirx.decl_buffer((1,), "uint64", name=name)
    decl = S.DeclBuffer(header, data=tvm.tirx.reinterpret(PointerType(PrimType("uint64")),
                                                          handle))
    return decl, tvm.tirx.BufferLoad(header, [0])
