"""Schedule of the norm branch (``norm_*`` stages) onto its own thread blocks.

The store stage is the anchor. ``X`` threads per row, ``Y`` rows per block, ``V`` elements per
vector, ``I = kv_norm_dim / (X * V)`` vectors per thread:

    for blk  in blockIdx.x  (ceil(n / (Y * rows)); a persistent grid: grid_blocks, and a
                             serial loop over the block's chunks right inside ty)
     for ty  in threadIdx.y (Y)
      for row in range(rows)                            one cache row at a time
       locate token t and its page                      (registers)
       for tx in threadIdx.x (X): for i in I: x[i*X*V + tx*V : +V]  -> vector loads (registers)
       sum of squares: per thread, then across the X threads        (shuffles [+ smem])
       for tx in threadIdx.x (X):
         scale = rsqrt(sumsq / D + eps)
         for i in I: gamma vector load; y = (x * scale) * gamma; [fp8: quantize y;]
                     vector store (skipped on padding)
"""

from __future__ import annotations

from tvm import s_tir

from tvm_fused.form import Form

from .config import ScheduleConfig
from .util import bind_grid, merge_scale_store, scale_early, set_local


def schedule_norm_branch(sch: s_tir.Schedule, op: Form, config: ScheduleConfig) -> None:
    """Bind the ``norm_*`` stages: ``norm_threads_per_row`` threads per cache row."""
    locate, load, sumsq, scale, apply, store = (
        sch.get_sblock(f"norm_{stage}")
        for stage in ("locate", "load", "sumsq", "scale", "apply", "store")
    )
    x, y = config.norm_threads_per_row, config.norm_rows_per_block
    vector = config.vector_elems(op, op.dtype, op.kv_norm_dim)
    span = x * vector

    def split_row(loop):
        """Row loop -> (threadIdx.x, vectors per thread, vector lanes)."""
        it, tx, vec = sch.split(loop, [None, x, vector])
        sch.reorder(tx, it, vec)
        sch.bind(tx, "threadIdx.x")
        return tx, it, vec

    if op.ds_mla:
        merge_scale_store(sch)
    t, c = sch.get_loops(store)
    rows = config.norm_rows_per_thread
    if rows > 1:
        blk, row, ty = sch.split(t, [None, rows, y])
        sch.reorder(ty, row)
    else:
        blk, ty = sch.split(t, [None, y])
        row = None
    strides = bind_grid(sch, blk, config.grid_blocks, [ty])
    sch.bind(ty, "threadIdx.y")
    if row is None:  # the loop of one cache row (per thread group)
        row = ty if strides is None else strides
    _, it, vec = split_row(c)
    sch.vectorize(vec)
    computed = [apply]
    if op.cache_dtype is not None or op.ds_mla:  # fp8: quantize in registers before the store
        computed.insert(0, sch.get_sblock("norm_quant"))
    if op.ds_mla:  # the tiles' amax needs the whole row: the normed row is computed first
        computed.remove(apply)
    for stage in computed:
        sch.compute_at(stage, it)
        if config.unroll:
            sch.unroll(sch.get_loops(stage)[-1])
    if op.ds_mla:
        _schedule_tiles(sch, row, apply, split_row, x)
    # rsqrt of the row's sum of squares, per element: a block of its own at threadIdx.x
    # would store it over the reduction result, which a multi-warp row keeps in shared
    # memory, while other warps still read the sum (a race)
    sch.compute_inline(scale)

    sch.compute_at(sumsq, row)
    split_row(sch.get_loops(sumsq)[-1])
    sch.compute_at(load, row)  # first in the row's body
    sch.vectorize(split_row(sch.get_loops(load)[-1])[-1])
    gamma = _order_row_body(sch, op, row, locate, apply)
    gamma_vector = config.vector_elems(op, op.gamma_dtype, vector)
    sch.vectorize(sch.split(split_row(sch.get_loops(gamma)[-1])[-1], [None, gamma_vector])[-1])
    set_local(sch, locate, load, sumsq, apply, *computed)
    # the row staged by `load` (and gamma) is read back in another threadIdx.x loop, so
    # buffer compaction would size it for the whole row: index it per thread (vector i, lane
    # v), which is exact in registers, where each thread has its own copy
    sch.transform_layout(load, ("write", 0), lambda t, c: (t, c // span, c % vector),
                         assume_injective_transform=True)
    sch.transform_layout(gamma, ("write", 0), lambda c: (c // span, c % vector),
                         assume_injective_transform=True)
    if op.ds_mla:  # the normed row too
        sch.transform_layout(apply, ("write", 0), lambda t, c: (t, c // span, c % vector),
                             assume_injective_transform=True)


def _order_row_body(sch: s_tir.Schedule, op: Form, row, locate, apply) -> s_tir.SBlockRV:
    """Order the row's body after its load (first): the locate, whose index loads
    (position, then slot) are then in flight while the row is loaded and reduced, not a
    round trip of their own before the store; then gamma's vectors (returned: their block)
    and an fp8 cache's scale, before the row's reduction, in the page table's round. In
    place the locate comes first (the row's load needs the slot), as with PDL's early index
    reads (before the wait); in write-through the row of kv_input needs no index and goes
    first (a load round less per row). gamma before the locate would be no sooner (the
    store waits for the page table anyway) and held 16 more registers across the locate's
    search (48 a thread: 10 blocks of 128 an SM instead of 16)."""
    after_row = op.write_through and not op.pdl_early_indices
    sch.compute_at(locate, row, index=1 if after_row else 0)
    gamma = sch.cache_read(apply, "gamma", "local", consumer_blocks=[apply])
    sch.compute_at(gamma, row, index=2 if after_row else 1)
    if op.cache_dtype is not None:
        scale_early(sch, sch.get_sblock("norm_quant"), "k_scale", row, index=3)
    return gamma


def _schedule_tiles(sch: s_tir.Schedule, row, apply, split_row, threads: int) -> None:
    """fp8_ds_mla: the normed row (``apply``) at the row's loop, in the row's thread layout;
    every tile's amax reduced across the row's threads at once, like the sum of squares (one
    allreduce of a tuple of maxima, the values' shares inlined into it), the tiles' scales
    computed once per thread into registers (not inlined into each value's division, where
    they would be a branch per value), and the row's scales stored by its first threads."""
    amax, scales = sch.get_sblock("norm_tile_amax"), sch.get_sblock("norm_tile_scale")
    sch.compute_inline(sch.get_sblock("norm_tile_share"))
    sch.compute_at(scales, row)
    sch.compute_at(amax, row)
    split_row(sch.get_loops(amax)[-1])
    sch.compute_at(apply, row)
    sch.vectorize(split_row(sch.get_loops(apply)[-1])[-1])
    scale_store = sch.get_sblock("norm_scale_store")
    _, tx = sch.split(sch.get_loops(scale_store)[-1], [None, threads])
    sch.bind(tx, "threadIdx.x")
    set_local(sch, amax, scales)
