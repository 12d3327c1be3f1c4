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
                                                 (a vector load and store; an fp8 query
                                                 loads the vector into registers, nope_load,
                                                 quantizes it there, nope_quant, and stores
                                                 the fp8 vector)
"""

from __future__ import annotations

from tvm import s_tir

from tvm_fused.compiler.branches import nope_copy_dtype, nope_staged
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
    where = tx if strides is None else strides
    if op.out_dtype is not None:  # an fp8 query: quantized in registers, stored as a vector
        quant = sch.get_sblock("nope_quant")
        sch.compute_at(quant, where)
        set_local(sch, quant)
    if nope_staged(op):  # from words loaded as one vector
        load = sch.get_sblock("nope_load")
        sch.compute_at(load, where)
        sch.vectorize(sch.get_loops(load)[-1])
        set_local(sch, load)
    sch.compute_at(locate, where)
    set_local(sch, locate)
