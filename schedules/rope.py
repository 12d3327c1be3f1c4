"""Schedule of a rope branch (``q_*`` or ``k_*`` stages) onto its own thread blocks.

The store stage is the anchor; every other stage is computed at its per-vector loop. A head's
``R`` rope elements are split over ``L = R / E`` lanes of ``E`` elements (one vector ``V``
interleaved; two for NeoX, whose pairs sit ``R / 2`` apart). A block's ``Y * X`` threads cover
``Y * X / L`` heads of one token (many heads: q), or whole tokens (few: k, or q with few heads):

    for blk   in blockIdx.x  (n * ceil(H / heads per block), or ceil(n / tokens per block);
                              a persistent grid: grid_blocks, and a serial loop over the
                              block's chunks right inside tx)
     for ty   in threadIdx.y (Y)
      for tx  in threadIdx.x (X)                      thread -> (token, head, lane)
       locate token t, freqs[pos, lane*E : +E],      once per thread when its items are
       x[t, h .. h+items, lane*E : +E]               adjacent heads (of one token; two or
                                                      more items): all loads in flight at once
       for item in range(items)                       heads (or tokens) a thread handles
         locate token t: binary search of input_row_offsets        (registers)
         freqs[pos, lane*E : +E]          ->  vector loads         (registers)
         x[t, h, lane*E : +E]             ->  vector loads         (registers; 0 on padding)
         rotate E elements                    (unrolled, fp32)
         [fp8 cache: quantize E elements      (unrolled)]
         store                            ->  vector stores        (skipped on padding)

With ``k_rope_in_norm_group`` the k branch takes the norm's chunks instead (``norm.py``): row
``ty`` of the block's ``Y`` (times its rows per thread) on the first ``L`` threads of the
row's ``X`` (rounds of ``X`` lanes when ``L > X``), so that both branches cover the same rows
per block and share its blocks.
"""

from __future__ import annotations

from tvm import s_tir

from tvm_fused.form import Form

from .config import ScheduleConfig
from .util import bind_grid, loops_under, scale_early, set_local, vectorize_tail


def schedule_rope_branch(
    sch: s_tir.Schedule, prefix: str, op: Form, config: ScheduleConfig, items: int
) -> None:
    """Bind the ``{prefix}_locate/freqs/load/rope[/quant]/store`` stages; ``items`` vectors a
    thread (at most as many as a token's heads fill: with 16 heads and 128-thread blocks, one)."""
    locate, freqs, load, rope, store = (
        sch.get_sblock(f"{prefix}_{stage}")
        for stage in ("locate", "freqs", "load", "rope", "store")
    )
    # the k branch of an fp8 cache quantizes the roped values in registers before the store,
    # by k_scale; an fp8 query the same way, by q_scale
    quantized = op.cache_dtype if prefix == "k" else op.out_dtype
    quant = sch.get_sblock(f"{prefix}_quant") if quantized is not None else None
    computed = [rope] if quant is None else [quant, rope]
    vector, elems, lanes = config.rope_lanes(op, prefix)
    threads = config.block_threads
    heads = op.num_q_heads if prefix == "q" else 1

    def in_pj_order(*blocks):
        """Registers in memory order (p, j), where a pair's elements sit apart: vectors stay
        contiguous."""
        for block in blocks:
            sch.transform_layout(block, ("write", 0), lambda *i: (*i[:-2], i[-1], i[-2]))

    if not op.interleaved:  # NeoX rows: x[j] and x[j + R/2]
        in_pj_order(load, *computed)
    split_table = op.freqs_layout == "split"  # cosines, then sines
    if split_table:
        in_pj_order(freqs)

    t, *head, j, p = sch.get_loops(store)
    j_lane, j_elem = sch.split(j, [lanes, None])
    sch.reorder(j_lane, j_elem, p)
    elem = sch.fuse(j_elem, p)
    in_norm_group = prefix == "k" and config.k_rope_in_norm_group
    tiles_heads = not in_norm_group and heads * lanes >= threads
    if in_norm_group:  # the norm's chunks of rows, a row's lanes on its first threads
        blk, item, ty = sch.split(t, [None, config.norm_rows_per_thread,
                                      config.norm_rows_per_block])
        lane_round, tx = sch.split(j_lane, [None, config.norm_threads_per_row])
        sch.reorder(blk, ty, tx, lane_round, item, elem)
    else:
        if tiles_heads:  # blocks tile a token's heads; no more items than fill a block
            items = min(items, heads * lanes // threads)
            # a thread's heads are adjacent, so that their loads cover one region of the row
            blk_part, head_part, item = sch.split(head[0], [None, threads // lanes, items])
            blk = sch.fuse(t, blk_part)
            sch.reorder(head_part, j_lane, item)
            thread = sch.fuse(head_part, j_lane)
        else:  # a block takes whole tokens
            blk, item, tok_part = sch.split(t, [None, items, threads // (heads * lanes)])
            thread = sch.fuse(tok_part, *head, j_lane)
        ty, tx = sch.split(thread, [None, config.norm_threads_per_row])
        sch.reorder(blk, ty, tx, item, elem)
    strides = bind_grid(sch, blk, config.grid_blocks, [ty, tx])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    if op.interleaved:
        if vector == elems:
            sch.vectorize(elem)
    else:  # elem = (j, p): put p outside so each vector runs along j, contiguous in memory
        j_vec, p = sch.split(elem, [None, 2])
        sch.reorder(p, j_vec)
        sch.vectorize(j_vec)
        sch.unroll(p)  # the registers it indexes stay registers (nvcc may keep the loop)

    # a thread's items are heads of one token (one locate and freqs row for all, and every
    # head's loads before the first rotation: that many vectors in flight) or tokens (each
    # with its own locate, at the item loop); with one item, everything stays at the item
    # loop, where the q loads come first (in a persistent grid, at each chunk's iteration)
    per_token = item
    if tiles_heads and items > 1:
        per_token = tx if strides is None else strides
    for stage in computed:
        sch.compute_at(stage, item)
    sch.compute_at(load, per_token)
    sch.compute_at(freqs, per_token)
    if quant is not None:  # the scale the quantization divides by, first
        scale_early(sch, quant, f"{prefix}_scale", per_token, index=0)
    # each stage goes right before its first consumer, so the row's load, which needs no
    # index value, is issued before the locate; with the index reads before PDL's wait, the
    # locate comes first
    sch.compute_at(locate, per_token, index=0 if op.pdl_early_indices else -1)
    if config.unroll:
        for stage in computed:
            for loop in loops_under(sch, stage, item):
                sch.unroll(loop)
    # a lane's elems/2 pairs read elems adjacent table entries, or two runs of elems/2
    vectorize_tail(sch, freqs, per_token, config.vector_elems(
        op, op.freqs_dtype, elems // 2 if split_table else elems), pairs_first=not split_table)
    vectorize_tail(sch, load, per_token, vector, pairs_first=op.interleaved)
    set_local(sch, locate, freqs, load, *computed)
