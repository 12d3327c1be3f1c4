"""The op's definition scheduled for a target: the block-group schedule (``fused.py``) for
CUDA, the CPU schedule (``cpu.py``) for ``llvm``."""

from __future__ import annotations

import dataclasses

import tvm
from tvm import s_tir

from tvm_fused.compiler.definition import OP_NAME, fused_rope_rmsnorm_func
from tvm_fused.form import Form

from .config import ScheduleConfig, default_schedule_config
from .cpu import CpuScheduleConfig, apply_cpu_schedule
from .fused import apply_block_group_schedule


def default_config(form: Form, target: tvm.target.Target, tokens: int | None = None):
    """The hand-written schedule config of ``form`` on ``target`` for calls of about
    ``tokens`` tokens (None: any count)."""
    if target.kind.name == "cuda":
        return default_schedule_config(target, form, tokens)
    if target.kind.name == "llvm":
        return CpuScheduleConfig()
    raise ValueError(f"unsupported target kind {target.kind.name!r}: use cuda or llvm")


def scheduled_module(form: Form, target: tvm.target.Target,
                     config: ScheduleConfig | CpuScheduleConfig) -> tvm.IRModule:
    """``fused_rope_rmsnorm_func(form)`` with ``config`` applied for ``target``."""
    if target.kind.name == "llvm":  # a programmatic dependent launch is a GPU launch's
        form = dataclasses.replace(form, pdl=False, pdl_early_indices=False)
    sch = s_tir.Schedule(tvm.IRModule({OP_NAME: fused_rope_rmsnorm_func(form)}))
    sch.work_on(OP_NAME)
    if target.kind.name == "cuda":
        apply_block_group_schedule(sch, form, config)
    else:
        apply_cpu_schedule(sch, form, config)
    return sch.mod
