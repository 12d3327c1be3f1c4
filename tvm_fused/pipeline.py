"""The TIR lowering pipeline of tvm-fused: TVM 0.27's default s_tir pipeline plus our passes.

``LowerAtomicAdd`` (``atomic_add.py``) makes the accumulations a schedule marks shared atomic;
``MergeBlockGroups`` (``block_groups.py``) runs after the thread-level lowering (cross-thread
reductions, barriers) and right before ``SplitHostDevice``, so that the separately scheduled
branches of a PrimFunc become one kernel launch; ``CheckDataAlignment``
(``alignment_check.py``), right after ``MakePackedAPI``, makes the entry assert the data
alignment each buffer declares. The list below mirrors
``tvm.s_tir.pipeline.default_s_tir_pipeline`` pass for pass (a test checks that a PrimFunc
with one launch compiles to the same source either way); it is registered as the named
pipeline ``"tvm_fused"`` so that ``tvm.compile`` and MetaSchedule's builder both use it.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.tirx import compilation_pipeline

from .alignment_check import CheckDataAlignment
from .atomic_add import LowerAtomicAdd
from .block_groups import MergeBlockGroups

PIPELINE_NAME = "tvm_fused"


def _lowering_passes(config) -> list:
    """TVM's s_tir lowering, with MergeBlockGroups before SplitHostDevice."""
    passes = [
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
        tirx.transform.StmtSimplify(),  # added: folds (f // 2) * 2 + f % 2 (pair views) to f
        tirx.transform.VectorizeLoop(not bool(config.get("tirx.disable_vectorize", False))),
        s_tir.transform.InjectVirtualThread(),
        s_tir.transform.InjectDoubleBuffer(),
    ]
    if not bool(config.get("tirx.disable_storage_rewrite", False)):
        passes.append(tirx.transform.StorageRewrite())
    passes += [
        s_tir.transform.HoistIfThenElse(),
        tirx.transform.UnrollLoop(),
        s_tir.transform.RenormalizeSplitPattern(),
        tirx.transform.StmtSimplify(),
        tirx.transform.RemoveNoOp(),
        s_tir.transform.RewriteUnsafeSelect(),
    ]
    if not bool(config.get("tirx.disable_cse_tir", False)):
        passes.append(tirx.transform.CommonSubexprElim())
    passes += [
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
        tirx.transform.SplitHostDevice(),
        tirx.transform.MakePackedAPI(),
        CheckDataAlignment,
        tirx.transform.FP8StorageLegalize(),
        tirx.transform.BF16StorageLegalize(),
    ]
    return passes


def tvm_fused_pipeline():
    """Pipeline factory in the form ``tvm.tirx.get_tir_pipeline`` expects."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        config = tvm.transform.PassContext.current().config
        return tvm.ir.transform.Sequential(_lowering_passes(config))(mod)

    return (_pipeline, compilation_pipeline.finalize_host_passes,
            compilation_pipeline.finalize_device_passes)


compilation_pipeline.register_tir_pipeline(PIPELINE_NAME, tvm_fused_pipeline)
