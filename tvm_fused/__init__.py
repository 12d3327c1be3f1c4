"""tvm-fused: DeepSeek-style MLA RoPE + RMSNorm prologue as one TensorIR kernel.

The rooms of the package:

- library: ``api`` (the torch entry points: ``fused_rope_rmsnorm``, tokens addressed by
  request offsets and a page table, and ``fused_rope_rmsnorm_slots``, by positions and a slot
  mapping as vLLM and SGLang address them), ``torch_op`` (the op as
  torch custom ops), ``arguments`` (argument checks);
- compiler: ``compiler`` (the TensorIR definition, our passes and pipeline, build, kernel
  cache) and ``schedules`` (the GPU and CPU schedules and their design spaces);
- tuning (offline): ``tuning`` (MetaSchedule tasks, records, decisions);
- testing: ``testing`` (the float64 reference, random realistic inputs, result checks, the
  fuzzer).

Names load on first use, so importing the package (or ``python -m tvm_fused --help``) does
not load torch or TVM.
"""

import importlib

_EXPORTS = {
    "fused_rope_rmsnorm": ".api",
    "fused_rope_rmsnorm_slots": ".api",
    "build": ".kernels",
    "cuda_source": ".kernels",
    "cuda_target": ".compiler.build",
    "Form": ".form",
    "prepare": ".dispatch",
    "OP_NAME": ".compiler.definition",
    "fused_rope_rmsnorm_func": ".compiler.definition",
    "fused_rope_rmsnorm_reference": ".testing.reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import an export's module on first use, and keep the export as a module attribute
    (later lookups, every ``tvm_fused.fused_rope_rmsnorm(...)`` call, skip this hook)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    return value
