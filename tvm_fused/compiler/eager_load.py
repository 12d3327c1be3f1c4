"""``eager(load)``: a load that the CUDA compiler issues where the program has it.

The locate stage loads a request's first token, the next request's and its cache length
together and then compares them. NVVM (CUDA 13) keeps only the first of these loads where it
stands and predicates the other two on the first comparison, whose operand is the first
load's result: two dependent rounds of loads where one would do (sm_90a SASS of the default
kernel: ``@!P3 LDG`` behind ``ISETP`` on the first ``LDG``'s register), in every block of
every group, before the position is known. A value whose load is wrapped in ``eager`` is
loaded with CUDA's ``__ldg``, a volatile inline ``ld.global.nc`` that the compiler may
neither drop from a path nor predicate, so the loads leave together. On other targets (the
CPU's LLVM) it is the load itself.

``eager`` applies to loads from read-only inputs at in-bounds indices only: the load is
issued on every path that reaches it.
"""

from __future__ import annotations

import tvm

from .exact_math import register_intrinsics

EAGER_LOAD = "tirx.tvm_fused_eager_load"


def _cuda_eager_load(call):
    load = call.args[0]
    return tvm.tirx.call_pure_extern(str(load.ty), "__ldg", tvm.tirx.address_of(load))


register_intrinsics({EAGER_LOAD: (1, {"cuda": _cuda_eager_load,
                                      "default": lambda call: call.args[0]})})


def eager(load):
    """``load`` (a scalar ``BufferLoad`` of a read-only global buffer, at an in-bounds
    index), issued where it stands on CUDA."""
    if not isinstance(load, tvm.ir.expr.TensorLoad):
        raise TypeError(f"eager takes a buffer load, got {load!r}")
    return tvm.tirx.call_intrin(str(load.ty), EAGER_LOAD, load)
