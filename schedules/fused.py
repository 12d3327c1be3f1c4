"""The block-group schedule of the whole fused op: each branch on its own thread blocks.

Each branch is scheduled on its own (``rope.py``, ``norm.py``, ``count.py``) and so becomes
its own GPU launch; the ``MergeBlockGroups`` pass of ``tvm_fused.compiler.block_groups`` later
concatenates those launches into one kernel whose ``blockIdx.x`` ranges are the groups: q
rope, k rope, norm, error count (``norm_first``: norm, k rope, q rope, error count;
``k_rope_in_norm_group``: the k rope and norm branches share the norm's blocks).
"""

from __future__ import annotations

from tvm import s_tir

from tvm_fused.compiler.block_groups import GROUP_ORDER
from tvm_fused.form import Form

from .config import ScheduleConfig
from .count import schedule_count_branch
from .norm import schedule_norm_branch
from .rope import schedule_rope_branch


def block_groups(config: ScheduleConfig) -> list[tuple[str, ...]]:
    """The merged grid's block groups in grid order, each named by a block of every branch
    it runs (in the order its blocks run them)."""
    if config.k_rope_in_norm_group:
        cache_rows = [("k_store", "norm_store")]
    elif config.norm_first:
        cache_rows = [("norm_store",), ("k_store",)]
    else:
        cache_rows = [("k_store",), ("norm_store",)]
    rope = [("q_store",)]
    return [*(cache_rows + rope if config.norm_first else rope + cache_rows), ("count_locate",)]


def apply_block_group_schedule(sch: s_tir.Schedule, op: Form, config: ScheduleConfig) -> None:
    """Apply ``config`` to a schedule of ``fused_rope_rmsnorm_func(op)`` in place."""
    schedule_rope_branch(sch, "q", op, config, items=config.rope_vectors_per_thread)
    schedule_rope_branch(sch, "k", op, config, items=config.rope_vectors_per_thread)
    schedule_norm_branch(sch, op, config)
    schedule_count_branch(sch, config)
    if config.norm_first or config.k_rope_in_norm_group:  # else the branches' own order
        for rank, group in enumerate(block_groups(config)):
            for block in group:
                sch.annotate(sch.get_sblock(block), GROUP_ORDER, rank)
