"""The TIR lowering pipeline of tvm-fused: TVM 0.27's own s_tir pipeline with our passes
spliced in.

- ``LowerAtomicAdd`` (``atomic_add.py``) and ``MergeBlockGroups`` (``block_groups.py``) run
  right before ``SplitHostDevice``, after the thread-level lowering (cross-thread reductions,
  barriers): accumulations a schedule marks become atomic, and the separately scheduled
  branches of a PrimFunc that asks for it become one kernel launch, and
  ``InsertGridDependency`` (``grid_dependency.py``) puts the programmatic-dependent-launch
  waits into it; ``LaunchWithGridDependency`` right after ``SplitHostDevice`` tags such a
  kernel's launch;
- ``CheckDataAlignment`` (``alignment_check.py``) and ``CheckNoOverlap``
  (``overlap_check.py``) run right after ``MakePackedAPI``: the entry asserts the data
  alignment each buffer argument declares, and that no tensor the op writes shares memory
  with another argument.

TVM 0.27 builds its pass list inside ``default_s_tir_pipeline`` with no hook, so while our
pipeline runs, ``SplitHostDevice`` and ``MakePackedAPI`` are looked up as ``Sequential``s
that carry our passes along: every other pass and every option of TVM's pipeline (async
copies, bound checkers, ...) is TVM's own. The pipeline is registered as ``"tvm_fused"`` so
that ``tvm.compile`` and MetaSchedule's builder both use it.
"""

from __future__ import annotations

import contextlib
import threading

import tvm
from tvm import s_tir, tirx
from tvm.tirx import compilation_pipeline

from .alignment_check import CheckDataAlignment
from .atomic_add import LowerAtomicAdd
from .block_groups import MergeBlockGroups
from .grid_dependency import InsertGridDependency, LaunchWithGridDependency
from .overlap_check import CheckNoOverlap

PIPELINE_NAME = "tvm_fused"
# TVM pass constructor (in tvm.tirx.transform) -> (our passes before it, our passes after it)
SPLICES = {
    "SplitHostDevice": ((LowerAtomicAdd, MergeBlockGroups, InsertGridDependency),
                        (LaunchWithGridDependency,)),
    "MakePackedAPI": ((), (CheckDataAlignment, CheckNoOverlap)),
}
_splicing = threading.Lock()


@contextlib.contextmanager
def _spliced():
    """TVM's pass constructors of ``SPLICES``, returning our passes around TVM's."""
    originals = {name: getattr(tirx.transform, name) for name in SPLICES}

    def around(name):
        before, after = SPLICES[name]
        return lambda *args, **kwargs: tvm.ir.transform.Sequential(
            [*before, originals[name](*args, **kwargs), *after], name=f"tvm_fused.{name}")

    with _splicing:
        try:
            for name in SPLICES:
                setattr(tirx.transform, name, around(name))
            yield
        finally:
            for name, original in originals.items():
                setattr(tirx.transform, name, original)


def tvm_fused_pipeline():
    """Pipeline factory in the form ``tvm.tirx.get_tir_pipeline`` expects."""
    lower, finalize_host, finalize_device = s_tir.pipeline.default_s_tir_pipeline()

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with _spliced():
            return lower(mod)

    return _pipeline, finalize_host, finalize_device


compilation_pipeline.register_tir_pipeline(PIPELINE_NAME, tvm_fused_pipeline)
