"""Saturating float32 -> fp8 conversion, exact on every target: ``saturating_fp8``.

``saturating_fp8(dtype, x)`` is ``dtype(clamp(x, -max, max))``, rounded to nearest even, NaN
kept NaN, -0 kept -0: what CUDA's ``__nv_cvt_float_to_fp8(x, __NV_SATFINITE, ...)`` and
torch's ``x.clamp(-max, max).to(dtype)`` compute. It is an intrinsic lowered per target by
TVM's ``LowerIntrin``: on CUDA to TVM's fp8 cast, whose ``__nv_fp8_*`` constructors convert
with ``__NV_SATFINITE`` (one ``cvt.rn.satfinite`` instruction from sm_89 on); elsewhere to
integer arithmetic on the float32 bits, because TVM's ``llvm`` fp8 casts neither saturate
nor round subnormals and NaN right, and the CPU build is what CI checks bit for bit. Either
lowering takes vector operands (a vectorized loop may call it).
"""

from __future__ import annotations

import dataclasses
import struct

import tvm
from tvm.script import tirx as T

from .exact_math import register_intrinsics


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """An fp8 format: mantissa bits, exponent bias and largest finite value."""

    mantissa: int
    bias: int
    max: float


FP8_FORMATS = {
    "float8_e4m3fn": Fp8Format(mantissa=3, bias=7, max=448.0),
    "float8_e5m2": Fp8Format(mantissa=2, bias=15, max=57344.0),
}
_NAN = 0x7F  # exponent and mantissa all ones: NaN in both formats
_F32_ABS, _F32_INF, _F32_HIDDEN, _F32_MANTISSA = 0x7FFFFFFF, 0x7F800000, 0x800000, 0x7FFFFF


def _float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _integer_lowering(fmt: Fp8Format):
    """The lowering of a call on float32 ``x`` (any lanes) to integer arithmetic on its
    bits; each intermediate is bound once (a ``Let``), as ``x`` would otherwise be
    evaluated a dozen times."""

    def lower(call):
        (x,) = call.args
        lanes = x.ty.dtype.lanes
        u32 = tvm.DataType("uint32").with_lanes(lanes)

        def u(value: int):
            const = tvm.tirx.const(value, "uint32")
            return tvm.tirx.Broadcast(const, lanes) if lanes > 1 else const

        def round_shift(value, shift):
            """``value >> shift`` rounded to nearest even (``1 <= shift <= 31``)."""
            half_minus_one = (u(1) << (shift - u(1))) - u(1)
            return (value + half_minus_one + ((value >> shift) & u(1))) >> shift

        bits, magnitude, clamped, exponent = (
            tvm.tirx.Var(name, u32) for name in ("bits", "magnitude", "clamped", "exponent"))
        # normal in fp8: drop 23 - mantissa bits, rounding, and rebias the exponent (a carry
        # out of the mantissa bumps the exponent, as it should)
        normal = (round_shift(clamped, u(23 - fmt.mantissa))
                  - u((127 - fmt.bias) << fmt.mantissa))
        # subnormal in fp8: a float32 with exponent field e is significand * 2^(e - 150), and
        # fp8 subnormals count units of 2^(1 - bias - mantissa)
        significand = (clamped & u(_F32_MANTISSA)) | T.Select(
            exponent > u(0), u(_F32_HIDDEN), u(0))
        base = u(151 - fmt.bias - fmt.mantissa)
        subnormal = round_shift(significand, T.min(base - T.min(exponent, base), u(31)))
        value = T.Select(magnitude > u(_F32_INF), u(_NAN), T.Select(
            exponent >= u(128 - fmt.bias), normal, subnormal))  # 128 - bias: smallest normal
        sign = (bits >> u(24)) & u(0x80)
        result = T.Cast(tvm.DataType("uint8").with_lanes(lanes), sign | value)
        for var, bound in reversed(((bits, T.reinterpret(u32, x)),
                                    (magnitude, bits & u(_F32_ABS)),
                                    (clamped, T.min(magnitude, u(_float_bits(fmt.max)))),
                                    (exponent, clamped >> u(23)))):
            result = tvm.tirx.Let(var, bound, result)
        return result

    return lower


def _cuda_lowering(dtype: str):
    """The lowering of a call to the bits of TVM's CUDA fp8 cast (the hardware's)."""

    def lower(call):
        fp8 = tvm.DataType(dtype).with_lanes(call.ty.dtype.lanes)
        return T.reinterpret(call.ty.dtype, T.Cast(fp8, call.args[0]))

    return lower


def _intrinsic(dtype: str) -> str:
    return f"tirx.tvm_fused_saturating_{dtype}"


register_intrinsics({
    _intrinsic(dtype): (1, {
        "cuda": _cuda_lowering(dtype),
        "default": _integer_lowering(fmt),
    }) for dtype, fmt in FP8_FORMATS.items()}, vectorizable=True)


def saturating_fp8(dtype: str, x):
    """``x`` (a float32 expression) as the nearest ``dtype`` value, saturating at the finite
    range. (The intrinsic computes the value's bits, a uint8: TVM's fp8 legalization on the
    CPU would otherwise turn an fp8-valued call into its own inexact cast.)"""
    return T.reinterpret(dtype, tvm.tirx.call_intrin("uint8", _intrinsic(dtype), x))
