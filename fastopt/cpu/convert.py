"""16-bit <-> float32 conversions on raw uint16 values (mirrors to_float/from_float in
kernels/common.cuh). Numba has no float16/bfloat16 arithmetic, so 16-bit buffers reach the
kernels as uint16 and are converted with integer operations; float32 -> 16-bit rounds to
nearest even, NaN stays NaN, overflow goes to inf — the same results as numpy's float16 and
ml_dtypes' bfloat16 casts (tested on every 16-bit pattern).

The format is the kernels' ``fmt`` argument: a numpy dtype (FP32, FP16 or BF16 below), so
Numba types it at compile time and each specialisation holds only its format's conversion.
A format passed as a number was tested at run time in the loop, which kept both formats'
code in it: master_weights="none" steps take 23-36 % less time with the format fixed
(bench/NOTES.md, "the format at compile time")."""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from .._checks import FORMATS
from ._jit import scalar as helper  # LLVM inlines these; IR inlining of branches only warns

#: the ``fmt`` markers (uint16 stands for bfloat16 bits; float32 params convert nothing)
FP32, FP16, BF16 = FORMATS["float32"], FORMATS["float16"], FORMATS["bfloat16"]
_U = np.uint32
LOW16 = _U(0xFFFF)  # 16 random bits out of 32 (which 16: STATE_RANDOM_SHIFTS)


@helper
def bf16_to_float(h):
    return _U(_U(h) << _U(16)).view(np.float32)


@helper
def float_to_bf16(f):
    u = np.float32(f).view(np.uint32)
    if _U(u & _U(0x7FFFFFFF)) > _U(0x7F800000):  # NaN: keep it quiet
        return np.uint16(_U(u >> _U(16)) | _U(0x40))
    return np.uint16(_U(_U(u + _U(0x7FFF)) + _U(_U(u >> _U(16)) & _U(1))) >> _U(16))


@helper
def fp16_to_float(h):
    o = _U(_U(h) & _U(0x7FFF)) << _U(13)
    exponent = o & _U(0x0F800000)
    o = _U(o + _U(112 << 23))  # rebias 15 -> 127
    if exponent == _U(0x0F800000):  # inf / NaN
        o = _U(o + _U(112 << 23))
    elif exponent == 0:  # zero / subnormal: renormalise through a float subtraction
        o = _U(o + _U(1 << 23))
        o = np.float32(o.view(np.float32) - np.float32(6.103515625e-05)).view(np.uint32)
    return _U(o | _U(_U(_U(h) & _U(0x8000)) << _U(16))).view(np.float32)


@helper
def float_to_fp16(f):
    u = np.float32(f).view(np.uint32)
    sign = _U(u & _U(0x80000000))
    u = _U(u ^ sign)
    if u >= _U(143 << 23):  # too big for fp16, inf or NaN
        o = _U(0x7E00) if u > _U(0x7F800000) else _U(0x7C00)
    elif u < _U(113 << 23):  # fp16 subnormal or zero: round through a float addition
        rounded = np.float32(u.view(np.float32) + np.float32(0.5))  # 0.5 has the bits 126 << 23
        o = _U(rounded.view(np.uint32) - _U(126 << 23))
    else:
        mant_odd = _U(_U(u >> _U(13)) & _U(1))
        u = _U(u + _U(0xC8000FFF))  # rebias 127 -> 15 (mod 2^32) plus the rounding bias
        o = _U(_U(u + mant_odd) >> _U(13))
    return np.uint16(o | _U(sign >> _U(16)))


def is_bf16(fmt) -> bool:
    """Whether the Numba type of a ``fmt`` argument is the bfloat16 marker (at compile time;
    a TypingError for anything but a format marker)."""
    if not isinstance(fmt, types.DType) or fmt.dtype not in (types.float32, types.float16,
                                                             types.uint16):
        raise TypingError(f"fmt must be a format marker of fastopt.cpu.convert (FP32, FP16, "
                          f"BF16: a numpy dtype), got {fmt}")
    return fmt.dtype == types.uint16


