"""Saturating float32 -> fp8 conversion as TensorIR integer arithmetic, exact on every target.

``saturating_fp8(x, dtype, store)`` stores ``dtype(clamp(x, -max, max))``, rounded to nearest
even, NaN kept NaN, -0 kept -0: what CUDA's ``__nv_cvt_float_to_fp8(x, __NV_SATFINITE, ...)`` and
torch's ``x.clamp(-max, max).to(dtype)`` compute. It works on the float32 bits alone, because
TVM's own fp8 casts are not exact on the CPU (its ``llvm`` legalization mis-rounds
subnormals and NaN), and the CPU build is what CI checks bit for bit.
"""

from __future__ import annotations

import dataclasses
import struct

from tvm.script import tirx as T


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


def _u32(value: int):
    return T.uint32(value)


def _float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _round_shift(value, shift):
    """``value >> shift`` rounded to nearest even (uint32; ``1 <= shift <= 31``)."""
    one = _u32(1)
    half_minus_one = (one << (shift - one)) - one
    return (value + half_minus_one + ((value >> shift) & one)) >> shift


def storer(buffer, *indices):
    """A ``store(value)`` callable writing ``buffer[indices]``, for ``saturating_fp8``."""
    return lambda value: T.buffer_store(buffer, value, list(indices))


# fmt: off
@T.macro
def saturating_fp8(x, dtype: str, store):
    """``store(v)`` the fp8 ``dtype`` value ``v`` nearest ``x`` (a float32 expression),
    saturating at the finite range. (Statements, not one expression: an expression would
    repeat ``x`` a dozen times. ``x`` goes through a register of its own first: TVM's storage
    rewrite misses the loads of a staged buffer in a ``T.let``.)"""
    fmt = T.meta_var(FP8_FORMATS[dtype])
    value_bits = T.alloc_buffer((1,), "uint32", scope="local")
    value_bits[0] = T.reinterpret("uint32", x)
    bits: T.let = value_bits[0]
    magnitude: T.let = bits & _u32(_F32_ABS)
    clamped: T.let = T.min(magnitude, _u32(_float_bits(fmt.max)))
    exponent: T.let = clamped >> _u32(23)
    # normal in fp8: drop 23 - mantissa bits, rounding, and rebias the exponent (a carry out
    # of the mantissa bumps the exponent, as it should)
    normal: T.let = (_round_shift(clamped, _u32(23 - fmt.mantissa))
                     - _u32((127 - fmt.bias) << fmt.mantissa))
    # subnormal in fp8: a float32 with exponent field e is significand * 2^(e - 150), and
    # fp8 subnormals count units of 2^(1 - bias - mantissa)
    significand: T.let = (clamped & _u32(_F32_MANTISSA)) | T.Select(
        exponent > _u32(0), _u32(_F32_HIDDEN), _u32(0))
    base = T.meta_var(_u32(151 - fmt.bias - fmt.mantissa))
    subnormal: T.let = _round_shift(significand,
                                    T.min(base - T.min(exponent, base), _u32(31)))
    value: T.let = T.Select(magnitude > _u32(_F32_INF), _u32(_NAN), T.Select(
        exponent >= _u32(128 - fmt.bias), normal, subnormal))  # 128 - bias: smallest normal
    store(T.reinterpret(dtype, T.Cast("uint8", ((bits >> _u32(24)) & _u32(0x80)) | value)))
# fmt: on
