"""Float32 arithmetic whose rounding is the same on every target: ``quantizer_div`` and
``round_to``.

Two of TVM's defaults blur roundings that the spec fixes and the tests check bit for bit:

- TVM compiles CUDA with ``--use_fast_math`` by default, under which ``a / b`` is an
  approximation (up to two ulps off). ``build`` turns fast math off for our kernels
  (``build.ieee_float32``), and ``quantizer_div(a, b)``, the division of every fp8
  quantization, keeps it exact whatever the flags: on CUDA a branch-free sequence of fused
  multiply-adds (``_cuda_quantizer_div``) in place of ``__fdiv_rn``, whose check for operands
  out of its fast path's range is a branch per value (a decode's quantization of a row then
  runs its divisions one after another), and a plain division elsewhere (LLVM divides
  exactly).
- On the CPU, ``BF16ComputeLegalize`` computes bfloat16 in float32 and drops the roundings
  in between (a cast to bfloat16 and back, or a bfloat16 register, keeps float32 bits).
  ``round_to(dtype, x)`` rounds to ``dtype``'s grid and back to float32 on every target:
  a cast pair on CUDA, which rounds natively, the rounding on the bits elsewhere. The
  RMSNorm's rounding to gamma's dtype and the fp8 cache's rounding to q's dtype use it.

Each is an intrinsic of its own, lowered per target by TVM's ``LowerIntrin`` (after the
legalization passes, and after ``RewriteUnsafeSelect``: the selects of a lowering stay
selects).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm.script import tirx as T
from tvm.tirx.op import register_intrin_lowering

QUANTIZER_DIV = "tirx.tvm_fused_quantizer_div"
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


def _f32(value: float):
    return tvm.tirx.const(value, "float32")


def _extern(name: str, *args):
    return tvm.tirx.call_pure_extern("float32", name, *args)


def _cuda_quantizer_div(call):
    """``a / b`` (b positive and finite) without a branch, correctly rounded wherever the
    quotient is normal: ``b = m * 2^E`` with ``m`` in [1, 2) (a tiny ``b`` first scaled by
    2^64, ``a`` with it), ``q = RN(a / m)`` by Markstein's theorem (from ``y = RN(1 / m)`` and a
    quotient within an ulp, one fused residual and correction give the rounded quotient; the
    first correction brings ``a * y``, within 1.5 ulps, within one), then ``q * 2^-E``, exact.
    An ``a`` below 2^-100 is scaled by 2^64 first (its residuals would underflow), and the
    quotient's scale back by 2^-64 may round it, but only below 2^-126, where every fp8
    value is a zero of its sign and the FLT_MIN floor of a tile scale wins. ``a`` zero,
    infinite or NaN gives ``a * y`` itself. The terms of ``b`` alone are the same in every
    division by ``b``, which nvcc computes once."""
    a, b = call.args
    u32 = lambda value: tvm.tirx.const(value, "uint32")  # noqa: E731
    tiny_b, tiny_a = (tvm.tirx.Var(name, "bool") for name in ("tiny_b", "tiny_a"))
    bits, exponent = (tvm.tirx.Var(name, "uint32") for name in ("b_bits", "b_exponent"))
    m, y, power, x, q0, q1, q2 = (tvm.tirx.Var(name, "float32") for name in (
        "b_significand", "b_reciprocal", "b_power", "scaled_a", "q0", "q1", "q2"))
    residual = lambda q: _extern("__fmaf_rn", -m, q, x)  # noqa: E731  exact: x - m * q
    bound = [
        (tiny_b, b < _f32(2.0**-64)),
        (bits, T.reinterpret("uint32", b * T.Select(tiny_b, _f32(2.0**64), _f32(1.0)))),
        (exponent, bits >> u32(23)),
        (m, T.reinterpret("float32", bits - ((exponent - u32(127)) << u32(23)))),
        (y, _extern("__frcp_rn", m)),
        (power, T.reinterpret("float32", (u32(255) - exponent) << u32(23)) * _f32(0.5)),
        (tiny_a, T.fabs(a) < T.Select(tiny_b, _f32(0.0), _f32(2.0**-100))),
        (x, a * T.Select(tiny_b | tiny_a, _f32(2.0**64), _f32(1.0))),
        (q0, _extern("__fmul_rn", x, y)),
        (q1, _extern("__fmaf_rn", residual(q0), y, q0)),
        (q2, _extern("__fmaf_rn", residual(q1), y, q1)),
    ]
    regular = (_f32(0.0) < T.fabs(q0)) & (T.fabs(q0) < _f32(float("inf")))
    result = T.Select(regular, q2, q0) * T.Select(tiny_a, power * _f32(2.0**-64), power)
    for var, value in reversed(bound):
        result = tvm.tirx.Let(var, value, result)
    return result


# name -> (operands, lowering per target)
_INTRINSICS = {
    QUANTIZER_DIV: (2, {
        "cuda": _cuda_quantizer_div,
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


def quantizer_div(a, b):
    """``a / b`` in float32 (both operands float32 expressions, ``b`` positive and finite),
    correctly rounded wherever the quotient is at least 2^-126 (FLT_MIN) in magnitude, else
    of ``a``'s sign and below 2^-126: the same fp8 value either way, and the same tile scale
    after its FLT_MIN floor."""
    return tvm.tirx.call_intrin("float32", QUANTIZER_DIV, a, b)


def round_to(dtype: str, x):
    """``x`` (float32) rounded to the nearest ``dtype`` value, as float32."""
    if dtype == "bfloat16":
        return tvm.tirx.call_intrin("float32", ROUND_BF16, x)
    if dtype == "float32":
        return x
    return T.Cast("float32", T.Cast(dtype, x))
