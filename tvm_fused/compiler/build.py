"""Building the fused op: definition -> schedule -> TIR pipeline -> runtime module.

``build`` compiles one configuration for one target. The CUDA path applies the block-group
schedule and lowers through the ``tvm_fused`` pipeline (which merges the branch launches);
the ``llvm`` path applies the CPU schedule of the same PrimFunc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os

import tvm

from ..schedules import ScheduleConfig, default_schedule_config, schedule_fused_rope_rmsnorm
from ..schedules.cpu import CpuScheduleConfig, apply_cpu_schedule
from . import pipeline
from .config import OpConfig
from .definition import OP_NAME, fused_rope_rmsnorm_func
from .vector_stores import whole_vector_stores

CPU_TARGET = "llvm"
DEFAULT_CUDA_TARGET = "nvidia/nvidia-h100"


def cuda_target(arch: str | None = None) -> tvm.target.Target:
    """A CUDA target with the limits MetaSchedule and the schedules need.

    ``arch`` is an ``sm_XX`` string; None gives the H100 tag (``sm_90a``). Other archs take
    the H100's limits (every NVIDIA GPU since Volta allows 1024 threads and 48 KiB of static
    shared memory per block).
    """
    base = tvm.target.Target(DEFAULT_CUDA_TARGET)
    if arch is None or arch == base.attrs["arch"]:
        return base
    config = {key: base.attrs[key] for key in base.attrs}
    config.update(kind="cuda", arch=arch)
    return tvm.target.Target(config)


def device_target(device) -> tvm.target.Target:
    """The target of a torch device: ``llvm`` for the CPU, else its GPU's arch (``sm_90a``
    for Hopper and later, whose arch-specific features need the suffix)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return tvm.target.Target(CPU_TARGET)
    major, minor = torch.cuda.get_device_capability(device)
    return cuda_target(f"sm_{major}{minor}{'a' if major >= 9 else ''}")


def as_target(target: str | tvm.target.Target) -> tvm.target.Target:
    """``target`` as a Target: ``"cuda"`` means the default CUDA target."""
    if isinstance(target, tvm.target.Target):
        return target
    return cuda_target() if target == "cuda" else tvm.target.Target(target)


# TVM compiles CUDA with --use_fast_math, whose -ftz=true flushes float32 subnormals to zero:
# a bf16 subnormal input then comes out as a zero of either sign where the spec computes in
# IEEE float32 (seen on an H200: the fp8 cache's edge values off in the sign of zero). TVM
# 0.27's switches below compile our kernels with IEEE float32 instead (subnormals kept, exact
# division and square root; rsqrt stays the hardware's): 87 FTZ instructions of the default
# kernel become plain ones, 8 instructions more in all (sm_90a SASS).
IEEE_FLOAT32_ENV = {
    "TVM_CUDA_NVCC_NO_FAST_MATH": "1",
    "TVM_CUDA_NVRTC_EXTRA_OPTS": "--ftz=false --prec-div=true --prec-sqrt=true",
}


@contextlib.contextmanager
def ieee_float32():
    """Within: TVM compiles CUDA without fast math (``IEEE_FLOAT32_ENV``)."""
    saved = {name: os.environ.get(name) for name in IEEE_FLOAT32_ENV}
    os.environ.update(IEEE_FLOAT32_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _use_nvcc_without_nvrtc() -> None:
    """TVM compiles CUDA with NVRTC unless told otherwise, which needs cuda-bindings."""
    spec = importlib.util.find_spec
    if spec("cuda") is None or spec("cuda.bindings") is None:
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


def scheduled_module(op: OpConfig, target: tvm.target.Target,
                     schedule: ScheduleConfig | CpuScheduleConfig | None = None) -> tvm.IRModule:
    """The IRModule to compile for ``target``: the block-group schedule for CUDA, the CPU
    schedule for ``llvm``."""
    if target.kind.name == "cuda":
        return schedule_fused_rope_rmsnorm(op, schedule or default_schedule_config(target, op))
    if target.kind.name != "llvm":
        raise ValueError(f"unsupported target kind {target.kind.name!r}: use cuda or llvm")
    # a programmatic dependent launch is a GPU launch's property: the CPU runs one body
    cpu_op = dataclasses.replace(op, pdl=False, pdl_early_indices=False)
    sch = tvm.s_tir.Schedule(tvm.IRModule({OP_NAME: fused_rope_rmsnorm_func(cpu_op)}))
    sch.work_on(OP_NAME)
    apply_cpu_schedule(sch, cpu_op, schedule or CpuScheduleConfig())
    return sch.mod


def build(op: OpConfig, target: str | tvm.target.Target = CPU_TARGET,
          schedule: ScheduleConfig | CpuScheduleConfig | None = None
          ) -> tvm.runtime.Executable:
    """Compile the fused op for ``target``.

    Returns the executable; ``executable[OP_NAME]`` is the kernel, called with the arguments
    of ``definition.fused_rope_rmsnorm_func`` in order (torch tensors pass through DLPack).
    ``schedule`` overrides the target's default schedule (a ``ScheduleConfig`` for CUDA, a
    ``CpuScheduleConfig`` for ``llvm``).
    """
    target = as_target(target)
    return compile_module(scheduled_module(op, target, schedule), target)


def compile_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """``tvm.compile`` of a scheduled module as every kernel of tvm-fused is compiled (the
    runtime's and the tuner's): the ``tvm_fused`` pipeline, IEEE float32, and for CUDA whole
    16-byte stores (``vector_stores``)."""
    if target.kind.name != "cuda":
        with target:
            return tvm.compile(mod, target=target, tir_pipeline=pipeline.PIPELINE_NAME)
    _use_nvcc_without_nvrtc()
    with target, ieee_float32(), whole_vector_stores():
        return tvm.compile(mod, target=target, tir_pipeline=pipeline.PIPELINE_NAME)


def cuda_source(op: OpConfig, target: str | tvm.target.Target = "cuda",
                schedule: ScheduleConfig | None = None) -> str:
    """The CUDA C++ source of the fused kernel (needs no GPU)."""
    target = as_target(target)
    if target.kind.name != "cuda":
        raise ValueError("cuda_source needs a CUDA target")
    return build(op, target, schedule).mod.imports[0].inspect_source()
