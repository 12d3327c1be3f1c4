"""MergeBlockGroups: one GPU launch from the sibling launches of a scheduled PrimFunc.

Sibling launches run one after the other; the blocks of a merged grid do not, so merging
launches of which one reads what another writes would make a race. The pass therefore only
merges a PrimFunc that asks for it with the attribute ``BLOCK_GROUPS``, whose value names the
tensors several launches may write (each a part of its own: the k rope and norm branches
write other columns of the same cache rows, which no analysis of the indices here can
prove), ``[]`` for none; and it checks the rest itself: a launch that writes a tensor (through
any view of it) that another launch reads or writes, other than those named, is refused.
Any other function, however many launches it has, is left alone, and so is a function for
the CPU.

The pass checks its place in the pipeline too: it needs the launches lowered to thread
extents at the top level of the function's body, not yet split into device kernels (run it
right before ``SplitHostDevice``); a function that asks for block groups but has no launch
there is an error.

A PrimFunc whose branches are scheduled on their own lowers to one launch per branch:

    attr blockIdx.x = G0 { allocs; attr threadIdx.y = Y0 { attr threadIdx.x = X0 { body0 } } }
    attr blockIdx.x = G1 { ... body1 ... }

This pass, run right before ``SplitHostDevice``, turns them into one launch whose block
groups are the branches, in order:

    attr blockIdx.x = max(G0 + G1, 1) { attr threadIdx.x = N = max(X0*Y0, X1*Y1) {
      if blockIdx.x < G0:            bx0 = blockIdx.x;      tx0 = tid % X0; ty0 = tid / X0
                                     [if tid < X0*Y0:] body0
      elif blockIdx.x < G0 + G1:     bx1 = blockIdx.x - G0; ...              body1
    } }

The groups follow the launches' order, or, when every launch holds a ``GROUP_ORDER`` mark (a
schedule's ``sch.annotate(block, GROUP_ORDER, rank)`` on a block of each branch: a
``pragma_`` attribute, inert in code generation), ascending rank: the GPU dispatches blocks in
grid order, so the order decides which branch starts first. Launches of one rank share a
group: each of its blocks runs their bodies one after the other (in launch order), the group
spans the most blocks of them, and a body with fewer blocks than its group is guarded by its
own count (a schedule gives them the same count, so that no block idles in one of them).
Grid sizes stay symbolic; blocks of one group run only their own branches. Each branch keeps
its own thread shape, recovered from the linear thread index, so its warps hold the same
threads as in its own launch (warp shuffles stay valid); a branch with fewer threads than
the merged block runs on the first ones. A branch that synchronizes the block
(``tvm_storage_sync``) must span the whole block, since the idle threads would never arrive
at its barrier: the pass raises otherwise. Only 1-D grids (``blockIdx.x``) are merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import sym
from tvm.ir import Op, Range
from tvm.tirx import stmt as S

from . import ir

BLOCK_GROUPS = "tvm_fused.block_groups"
GROUP_ORDER = "pragma_tvm_fused_group_order"
_THREAD_TAGS = ("threadIdx.x", "threadIdx.y", "threadIdx.z")
_BARRIER = Op.get("tirx.tvm_storage_sync")
_ADDRESS_OF = Op.get("tirx.address_of")
_BUFFER_DATA = Op.get("tirx.buffer_data")


@dataclass
class _Group:
    """One branch's launch: its block variable and count, thread variables and body."""

    block_var: tvm.tirx.Var
    blocks: tvm.ir.PrimExpr
    threads: dict  # tag -> (var, extent); extents are constants
    body: S.Stmt

    @property
    def num_threads(self) -> int:
        num = 1
        for _, extent in self.threads.values():
            num *= extent
        return num


def _launch_tag(stmt) -> str | None:
    if isinstance(stmt, S.AttrStmt) and stmt.attr_key == "thread_extent":
        return stmt.node.thread_tag
    return None


def _group_rank(launch) -> int | None:
    """The ``GROUP_ORDER`` rank marked inside ``launch``, or None."""
    ranks = {int(s.value) for s in ir.find(launch, S.AttrStmt,
                                           lambda s: s.attr_key == GROUP_ORDER)}
    if len(ranks) > 1:
        raise ValueError(f"MergeBlockGroups: one launch holds the {GROUP_ORDER} ranks {ranks}")
    return ranks.pop() if ranks else None


def _in_group_order(launches: list) -> list[list]:
    """``launches`` gathered into block groups: by ascending ``GROUP_ORDER`` rank, the
    launches of one rank sharing a group (in the order given), if every one has a rank; else
    a group per launch, as given."""
    ranks = [_group_rank(launch) for launch in launches]
    if all(rank is None for rank in ranks):
        return [[launch] for launch in launches]
    if None in ranks:
        raise ValueError(f"MergeBlockGroups: {GROUP_ORDER} must give every launch a rank, "
                         f"got {ranks}")
    return [[launch for rank, launch in zip(ranks, launches) if rank == group_rank]
            for group_rank in sorted(set(ranks))]


