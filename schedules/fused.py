"""The block-group schedule of the whole fused op: each branch on its own thread blocks.

Each branch is scheduled on its own (``rope.py``, ``norm.py``, ``count.py``) and so becomes
its own GPU launch; the ``MergeBlockGroups`` pass of ``tvm_fused.compiler.block_groups`` later
concatenates those launches into one kernel whose ``blockIdx.x`` ranges are the groups: q
rope, k rope, norm, error count (``norm_first``: norm, k rope, q rope, error count).
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from tvm_fused.compiler.block_groups import GROUP_ORDER
from tvm_fused.compiler.config import OpConfig
from tvm_fused.compiler.definition import fused_rope_rmsnorm_func

from .config import ScheduleConfig
from .count import schedule_count_branch
from .norm import schedule_norm_branch
from .rope import schedule_rope_branch

# config.norm_first: a block of each branch -> its group's rank in the merged grid
NORM_FIRST = {"norm_store": 0, "k_store": 1, "q_store": 2, "count_locate": 3}


def apply_block_group_schedule(sch: s_tir.Schedule, op: OpConfig, config: ScheduleConfig) -> None:
    """Apply ``config`` to a schedule of ``fused_rope_rmsnorm_func(op)`` in place."""
    schedule_rope_branch(sch, "q", op, config, items=config.rope_vectors_per_thread)
    schedule_rope_branch(sch, "k", op, config, items=config.rope_vectors_per_thread)
    schedule_norm_branch(sch, op, config)
    schedule_count_branch(sch, config)
    if config.norm_first:
        for block, rank in NORM_FIRST.items():
            sch.annotate(sch.get_sblock(block), GROUP_ORDER, rank)


def schedule_fused_rope_rmsnorm(op: OpConfig, config: ScheduleConfig) -> tvm.IRModule:
    """The scheduled IRModule of the fused op for a CUDA target."""
    sch = s_tir.Schedule(fused_rope_rmsnorm_func(op))
    apply_block_group_schedule(sch, op, config)
    return sch.mod
