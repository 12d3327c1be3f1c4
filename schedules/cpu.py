"""The CPU schedule of the same PrimFunc (``llvm`` target): each branch's stages are
computed per token, and chunks of tokens run as parallel tasks.

    for chunk in parallel(ceil(n / tokens_per_task)):        (or serial)
      for t in chunk:
        q: locate, freqs, load, rope, store of token t       (per-token buffers)
    ... the same for the k and norm branches
    for t in range(n):                                       (serial: the count is a plain add)
      count: locate token t; errors[0] += 1 if it is an ERROR
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir

from tvm_fused.compiler.branches import nope_staged
from tvm_fused.form import Form

from .util import merge_scale_store


def branch_stages(op: Form) -> dict[str, tuple[str, ...]]:
    """The stages each branch of ``op`` computes per token before its store, in order."""
    quant = ("quant",) if op.cache_dtype is not None else ()
    tiles = ("tile_share", "tile_amax", "tile_scale", "quant") if op.ds_mla else ()
    q_quant = ("quant",) if op.out_dtype is not None else ()
    rope = {"q": ("locate", "freqs", "load", "rope", *q_quant),
            "k": ("locate", "freqs", "load", "rope", *quant)} if op.rope_dim else {}
    nope_load = ("load",) if nope_staged(op) else ()
    nope = {"nope": ("locate", *nope_load, *q_quant)} if op.q_nope else {}
    return {**rope, **nope,
            "norm": ("locate", "load", "sumsq", "scale", "apply", *quant, *tiles)}


@dataclass(frozen=True)
class CpuScheduleConfig:
    """Knobs of the CPU schedule: tokens per parallel task, and whether tasks run in
    parallel."""

    tokens_per_task: int = 4
    parallel: bool = True


def apply_cpu_schedule(sch: s_tir.Schedule, op: Form, config: CpuScheduleConfig) -> None:
    """Apply ``config`` to a schedule of ``fused_rope_rmsnorm_func(op)`` in place."""
    for prefix, stages in branch_stages(op).items():
        store = sch.get_sblock(f"{prefix}_store")
        if prefix == "norm" and op.ds_mla:  # the row's scales, in the same token loop
            merge_scale_store(sch)
        chunk, token = sch.split(sch.get_loops(store)[0], [None, config.tokens_per_task])
        if config.parallel:
            sch.parallel(chunk)
        for stage in reversed(stages):
            sch.compute_at(sch.get_sblock(f"{prefix}_{stage}"), token)
    (token,) = sch.get_loops(sch.get_sblock("count_errors"))
    sch.compute_at(sch.get_sblock("count_locate"), token)
