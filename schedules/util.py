"""Small schedule helpers shared by the branch schedules."""

from __future__ import annotations

from tvm import s_tir


def loops_under(sch: s_tir.Schedule, block: s_tir.SBlockRV, loop: s_tir.LoopRV) -> list:
    """The loops around ``block`` nested inside ``loop`` (those a compute-at created)."""
    loops = sch.get_loops(block)
    target = sch.get(loop)
    index = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(target))
    return loops[index + 1:]


def vectorize_tail(sch: s_tir.Schedule, block: s_tir.SBlockRV, at: s_tir.LoopRV, vector: int,
                   pairs_first: bool = True) -> None:
    """Fuse the loops a compute-at placed around a rope copy ``block`` (inside ``at``) and
    vectorize by ``vector``.

    The copy's last two loops are (pair j, element p). Memory runs along (j, p) when pairs are
    adjacent (``pairs_first``) and along j alone when they sit half a row apart (NeoX): then p
    goes outside so each vector is contiguous.
    """
    if vector == 1:
        return
    loops = loops_under(sch, block, at)
    if not pairs_first:
        *outer, j, p = loops
        sch.reorder(*outer, p, j)
        loops = [*outer, p, j]
    _, inner = sch.split(sch.fuse(*loops), [None, vector])
    sch.vectorize(inner)


def bind_grid(sch: s_tir.Schedule, blk: s_tir.LoopRV, grid_blocks: int,
              thread_loops: list) -> s_tir.LoopRV | None:
    """Bind a branch's chunk loop ``blk`` to ``blockIdx.x``: one block per chunk
    (``grid_blocks`` 0), or ``grid_blocks`` blocks, block ``b`` taking chunks ``b, b +
    grid_blocks, ...`` in a serial loop placed right inside ``thread_loops`` (the loops that
    follow ``blk``, to be bound to threads). Returns that serial loop (None without it)."""
    if not grid_blocks:
        sch.bind(blk, "blockIdx.x")
        return None
    strides, block = sch.split(blk, [None, grid_blocks])
    sch.reorder(block, *thread_loops, strides)
    sch.bind(block, "blockIdx.x")
    return strides


def set_local(sch: s_tir.Schedule, *blocks: s_tir.SBlockRV) -> None:
    """Keep every buffer the given blocks write in registers."""
    for block in blocks:
        for index in range(len(sch.get(block).writes)):
            sch.set_scope(block, index, "local")


def scale_early(sch: s_tir.Schedule, consumer: s_tir.SBlockRV, name: str, loop: s_tir.LoopRV,
                index: int) -> None:
    """The one-element float32 scale ``name`` (``k_scale``, ``q_scale``) that ``consumer``
    divides by, read once into a register at ``loop`` (at ``index`` in its body) instead of
    beside each value, where nvcc leaves the load after the row's loads and reduction: a
    load round of its own before the first store."""
    scale = sch.cache_read(consumer, name, "local", consumer_blocks=[consumer])
    sch.compute_at(scale, loop, index=index)


def merge_scale_store(sch: s_tir.Schedule) -> None:
    """fp8_ds_mla: put the store of a row's tile scales (``norm_scale_store``) in the token
    loop of the store of its values (``norm_store``), so that every stage of the norm branch
    can be computed per token."""
    sch.merge(sch.get_loops(sch.get_sblock("norm_store"))[0],
              sch.get_loops(sch.get_sblock("norm_scale_store"))[0])