def _has_barrier(stmt) -> bool:
    return ir.contains(stmt, tvm.ir.Call, lambda call: call.op.same_as(_BARRIER))


def _strip_thread_launches(stmt, threads: dict):
    """``stmt`` without its ``threadIdx`` launches (recorded in ``threads``), which must sit in
    the leading sequence of the branch, as lowering leaves them."""
    tag = _launch_tag(stmt)
    if tag in _THREAD_TAGS:
        extent = stmt.value
        if not isinstance(extent, tvm.tirx.IntImm) or tag in threads:
            raise ValueError(f"MergeBlockGroups: {tag} must be launched once, with a constant "
                             f"extent, got {extent}")
        threads[tag] = (stmt.node.var, int(extent))
        return _strip_thread_launches(stmt.body, threads)
    if isinstance(stmt, S.SeqStmt):
        return S.SeqStmt([_strip_thread_launches(s, threads) for s in stmt.seq])
    if ir.contains(stmt, S.AttrStmt, _launch_tag):
        raise ValueError("MergeBlockGroups: a thread launch is nested inside other statements")
    return stmt


def _parse_group(launch) -> _Group:
    threads: dict = {}
    body = _strip_thread_launches(launch.body, threads)
    return _Group(launch.node.var, launch.value, threads, body)


def _dtype(expr) -> str:
    return str(expr.ty)


def _cast(value, like):
    """``value`` in the dtype of ``like``."""
    return value if _dtype(value) == _dtype(like) else tvm.tirx.Cast(_dtype(like), value)


