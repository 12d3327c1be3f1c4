"""The kernels of a form: its definition scheduled for a target (``schedules/``), compiled
(``compiler/build.py``) and kept on disk (``compiler/kernel_cache.py``).

This is where the compiler and the schedules meet: the compiler never imports the schedules,
it takes the scheduled module; the kernel cache's digest covers the sources of both.
"""

from __future__ import annotations

from pathlib import Path

import tvm

from . import form as form_module
from . import schedules
from .compiler import kernel_cache
from .compiler.build import CPU_TARGET, as_target, kernel_source
from .compiler.build import build as compile_module
from .compiler.definition import OP_NAME
from .form import Form


def shaping_sources() -> tuple[Path, ...]:
    """The Python files whose code shapes a kernel: the form, the compiler (but its disk
    cache) and the schedules."""
    compiler = Path(kernel_cache.__file__).parent
    return (Path(form_module.__file__),
            *sorted(p for p in compiler.glob("*.py") if p.name != "kernel_cache.py"),
            *sorted(Path(schedules.__file__).parent.glob("*.py")))


FP8_MIN_ARCH = 89  # the first arch with fp8 conversions (Ada); TVM emits none before it


def check_target(form: Form, target: tvm.target.Target) -> None:
    """ValueError if ``target`` cannot run ``form``: fp8 values (a cache, the query or the
    fp8_ds_mla row) on a GPU older than ``sm_89``."""
    if target.kind.name != "cuda" or not (form.cache_dtype or form.ds_mla or form.out_dtype):
        return
    arch = str(target.attrs["arch"])
    if int(arch[3:].rstrip("a")) < FP8_MIN_ARCH:
        raise ValueError(f"fp8 caches and queries need sm_{FP8_MIN_ARCH} or newer (Ada, "
                         f"Hopper, Blackwell): TVM's CUDA code generation has no fp8 "
                         f"conversion for {arch}")


def build(form: Form, target: str | tvm.target.Target = CPU_TARGET,
          schedule=None) -> tvm.runtime.Module:
    """Compile ``form`` for ``target`` (``schedule``: a ``ScheduleConfig`` for CUDA, a
    ``CpuScheduleConfig`` for ``llvm``; None: the target's default). ``module[OP_NAME]`` is
    the kernel, called with the arguments of ``fused_rope_rmsnorm_func(form)`` in order
    (torch tensors pass through DLPack)."""
    target = as_target(target)
    check_target(form, target)
    config = schedule or schedules.default_config(form, target)
    return compile_module(schedules.scheduled_module(form, target, config), target)


def cuda_source(form: Form, target: str | tvm.target.Target = "cuda", schedule=None) -> str:
    """The CUDA C++ source of ``form``'s kernel (needs no GPU)."""
    target = as_target(target)
    if target.kind.name != "cuda":
        raise ValueError("cuda_source needs a CUDA target")
    check_target(form, target)
    config = schedule or schedules.default_config(form, target)
    return kernel_source(schedules.scheduled_module(form, target, config), target)


def kernel(form: Form, target: tvm.target.Target, schedule):
    """The callable kernel of ``form`` on ``target`` with the schedule config ``schedule``:
    from the disk cache, else built."""
    check_target(form, target)
    return kernel_cache.load_or_build(
        OP_NAME, kernel_cache.kernel_key(form, schedule, target),
        kernel_cache.source_digest(shaping_sources()),
        lambda: compile_module(schedules.scheduled_module(form, target, schedule), target))
