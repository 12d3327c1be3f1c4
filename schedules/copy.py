"""Schedule of the nope branch (``nope_locate``, ``nope_store``: the attention query's nope
part, copied and, for an fp8 query, quantized) onto its own thread blocks.

The store stage is the anchor. A token's ``H * D`` values are cut into vectors of ``V``
elements, one per thread; a block's ``Y * X`` threads take consecutive vectors of one token:

    for blk  in blockIdx.x  (n * ceil(H * D / V / (Y * X)); a persistent grid: grid_blocks,
                             and a serial loop over the block's chunks right inside tx)
     for ty  in threadIdx.y (Y)
      for tx in threadIdx.x (X)                  thread -> (token, head, vector)
       locate token t                            (registers)
       if the token is OK: q_nope_out[t, h, v*V : +V] = [fp8(] q_nope[t, h, v*V : +V] [)]
                                                 (a vector load and store)
"""

from __future__ import annotations

from tvm import s_tir

from tvm_fused.compiler.branches import nope_copy_dtype
from tvm_fused.form import ITEMSIZE, Form

from .config import ScheduleConfig
from .util import bind_grid, set_local


def schedule_copy_branch(sch: s_tir.Schedule, op: Form, config: ScheduleConfig) -> None:
    """Bind the ``nope_locate`` and ``nope_store`` stages, a vector per thread."""
    locate, store = sch.get_sblock("nope_locate"), sch.get_sblock("nope_store")
    unit = nope_copy_dtype(op)  # the store's elements
    vector = config.vector_elems(op, unit, op.kv_norm_dim * ITEMSIZE[op.dtype] // ITEMSIZE[unit])
    t, h, c = sch.get_loops(store)
    column, lane = sch.split(c, [None, vector])
    blk_part, thread = sch.split(sch.fuse(h, column), [None, config.block_threads])
    blk = sch.fuse(t, blk_part)
    ty, tx = sch.split(thread, [None, config.norm_threads_per_row])
    strides = bind_grid(sch, blk, config.grid_blocks, [ty, tx])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(lane)
    sch.compute_at(locate, tx if strides is None else strides)
    set_local(sch, locate)