def to_float(h, fmt):
    """A 16-bit value (uint16 bits) of format fmt (FP16 or BF16) as float32."""


def from_float(f, fmt):
    """float32 -> uint16 bits of format fmt, round to nearest even."""


@overload(to_float, inline="always")
def _to_float(h, fmt):
    if is_bf16(fmt):
        return lambda h, fmt: bf16_to_float(h)
    return lambda h, fmt: fp16_to_float(h)


@overload(from_float, inline="always")
def _from_float(f, fmt):
    if is_bf16(fmt):
        return lambda f, fmt: float_to_bf16(f)
    return lambda f, fmt: float_to_fp16(f)


def fo_sign(x):
    """The definitions' sign(), as torch.sign: 1 for x > 0, -1 for x < 0, else 0 (for +-0
    and for NaN, where numpy's gives NaN: torch's Rprop and lion-pytorch then leave the
    param as it is), in x's type."""


@overload(fo_sign, inline="always")
def _fo_sign(x):
    if not isinstance(x, types.Float):
        raise TypingError(f"fo_sign takes a float, got {x}")
    one = np.dtype(str(x)).type(1.0)
    minus, zero = -one, one - one

    def impl(x):
        if x > 0:
            return one
        if x < 0:
            return minus
        return zero
    return impl


#: random32's first multiplier: the hash of index i starts from i * HASH_MULTIPLIER (mod 2^32),
#: so the hash of i + 1 starts HASH_MULTIPLIER further on
HASH_MULTIPLIER = 0x9E3779B1


def _mix_ir(builder, h):
    """The hash's last steps on a 32-bit LLVM value h: h ^= h >> 15; h *= 0x2C1B3C6D;
    h ^= h >> 12."""
    u32 = ir.IntType(32)
    h = builder.xor(h, builder.lshr(h, u32(15)))
    h = builder.mul(h, u32(0x2C1B3C6D))
    return builder.xor(h, builder.lshr(h, u32(12)))


