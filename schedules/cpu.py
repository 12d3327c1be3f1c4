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

from tvm_fused.form import Form


def branch_stages(op: Form) -> dict[str, tuple[str, ...]]:
    """The stages each branch computes per token before its store, in order."""
    quant = ("quant",) if op.cache_dtype is not None else ()
    return {
        "q": ("locate", "freqs", "load", "rope"),
        "k": ("locate", "freqs", "load", "rope", *quant),
        "norm": ("locate", "load", "sumsq", "scale", "apply", *quant),
    }



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
        chunk, token = sch.split(sch.get_loops(store)[0], [None, config.tokens_per_task])
        if config.parallel:
            sch.parallel(chunk)
        for stage in reversed(stages):
            sch.compute_at(sch.get_sblock(f"{prefix}_{stage}"), token)
    (token,) = sch.get_loops(sch.get_sblock("count_errors"))
    sch.compute_at(sch.get_sblock("count_locate"), token)
