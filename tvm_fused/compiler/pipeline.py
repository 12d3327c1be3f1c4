"""The TIR lowering of tvm-fused, pass by pass: TVM 0.27's s_tir pipeline (its default options)
with our passes in their places.

- ``HoistLoopGuards`` (``loop_guards.py``) right after ``HoistIfThenElse``: a guard that is
  a loop's whole body and does not depend on it goes outside the loop;
- ``LowerAtomicAdd`` (``atomic_add.py``), ``MergeBlockGroups`` (``block_groups.py``) and
  ``InsertGridDependency`` (``grid_dependency.py``) run right before ``SplitHostDevice``,
  after the thread-level lowering (cross-thread reductions, barriers): accumulations a
  schedule marks become atomic, the separately scheduled branches of a PrimFunc that asks
  for it become one launch, and that launch gets its programmatic-dependent-launch waits;
  ``LaunchWithGridDependency`` right after ``SplitHostDevice`` tags such a kernel's launch;
- ``CheckDataAlignment`` (``alignment_check.py``) and ``CheckNoOverlap``
  (``overlap_check.py``) run right after ``MakePackedAPI``: the entry asserts the data
  alignment each buffer argument declares, and that no tensor the op writes shares memory
  with another argument.

``lower`` runs the list on a scheduled module bound to its target and splits the result into
the host module and the device module (None on the CPU), as ``tvm.tirx.build`` does.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.tirx.build import split_host_device_mods

from . import tile_max  # noqa: F401 (importing it registers the reducer of the tiles' maxima)
from .alignment_check import CheckDataAlignment
from .atomic_add import LowerAtomicAdd
from .block_groups import MergeBlockGroups
from .grid_dependency import InsertGridDependency, LaunchWithGridDependency
from .loop_guards import HoistLoopGuards
from .overlap_check import CheckNoOverlap


def lowering_passes() -> list[tvm.transform.Pass]:
    """Every pass from a scheduled PrimFunc to the packed host entry and its device kernel."""
    return [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerCrossThreadReduction(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.LiftThreadBinding(),
        s_tir.transform.ManifestSharedMemoryLocalStage(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerAutoCopy(),
        s_tir.transform.UnifyThreadBinding(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.InjectPermutedLayout(),
        s_tir.transform.AnnotateIrregularLoop(),
        s_tir.transform.InjectSoftwarePipeline(),
        s_tir.transform.TransformMmaBufferLayout(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.BF16ComputeLegalize(),
        tirx.transform.NarrowDataType(32),
        s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True),
        s_tir.transform.InjectVirtualThread(),
        s_tir.transform.InjectDoubleBuffer(),
        tirx.transform.StorageRewrite(),
        s_tir.transform.HoistIfThenElse(),
        HoistLoopGuards,
        tirx.transform.UnrollLoop(),
        s_tir.transform.RenormalizeSplitPattern(),
        tirx.transform.StmtSimplify(),
        tirx.transform.RemoveNoOp(),
        s_tir.transform.RewriteUnsafeSelect(),
        tirx.transform.CommonSubexprElim(),
        tirx.transform.FP8ComputeLegalize(),
        s_tir.transform.VerifyVTCMLimit(),
        s_tir.transform.LowerVtcmAlloc(),
        tirx.transform.VerifyMemory(),
        tirx.transform.AnnotateEntryFunc(),
        s_tir.transform.ThreadSync("shared"),
        s_tir.transform.ThreadSync("shared.dyn"),
        s_tir.transform.ThreadSync("warp"),
        s_tir.transform.InferFragment(),
        s_tir.transform.LowerThreadAllreduce(),
        s_tir.transform.MergeSharedMemoryAllocations(),
        LowerAtomicAdd,
        MergeBlockGroups,
        InsertGridDependency,
        tirx.transform.SplitHostDevice(),
        LaunchWithGridDependency,
        tirx.transform.MakePackedAPI(),
        CheckDataAlignment,
        CheckNoOverlap,
        tirx.transform.FP8StorageLegalize(),
        tirx.transform.BF16StorageLegalize(),
    ]


def host_passes() -> list[tvm.transform.Pass]:
    """TVM's finalization of the host module."""
    return [tirx.transform.LowerTVMBuiltin(), tirx.transform.LowerIntrin()]


def device_passes() -> list[tvm.transform.Pass]:
    """TVM's finalization of a device module."""
    return [tirx.transform.LowerWarpMemory(), tirx.transform.StmtSimplify(),
            tirx.transform.LowerIntrin()]


def lower(mod: tvm.IRModule, target: tvm.target.Target
          ) -> tuple[tvm.IRModule, tvm.IRModule | None]:
    """``(host, device)``: ``mod`` (scheduled) lowered for ``target`` (its host: llvm),
    finalized; ``device`` is None for a CPU target."""
    with target:
        mod = tirx.transform.BindTarget(target.with_host(tvm.target.Target("llvm")))(mod)
        mod = tvm.ir.transform.Sequential(lowering_passes())(mod)
        host, devices = split_host_device_mods(mod)
        host = tvm.ir.transform.Sequential(host_passes())(host)
        device = None
        for device_mod in devices.values():
            if device_mod.functions:
                device = tvm.ir.transform.Sequential(device_passes())(device_mod)
    return host, device
