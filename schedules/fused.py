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
from .copy import schedule_copy_branch
from .count import schedule_count_branch
from .norm import schedule_norm_branch
from .rope import schedule_rope_branch


def block_groups(config: ScheduleConfig, op: Form) -> list[tuple[str, ...]]:
    """The merged grid's block groups in grid order, each named by a block of every branch
    it runs (in the order its blocks run them): no rope groups without rope dims, a nope
    group (after the q rope's) with ``q_nope``."""
    rope = op.rope_dim > 0
    if config.k_rope_in_norm_group and rope:
        cache_rows = [("k_store", "norm_store")]
    elif config.norm_first:
        cache_rows = [("norm_store",), *([("k_store",)] if rope else [])]
    else:
        cache_rows = [*([("k_store",)] if rope else []), ("norm_store",)]
    query = [*([("q_store",)] if rope else []), *([("nope_store",)] if op.q_nope else [])]
    return [*(cache_rows + query if config.norm_first else query + cache_rows),
            ("count_locate",)]


def apply_block_group_schedule(sch: s_tir.Schedule, op: Form, config: ScheduleConfig) -> None:
    """Apply ``config`` to a schedule of ``fused_rope_rmsnorm_func(op)`` in place."""
    if op.rope_dim:
        schedule_rope_branch(sch, "q", op, config, items=config.rope_vectors_per_thread)
        schedule_rope_branch(sch, "k", op, config, items=config.rope_vectors_per_thread)
    if op.q_nope:
        schedule_copy_branch(sch, op, config)
    schedule_norm_branch(sch, op, config)
    schedule_count_branch(sch, config)
    if config.norm_first or config.k_rope_in_norm_group:  # else the branches' own order
        for rank, group in enumerate(block_groups(config, op)):
            for block in group:
                sch.annotate(sch.get_sblock(block), GROUP_ORDER, rank)