@intrinsic
def _hash32(typingctx, i, seed):
    """random32's hash in 32-bit integer arithmetic (i and seed cut to their low 32 bits, as
    np.uint32(x) does). Written as LLVM IR because Numba types uint32 * uint32 (and +, ^,
    >>) as uint64: the same bits after the final cut, but LLVM then vectorised 64-bit lanes
    (vpmullq: half the lanes of vpmulld, and slower), which made the stochastically rounded
    stores compute-bound (bench/NOTES.md, twentieth session)."""
    if not (isinstance(i, types.Integer) and isinstance(seed, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        u32 = ir.IntType(32)

        def low32(value, ty):
            width = value.type.width
            if width > 32:
                return builder.trunc(value, u32)
            if width < 32:
                return builder.sext(value, u32) if ty.signed else builder.zext(value, u32)
            return value

        start = builder.mul(low32(args[0], i), u32(HASH_MULTIPLIER))
        return _mix_ir(builder, builder.add(start, low32(args[1], seed)))

    return types.uint32(i, seed), codegen


@intrinsic
def hash_mix(typingctx, h):
    """random32(i, seed) from h = i * HASH_MULTIPLIER + seed (a uint32, mod 2^32): the hash's
    last steps, for loops that carry i * HASH_MULTIPLIER along (``fastopt.cpu.int8``)."""
    if h != types.uint32:
        return None
    return types.uint32(h), lambda context, builder, signature, args: _mix_ir(builder, args[0])


@helper
def random32(i, seed):
    """32 pseudo-random bits for element i and the step's seed (a multiply-xorshift hash,
    in uint32 arithmetic: h = i * 0x9E3779B1 + seed; h ^= h >> 15; h *= 0x2C1B3C6D;
    h ^= h >> 12); each state buffer of the element takes its own 16 of them. (=
    hash_mix(i * HASH_MULTIPLIER + seed), all mod 2^32.)"""
    return _hash32(i, seed)


@helper
def random16(i, seed):
    """16 pseudo-random bits for element i (tests use this)."""
    return _U(random32(i, seed) & _U(0xFFFF))


@helper
def float_to_bf16_stochastic(f, rand):
    """float32 -> bfloat16 bits, rounded up with probability (dropped bits) / 2^16: unbiased,
    so small updates to a bf16 state survive on average. NaN stays NaN."""
    u = np.float32(f).view(np.uint32)
    if _U(u & _U(0x7FFFFFFF)) > _U(0x7F800000):
        return np.uint16(_U(u >> _U(16)) | _U(0x40))
    return np.uint16(_U(u + rand) >> _U(16))


@helper
def float_to_fp16_stochastic(f, rand):
    """float32 -> float16 bits, rounded away from zero with probability (dropped part) / ulp
    (unbiased; subnormals to within 2^-16 of an ulp); past the largest float16 the rounding
    goes to inf with that probability. NaN stays NaN. ``rand``: 16 random bits."""
    u = np.float32(f).view(np.uint32)
    sign = _U(_U(u & _U(0x80000000)) >> _U(16))
    a = _U(u & _U(0x7FFFFFFF))
    if a > _U(0x7F800000):
        return np.uint16(sign | _U(0x7E00))
    if a >= _U(143 << 23):  # >= 2^16 or inf
        return np.uint16(sign | _U(0x7C00))
    if a < _U(113 << 23):  # float16 subnormal: whole ulps of 2^-24 and the exact fraction
        scaled = np.float32(a.view(np.float32) * np.float32(16777216.0))
        whole = np.float32(math.floor(scaled))
        up = _U(1) if np.float32((scaled - whole) * np.float32(65536.0)) > np.float32(rand) \
            else _U(0)
        return np.uint16(sign | _U(_U(whole) + up))
    # normal: add 13 random bits below the kept mantissa, then truncate (a carry moves the
    # exponent, up to inf); rebias 127 -> 15
    return np.uint16(sign | _U(_U(_U(a + _U(rand >> _U(3))) >> _U(13)) - _U(112 << 10)))


def to_half_stochastic(f, rand, fmt):
    """float32 -> uint16 bits of format fmt, rounded stochastically with 16 random bits
    (master_weights="none")."""


@overload(to_half_stochastic, inline="always")
def _to_half_stochastic(f, rand, fmt):
    if is_bf16(fmt):
        return lambda f, rand, fmt: float_to_bf16_stochastic(f, rand)
    return lambda f, rand, fmt: float_to_fp16_stochastic(f, rand)


@helper
def join_remainder(bits, remainder):
    """The float32 master that bfloat16 param bits and their int16 remainder make
    (master_weights="remainder"): the remainder is the master's low 16 bits; a negative one
    means the param was rounded up (away from zero), so its bits are one more than the
    master's high half. A NaN param was not rounded, nor a zero one (none rounds up to it: a
    param set to 0 in place keeps a stale remainder, which made it a NaN)."""
    high = _U(bits)
    low = _U(np.int32(remainder)) & _U(0xFFFF)
    rounded_up = _U(np.int32(remainder) < 0) & _U(
        _U(_U(high & _U(0x7FFF)) - _U(1)) < _U(0x7F80))
    return _U(_U(_U(high - rounded_up) << _U(16)) | low).view(np.float32)


@helper
def split_master(f):
    """A float32 master as (bfloat16 param bits, int16 remainder): the param is the master
    rounded to nearest with ties away from zero (its high half plus one when the low half is
    >= 0x8000), the remainder the low half. A NaN keeps its high half, made quiet."""
    u = np.float32(f).view(np.uint32)
    low = np.int16(np.int32(_U(u & _U(0xFFFF))) - np.int32(65536) * np.int32(
        _U(u & _U(0x8000)) != _U(0)))
    if _U(u & _U(0x7FFFFFFF)) > _U(0x7F800000):
        return np.uint16(_U(u >> _U(16)) | _U(0x40)), low
    return np.uint16(_U(u + _U(0x8000)) >> _U(16)), low


@helper
def step_seed(step):
    """The stochastic-rounding seed of step k: deterministic, so a resumed run is identical."""
    return _U(np.uint64(step) * np.uint64(0x9E3779B9))
