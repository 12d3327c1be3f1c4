"""Compiling a scheduled module: lowering (``pipeline.py``), then the host code by TVM's LLVM
codegen and, for a GPU target, the kernel by ``cuda.py`` (TVM's CUDA codegen, nvcc, TVM's
CUDA module), imported by the host module.

``build`` takes a module already scheduled for its target (``schedules/`` for the op; a
MetaSchedule candidate when tuning) and leaves no trace outside what it returns: no
environment variable, TVM attribute or global function is set on the way.
"""

from __future__ import annotations

import tvm
from tvm.tirx.build import codegen_build

from . import cuda
from .pipeline import lower

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


def build(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Module:
    """The runtime module of ``mod`` (scheduled for ``target``): its packed functions take
    torch tensors through DLPack."""
    host, device = lower(mod, target)
    host_module = codegen_build(host, tvm.target.Target(CPU_TARGET))
    if device is not None:
        source = cuda.kernel_source(device)
        fatbin = cuda.compile_fatbin(source, str(target.attrs["arch"]))
        host_module.import_module(cuda.device_module(device, source, fatbin))
    return host_module


def kernel_source(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    """The CUDA source of ``mod`` (scheduled for the CUDA ``target``); needs no GPU."""
    if target.kind.name != "cuda":
        raise ValueError(f"a CUDA source needs a CUDA target, got {target.kind.name}")
    return cuda.kernel_source(lower(mod, target)[1])
