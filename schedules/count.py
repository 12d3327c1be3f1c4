"""Schedule of the count branch (``count_locate``, ``count_errors``): one thread per token.

    for blk in blockIdx.x  (ceil(n / block_threads))
     for tx in threadIdx.x (block_threads)            thread -> token
       locate token t                                 (registers)
       if ERROR: atomicAdd(errors, 1)                 (the accumulation, made atomic)
"""

from __future__ import annotations

from tvm import s_tir

from tvm_fused.compiler.atomic_add import ATOMIC_ADD

from .config import ScheduleConfig
from .util import set_local


def schedule_count_branch(sch: s_tir.Schedule, config: ScheduleConfig) -> None:
    """Bind the ``count_*`` stages, a token per thread, and make the count atomic."""
    locate, count = sch.get_sblock("count_locate"), sch.get_sblock("count_errors")
    (t,) = sch.get_loops(count)
    blk, tx = sch.split(t, [None, config.block_threads])
    sch.bind(blk, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(locate, tx)
    set_local(sch, locate)
    sch.annotate(count, ATOMIC_ADD, 1)
