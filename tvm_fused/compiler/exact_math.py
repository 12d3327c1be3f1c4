"""Float32 arithmetic whose rounding is the same on every target: ``div_rn`` and ``round_to``.

Two of TVM's defaults blur roundings that the spec fixes and the tests check bit for bit:

- TVM compiles CUDA with ``--use_fast_math`` by default, under which ``a / b`` is an
  approximation (up to two ulps off). ``build`` turns fast math off for our kernels
  (``build.ieee_float32``), and ``div_rn(a, b)`` keeps the division exact whatever the
  flags: it lowers to CUDA's ``__fdiv_rn`` and to a plain division elsewhere (LLVM divides
  exactly). The fp8 cache divides by ``k_scale`` with it.
- On the CPU, ``BF16ComputeLegalize`` computes bfloat16 in float32 and drops the roundings
  in between (a cast to bfloat16 and back, or a bfloat16 register, keeps float32 bits).
  ``round_to(dtype, x)`` rounds to ``dtype``'s grid and back to float32 on every target:
  a cast pair on CUDA, which rounds natively, the rounding on the bits elsewhere. The
  RMSNorm's rounding to gamma's dtype and the fp8 cache's rounding to q's dtype use it.

Each is an intrinsic of its own, lowered per target by TVM's ``LowerIntrin`` (after the
legalization passes).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm.script import tirx as T
from tvm.tirx.op import register_intrin_lowering

DIV_RN = "tirx.tvm_fused_div_rn"
ROUND_BF16 = "tirx.tvm_fused_round_bf16"


def _round_bf16_bits(x):
    """``x`` (float32) rounded to the nearest even bfloat16, as float32, on its bits."""
    bits = T.reinterpret("uint32", x)
    rounded = (bits + T.uint32(0x7FFF) + ((bits >> T.uint32(16)) & T.uint32(1))) & T.uint32(
        0xFFFF0000)
    return T.Select(T.isnan(x), x, T.reinterpret("float32", rounded))


def _cuda_round_bf16(x):
    """On CUDA, where a bfloat16 register holds bfloat16 bits: ``x`` itself when it is a
    bfloat16 value widened (already on the grid; nvcc keeps a cast pair), else a cast pair."""
    if isinstance(x, tvm.tirx.Cast) and str(x.value.ty) == "bfloat16":
        return x
    return T.Cast("float32", T.Cast("bfloat16", x))


# name -> (operands, lowering per target)
_INTRINSICS = {
    DIV_RN: (2, {
        "cuda": lambda call: tvm.tirx.call_pure_extern("float32", "__fdiv_rn", *call.args),
        "default": lambda call: call.args[0] / call.args[1],
    }),
    ROUND_BF16: (1, {
        "cuda": lambda call: _cuda_round_bf16(call.args[0]),
        "default": lambda call: _round_bf16_bits(call.args[0]),
    }),
}


def register_intrinsics(intrinsics: dict, vectorizable: bool = False) -> None:
    """Register each pure intrinsic of ``intrinsics`` (name -> (operands, lowering per
    target)) once; ``vectorizable``: a vectorized loop calls it on vector operands (its
    lowerings take them)."""
    for name, (operands, lowerings) in intrinsics.items():
        if name in tvm.ir.Op.list_op_names():
            continue
        tvm_ffi.get_global_func("ir.RegisterOp")(name, "")
        op = tvm.ir.Op.get(name)
        op.set_num_inputs(operands)
        op.set_attr("TCallEffectKind", tvm.tirx.CallEffectKind.Pure.value)
        op.set_attr("TScriptPrinterName", name.removeprefix("tirx."))
        if vectorizable:
            op.set_attr("TVectorizable", True)
        for target, lower in lowerings.items():
            register_intrin_lowering(name, target, f=lower)


register_intrinsics(_INTRINSICS)


def div_rn(a, b):
    """``a / b`` in float32, correctly rounded (both operands float32 expressions)."""
    return tvm.tirx.call_intrin("float32", DIV_RN, a, b)


def round_to(dtype: str, x):
    """``x`` (float32) rounded to the nearest ``dtype`` value, as float32."""
    if dtype == "bfloat16":
        return tvm.tirx.call_intrin("float32", ROUND_BF16, x)
    if dtype == "float32":
        return x
    return T.Cast("float32", T.Cast(dtype, x))
