"""Programmatic dependent launch (PDL) of the fused kernel: two passes.

With PDL the GPU may start a kernel while the one before it in the stream still runs: its
blocks run until ``griddepcontrol.wait``, which returns once that kernel has completed and
its writes are visible. The fused kernel does its index work before the wait (the locate
stages read the index tensors and compute positions and rows) and everything else after it,
so a decode step's launch and locate overlap the previous kernel (the GEMM that produced q
and the latent). What may be read before the wait, by name, is the value of the
``GRID_DEPENDENCY`` attribute: tensors the kernel right before must not write.

- ``InsertGridDependency`` (before ``SplitHostDevice``, after ``MergeBlockGroups``): in a
  PrimFunc with ``GRID_DEPENDENCY``, the merged launch starts with
  ``griddepcontrol.launch_dependents`` (the next kernel may be scheduled at once: its own
  wait still returns only after this kernel completes), and each block group waits before
  its first statement that reads any other global tensor or writes global memory (the count
  group's atomic add too: a counter zeroed by the kernel before must be zero first).
- ``LaunchWithGridDependency`` (after ``SplitHostDevice``): a device kernel that calls
  ``griddepcontrol`` gets the launch tag ``tirx.use_programtic_dependent_launch`` (TVM's
  spelling), with which TVM's CUDA runtime launches it with programmatic stream
  serialization.
"""

from __future__ import annotations

import tvm
from tvm.ir import Op
from tvm.tirx import stmt as S

from . import ir
from .block_groups import _launch_tag

GRID_DEPENDENCY = "tvm_fused.grid_dependency"
PDL_LAUNCH_TAG = "tirx.use_programtic_dependent_launch"
LAUNCH_PARAMS = "tirx.kernel_launch_params"
_GRIDDEP = Op.get("tirx.ptx.griddepcontrol")
_ADDRESS_OF = Op.get("tirx.address_of")


def _griddep(action: str) -> S.Evaluate:
    return S.Evaluate(tvm.tirx.call_intrin("void", _GRIDDEP.name, action, ""))


def _global(buffer) -> bool:
    return buffer.scope() in ("global", "")


def _touches_data(stmt, early: set) -> bool:
    """Whether ``stmt`` reads a global buffer not named in ``early`` or writes global
    memory."""
    return (ir.contains(stmt, tvm.ir.TensorLoad,
                        lambda load: _global(load.source) and load.source.name not in early)
            or ir.contains(stmt, S.BufferStore, lambda store: _global(store.buffer))
            or ir.contains(stmt, tvm.ir.Call, lambda call: call.op.same_as(_ADDRESS_OF)))


def _wait_before_data(stmt, early: set, data_after: bool = False) -> S.Stmt:
    """``stmt`` (which touches data) with a ``griddepcontrol.wait`` on every path before its
    first data access, as late as its leading sequences allow: before the first statement
    that touches data, or inside it if it is a sequence, or a guard (an ``if`` without else)
    that nothing touching data follows (``data_after``: something after ``stmt`` does)."""
    if isinstance(stmt, S.SeqStmt):
        parts = list(stmt.seq)
        first = next(i for i, part in enumerate(parts) if _touches_data(part, early))
        later = data_after or any(_touches_data(part, early) for part in parts[first + 1:])
        parts[first] = _wait_before_data(parts[first], early, later)
        return S.SeqStmt(parts)
    if (isinstance(stmt, S.IfThenElse) and stmt.else_case is None and not data_after
            and not _touches_data(S.Evaluate(stmt.condition), early)):
        return S.IfThenElse(stmt.condition, _wait_before_data(stmt.then_case, early), None)
    return S.SeqStmt([_griddep("wait"), stmt])


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.InsertGridDependency")
def InsertGridDependency(func, _mod, _ctx):
    """Insert ``griddepcontrol`` into the merged launch of a PrimFunc that asks for it."""
    names = func.attrs.get(GRID_DEPENDENCY) if func.attrs is not None else None
    if names is None:
        return func
    early = {str(n) for n in names}
    stmts = list(func.body.seq) if isinstance(func.body, S.SeqStmt) else [func.body]
    launch = stmts[-1]
    if _launch_tag(launch) != "blockIdx.x" or _launch_tag(launch.body) != "threadIdx.x":
        raise ValueError("InsertGridDependency: expected one merged launch at the end of the "
                         "function (MergeBlockGroups)")
    threads = launch.body
    groups = []
    chain = threads.body
    while isinstance(chain, S.IfThenElse):
        groups.append(chain)
        chain = chain.else_case
    rebuilt = chain
    for group in reversed(groups):
        body = group.then_case
        if _touches_data(body, early):
            body = _wait_before_data(body, early)
        rebuilt = S.IfThenElse(group.condition, body, rebuilt)
    body = S.SeqStmt([_griddep("launch_dependents"), rebuilt])
    stmts[-1] = S.AttrStmt(launch.node, launch.attr_key, launch.value,
                           S.AttrStmt(threads.node, threads.attr_key, threads.value, body))
    return func.with_body(S.SeqStmt(stmts))


def _calls_griddep(func) -> bool:
    return ir.contains(func.body, tvm.ir.Call, lambda call: call.op.same_as(_GRIDDEP))


@tvm.transform.module_pass(opt_level=0, name="tvm_fused.LaunchWithGridDependency")
def LaunchWithGridDependency(mod, _ctx):
    """Tag every device kernel of ``mod`` that calls ``griddepcontrol`` for a programmatic
    dependent launch."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None:
            continue
        params = func.attrs.get(LAUNCH_PARAMS)
        if params is None or PDL_LAUNCH_TAG in [str(p) for p in params]:
            continue
        if _calls_griddep(func):
            # the dynamic shared memory tag must stay last: PDL's goes first
            updates[gv] = func.with_attr(LAUNCH_PARAMS, [PDL_LAUNCH_TAG, *params])
    for gv, func in updates.items():
        mod[gv] = func
    return mod
