"""From a lowered device module to a loadable CUDA module: source, nvcc, TVM's module factory.

- ``kernel_source``: TVM's CUDA codegen (in a worker process, ``codegen_worker.py``), then
  whole 16-byte stores (``vector_stores.py``);
- ``compile_fatbin``: nvcc with the flags below, for one GPU architecture;
- ``device_module``: the CUDA runtime module of that binary (TVM's ``ffi.Module.create.cuda``,
  with the function table TVM's codegen would give it), which a host module imports.

Flags: TVM's own nvcc flags, but without ``--use_fast_math``, whose ``-ftz=true`` flushes
float32 subnormals to zero: a bf16 subnormal input would come out as a zero of either sign
where the spec computes in IEEE float32 (seen on an H200: fp8 cache edge values off in the
sign of zero). Without it, division and square root are IEEE too; ``rsqrt`` stays the
hardware's (87 FTZ instructions of the default kernel become plain ones, 8 instructions more
in all, sm_90a SASS).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir import PointerType

from . import codegen_worker
from .vector_stores import rewrite_vector_stores

NVCC_FLAGS = (
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda",
    "--ptxas-options=--register-usage-level=10,--warn-on-local-memory-usage",
)
_CREATE = "ffi.Module.create.cuda"


def kernel_source(device: tvm.IRModule) -> str:
    """The CUDA source of a lowered device module, its 16-byte stores whole."""
    return rewrite_vector_stores(codegen_worker.generate(device))


def nvcc_command(arch: str, output: str, source: str, kind: str = "fatbin") -> list[str]:
    """The nvcc command that compiles ``source`` (a path) to ``output`` for ``arch``
    (``sm_90a``), as a ``kind`` (``fatbin``, ``cubin`` or ``ptx``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("tvm_fused builds CUDA kernels with nvcc, which is not on PATH")
    version = arch.removeprefix("sm_")
    return [nvcc, f"--{kind}", "-gencode", f"arch=compute_{version},code=sm_{version}",
            *NVCC_FLAGS, "-o", output, source]


def compile_fatbin(source: str, arch: str) -> bytes:
    """``source`` compiled for ``arch`` by nvcc (``NVCC_FLAGS``)."""
    with tempfile.TemporaryDirectory(prefix="tvm_fused_nvcc_") as tmp:
        path = Path(tmp)
        (path / "kernel.cu").write_text(source)
        result = subprocess.run(nvcc_command(arch, str(path / "kernel.fatbin"),
                                             str(path / "kernel.cu")),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{result.stdout}{result.stderr}")
        return (path / "kernel.fatbin").read_bytes()


def function_info(device: tvm.IRModule):
    """The function table of a device module's kernels, as TVM's codegen makes it: argument
    types (``handle`` for pointers) and launch parameter tags, by global symbol."""
    kernels = {}
    for func in device.functions.values():
        name = str(func.attrs["global_symbol"])
        kernels[name] = {
            "name": name,
            "arg_types": ["handle" if isinstance(p.ty, PointerType) else str(p.ty.dtype)
                          for p in func.params],
            "launch_param_tags": [str(tag) for tag in func.attrs["tirx.kernel_launch_params"]],
            "arg_extra_tags": [0] * len(func.params),
        }
    metadata = json.dumps({"tvm_version": tvm.__version__, "func_info": kernels})
    return tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")(metadata)


def device_module(device: tvm.IRModule, source: str, fatbin: bytes) -> tvm.runtime.Module:
    """The CUDA runtime module of ``fatbin`` (compiled from ``source``, the code of
    ``device``)."""
    create = tvm_ffi.get_global_func(_CREATE, allow_missing=True)
    if create is None:
        raise RuntimeError("loading a CUDA kernel needs TVM's CUDA runtime, which needs the "
                           "NVIDIA driver (libcuda); without a GPU, tvm_fused.cuda_source "
                           "gives the source")
    return create(fatbin, "fatbin", function_info(device), {"cuda": source})