def _branch(group: _Group, block_id, thread_id, first_block, num_threads: int,
            guard_blocks: bool) -> S.Stmt:
    """The launch's body, its old launch variables bound to the merged ones (``guard_blocks``:
    run only on the first ``group.blocks`` blocks of its group)."""
    binds = [S.Bind(group.block_var, _cast(block_id - first_block, group.block_var))]
    stride = 1
    for tag in _THREAD_TAGS:
        if tag in group.threads:
            var, extent = group.threads[tag]
            binds.append(S.Bind(var, _cast(thread_id // stride % extent, var)))
            stride *= extent
    body = S.SeqStmt([*binds, group.body])
    if group.num_threads < num_threads:
        if _has_barrier(group.body):
            raise ValueError(
                f"MergeBlockGroups: a branch of {group.num_threads} threads synchronizes its "
                f"block, but the merged block has {num_threads}; give every branch that "
                "synchronizes the full thread count")
        body = S.IfThenElse(thread_id < group.num_threads, body, None)
    if guard_blocks:  # uniform across a block, so a barrier inside stays safe
        body = S.IfThenElse(block_id - first_block < _cast(group.blocks, block_id), body, None)
    return body


def _tensors(func) -> dict:
    """Buffer (by handle) -> the buffer it views (``decl_buffer(..., data=other.data)``), from
    the function's buffer declarations."""
    return {decl.buffer.__chandle__(): decl.data.args[0]
            for decl in ir.find(func.body, S.DeclBuffer, lambda decl: isinstance(
                decl.data, tvm.ir.Call) and decl.data.op.same_as(_BUFFER_DATA))}


def _memory(launch, tensors: dict) -> tuple[dict, dict]:
    """``(written, accessed)``: handle -> name of the buffers a launch stores to (or passes
    the address of, as an atomic does) and of those it touches at all; a view counts as the
    buffer it views (``tensors``, from ``_tensors``), so that every view of a tensor is the
    tensor."""
    written, accessed = {}, {}

    def add(found: dict, buffer) -> None:
        while buffer.__chandle__() in tensors:
            buffer = tensors[buffer.__chandle__()]
        found[buffer.__chandle__()] = str(buffer)

    for store in ir.find(launch, S.BufferStore):
        add(written, store.buffer)
    for load in ir.find(launch, tvm.ir.TensorLoad):
        add(accessed, load.source)
    for call in ir.find(launch, tvm.ir.Call, lambda call: call.op.same_as(_ADDRESS_OF)):
        for arg in call.args:
            if isinstance(arg, tvm.ir.TensorLoad):
                add(written, arg.source)
    return written, {**accessed, **written}


def _check_independent(launches: list, tensors: dict, shared: set) -> None:
    """Refuse launches of which one writes a tensor another accesses, but those in
    ``shared``."""
    memory = [_memory(launch, tensors) for launch in launches]
    for i, (written, _) in enumerate(memory):
        for j, (_, accessed) in enumerate(memory):
            common = sorted(name for handle, name in written.items()
                            if i != j and handle in accessed and name not in shared)
            if common:
                raise ValueError(
                    f"MergeBlockGroups: launch {i} writes {common}, which launch {j} also "
                    "accesses: merged into one grid they would race")


def merge_launches(stmts: list, check=None) -> list:
    """Merge the ``blockIdx.x`` launches in a flat statement list into one.

    Statements before the first launch stay first; let-bindings and buffer declarations
    between launches (host-side index arithmetic) move before the merged launch. ``check``
    (given the launches) refuses launches that must not share a grid. Returns the new
    statement list.
    """
    launch_ids = [i for i, s in enumerate(stmts) if _launch_tag(s) == "blockIdx.x"]
    if len(launch_ids) < 2:
        return stmts
    if check is not None:
        check([stmts[i] for i in launch_ids])
    if any(ir.contains(st, S.AttrStmt, lambda s: _launch_tag(s) in ("blockIdx.y", "blockIdx.z"))
           for st in stmts):
        raise ValueError("MergeBlockGroups: only 1-D grids (blockIdx.x) can be merged")
    first = launch_ids[0]
    hoisted = [s for s in stmts[first:] if _launch_tag(s) is None]
    if not all(isinstance(s, (S.Bind, S.DeclBuffer)) for s in hoisted):
        raise ValueError("MergeBlockGroups: only let-bindings and buffer declarations may stand "
                         "between launches")
    groups = [[_parse_group(launch) for launch in shared]
              for shared in _in_group_order([stmts[i] for i in launch_ids])]
    num_threads = max(g.num_threads for shared in groups for g in shared)

    index_dtype = _dtype(groups[0][0].blocks)
    block_id = tvm.tirx.Var("blockIdx.x", index_dtype)
    thread_id = tvm.tirx.Var("threadIdx.x", index_dtype)
    first_block = tvm.tirx.IntImm(index_dtype, 0)
    analyzer = sym.Analyzer()
    branches = []
    for shared in groups:
        counts = [_cast(g.blocks, block_id) for g in shared]
        span = counts[0]
        for count in counts[1:]:
            span = span if analyzer.can_prove_equal(span, count) else tvm.tirx.max(span, count)
        bodies = [_branch(g, block_id, thread_id, first_block, num_threads,
                          guard_blocks=not analyzer.can_prove_equal(count, span))
                  for g, count in zip(shared, counts)]
        end = first_block + span
        branches.append((block_id < end, S.SeqStmt(bodies) if len(bodies) > 1 else bodies[0]))
        first_block = end
    chain = None
    for cond, body in reversed(branches):
        chain = S.IfThenElse(cond, body, chain)

    zero = tvm.tirx.IntImm(index_dtype, 0)
    grid = tvm.tirx.max(first_block, tvm.tirx.IntImm(index_dtype, 1))
    block_dim = tvm.tirx.IntImm(index_dtype, num_threads)
    launch = S.AttrStmt(
        tvm.tirx.IterVar(Range(zero, grid), block_id, 1, "blockIdx.x"), "thread_extent", grid,
        S.AttrStmt(tvm.tirx.IterVar(Range(zero, block_dim), thread_id, 1, "threadIdx.x"),
                   "thread_extent", block_dim, chain))
    return [*stmts[:first], *hoisted, launch]


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="tvm_fused.MergeBlockGroups")
def MergeBlockGroups(func, _mod, _ctx):
    """Merge the sibling GPU launches at the top level of ``func``'s body into one, if its
    ``BLOCK_GROUPS`` attribute asks for it (see the module's docstring)."""
    shared = func.attrs.get(BLOCK_GROUPS) if func.attrs is not None else None
    target = func.attrs.get("target") if func.attrs is not None else None
    if shared is None or (target is not None and target.kind.name in ("llvm", "c")):
        return func  # not asked, or a CPU function: its branches are loops of one body
    if not all(isinstance(name, str) for name in shared) or isinstance(shared, str):
        raise ValueError(f"MergeBlockGroups: {BLOCK_GROUPS} must list the names of tensors, "
                         f"got {shared!r}")
    stmts = list(func.body.seq) if isinstance(func.body, S.SeqStmt) else [func.body]
    if not any(_launch_tag(stmt) == "blockIdx.x" for stmt in stmts):
        raise ValueError("MergeBlockGroups: the function asks for block groups but has no "
                         "blockIdx.x launch at the top level of its body: run the pass after "
                         "the thread bindings are lowered and before SplitHostDevice")
    tensors = _tensors(func)
    merged = merge_launches(stmts, check=lambda launches: _check_independent(
        launches, tensors, {str(name) for name in shared}))
    if merged is stmts:
        return func
    return func.with_body(S.SeqStmt(merged))
