"""Schedule of the nope branch (``nope_locate``, ``nope_store``: the attention query's nope
part, copied and, for an fp8 query, quantized) onto its own thread blocks.

The store stage is the anchor. A token's ``H * D`` values are cut into vectors of ``V``
elements; each of a block's ``Y * X`` threads takes ``K`` (``nope_vectors_per_thread``)
adjacent vectors, the block consecutive runs of one token:

    for blk  in blockIdx.x  (n * ceil(H * D / V / (K * Y * X)); a persistent grid:
                             grid_blocks, and a serial loop over the block's chunks right
                             inside tx)
     for ty  in threadIdx.y (Y)
      for tx in threadIdx.x (X)                  thread -> (token, head, run of K vectors)
       locate token t                            (registers)
       if the token is OK: q_nope_out[t, h, r*K*V : +K*V] = [fp8(] q_nope[...] [)]
                                                 (K vector loads and stores; an fp8 query
                                                 loads the K vectors into registers first,
                                                 nope_load, quantizes them there, nope_quant,
                                                 and stores them as vectors as wide as
                                                 vector_bytes allows: K = 2 stores 16 fp8)
"""

from __future__ import annotations

import math

from tvm import s_tir

from tvm_fused.compiler.branches import nope_copy_dtype, nope_staged
from tvm_fused.form import ITEMSIZE, Form

from .config import ScheduleConfig
from .util import bind_grid, scale_early, set_local


def schedule_copy_branch(sch: s_tir.Schedule, op: Form, config: ScheduleConfig) -> None:
    """Bind the ``nope_locate`` and ``nope_store`` stages, ``nope_vectors_per_thread``
    adjacent vectors per thread."""
    locate, store = sch.get_sblock("nope_locate"), sch.get_sblock("nope_store")
    unit = nope_copy_dtype(op)  # the copy's elements
    width = op.kv_norm_dim * ITEMSIZE[op.dtype] // ITEMSIZE[unit]  # of a head's row
    vector = config.vector_elems(op, unit, width)
    # the elements a thread moves (whole vectors within a head's row), and per store
    run = vector * math.gcd(config.nope_vectors_per_thread, width // vector)
    stored = min(run, config.vector_elems(op, op.out_dtype or unit, width))
    t, h, c = sch.get_loops(store)
    column, elems = sch.split(c, [None, run])
    blk_part, thread = sch.split(sch.fuse(h, column), [None, config.block_threads])
    blk = sch.fuse(t, blk_part)
    ty, tx = sch.split(thread, [None, config.norm_threads_per_row])
    strides = bind_grid(sch, blk, config.grid_blocks, [ty, tx])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(sch.split(elems, [None, stored])[1])
    where = tx if strides is None else strides
    if op.out_dtype is not None:  # an fp8 query: quantized in registers, stored as vectors
        quant = sch.get_sblock("nope_quant")
        sch.compute_at(quant, where)
        set_local(sch, quant)
        scale_early(sch, quant, "q_scale", where, index=0)
    if nope_staged(op):  # from words loaded as vectors, all before the locate
        load = sch.get_sblock("nope_load")
        sch.compute_at(load, where)
        words = vector * ITEMSIZE[unit] // 4
        sch.vectorize(sch.split(sch.get_loops(load)[-1], [None, words])[1])
        set_local(sch, load)
    sch.compute_at(locate, where)
    set_local(sch, locate)
