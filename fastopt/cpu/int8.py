"""int8 state on the CPU: the 8-bit codes of ``_spec`` (INT8_BLOCK, INT8_MANTISSA_BITS,
INT8_EXPONENT_BITS) as integer operations on float32 bits, and the per-block decode and
encode every ``<name>_int8`` kernel runs (mirrors kernels/common.cuh and the host's
``fastopt/_int8.py``; tested against both on every code).

A block's values x become y = x / absmax in [-1, 1] (times 1/absmax: a product may land one
ulp above 1, which the encoder clamps); y's float32 bits, plus ``rand`` below the kept
mantissa bits, shifted right, less the exponent bias, are the code: round half up with
rand = half a code step, unbiased stochastic rounding with 20 uniform random bits. Below the
smallest code's value (2^-14 of the absmax signed, 2^-30 non-negative) a signed value becomes
0 or that code by the same rounding (with rand = half: the nearer one), so a small first
moment next to a large one in its block grows on average instead of staying 0; a positive
non-negative value (a second moment, an accumulator) becomes that code, never 0: an Adam-like
step m / sqrt(v) with m kept and v rounded to 0 was up to 100x too large (a review's
finding), while a floored v only shortens the steps of elements whose second moment is below
2^-30 of their block's largest.
An absmax below float32's smallest normal number counts as 0 (the block is stored as zeros);
a NaN or inf in a block makes the whole block NaN.
"""

import numpy as np

from ..algorithms._spec import INT8_BLOCK, INT8_EXPONENT_BITS, INT8_MANTISSA_BITS, INT8_SALTS
from ._jit import helper, scalar
from .convert import HASH_MULTIPLIER, hash_mix

_U = np.uint32
#: right shift from float32 bits to the code (the dropped mantissa bits)
SHIFT = 23 - INT8_MANTISSA_BITS
#: the random bits stochastic rounding adds (one code step), and half of it (round half up)
STEP_MASK = (1 << SHIFT) - 1
HALF = 1 << (SHIFT - 1)
#: the codes' exponent bias in code units, and the codes of 1.0 (the largest used)
SIGNED_BIAS = (127 - (1 << INT8_EXPONENT_BITS["signed"]) + 1) << INT8_MANTISSA_BITS
NONNEGATIVE_BIAS = (127 - (1 << INT8_EXPONENT_BITS["nonnegative"]) + 1) << INT8_MANTISSA_BITS
SIGNED_ONE = (127 << INT8_MANTISSA_BITS) - SIGNED_BIAS
NONNEGATIVE_ONE = (127 << INT8_MANTISSA_BITS) - NONNEGATIVE_BIAS
#: the smallest code that is not 0 (the smallest binade's first value)
SMALLEST = 1 << INT8_MANTISSA_BITS
#: that code's value over 2^SHIFT: below it a signed value rounds to 0 or to it with
#: probability value / smallest (2^(2 - 2^E) is the smallest value); 0 for non-negative
#: states, whose positive values below it all round up to it
SIGNED_FLOOR = np.float32(2.0 ** (2 - (1 << INT8_EXPONENT_BITS["signed"]) - SHIFT))
NONNEGATIVE_FLOOR = np.float32(0.0)
#: float32's smallest normal number: a smaller absmax stores the block as zeros
MIN_NORMAL = np.float32(2.0 ** -126)
#: blocks per parallel work item of the int8 kernels (one scratch allocation each)
INT8_GROUP = 64
#: a salt per state slot for the stochastic rounding's random bits
SALTS = INT8_SALTS


@helper
def encode_magnitude(y, rand, bias, one, floor_step):
    """|y| <= 1 as a code magnitude: 0, or SMALLEST..one (see the module's docstring). Below
    the smallest code's value s, 0 or SMALLEST: SMALLEST when |y| > rand * floor_step
    (floor_step = s / 2^SHIFT: P(SMALLEST) = |y| / s, unbiased; 0: whenever y != 0).
    Every step in uint32 (t - bias compared as t against bias + ...): Numba widens int32
    differences to int64, which split each vector in two (bench/NOTES.md, "int8 encode")."""
    a = _U(np.float32(y).view(_U) & _U(0x7FFFFFFF))
    t = _U(_U(a + rand) >> _U(SHIFT))  # (no overflow: a <= 0x7FC00000, rand < 2^SHIFT)
    small = _U(SMALLEST) if abs(np.float32(y)) > np.float32(rand) * floor_step else _U(0)
    code = _U(t - _U(bias)) if t >= _U(bias + SMALLEST) else small
    return _U(one) if t > _U(bias + one) else code


@helper
def decode_magnitude(magnitude, bias):
    value = _U(_U(magnitude + _U(bias)) << _U(SHIFT)).view(np.float32)
    return value if magnitude != _U(0) else np.float32(0.0)


@helper
def encode_signed(y, rand):
    sign = _U(_U(np.float32(y).view(_U) >> _U(24)) & _U(0x80))
    return np.uint8(encode_magnitude(y, rand, SIGNED_BIAS, SIGNED_ONE, SIGNED_FLOOR) | sign)


@helper
def decode_signed(code):
    c = _U(code)
    value = decode_magnitude(_U(c & _U(0x7F)), SIGNED_BIAS)
    return -value if c & _U(0x80) else value


@helper
def encode_nonnegative(y, rand):
    return np.uint8(encode_magnitude(y, rand, NONNEGATIVE_BIAS, NONNEGATIVE_ONE,
                                     NONNEGATIVE_FLOOR))


@helper
def decode_nonnegative(code):
    return decode_magnitude(_U(code), NONNEGATIVE_BIAS)


# The generated kernels decode and encode a block in loops of their own (codegen's
# _numba_int8_block); block_absmax is called, not inlined into them (Numba's IR inliner
# clashes on loop variables inlined twice). Their loops run over unsigned bounds, which LLVM
# vectorises (a signed index's wrap-around check stops it: bench/NOTES.md).

@helper
def hash_index(i):
    """i * HASH_MULTIPLIER (mod 2^32): where random32's hash of index i starts. The encode
    loops carry it along (``next_hash_index``) and take ``stochastic_bits_at``: a uint32 the
    vectoriser makes a vector add, where random32(lo + j, ...) widened 64-bit indices,
    narrowed them and multiplied (int8 steps 6-15 % faster: bench/NOTES.md, twenty-first
    session). The same bits."""
    return _U(_U(i) * _U(HASH_MULTIPLIER))


@helper
def next_hash_index(h):
    """hash_index(i + 1) from h = hash_index(i)."""
    return _U(h + _U(HASH_MULTIPLIER))


@helper
def stochastic_bits_at(h, seed, salt):
    """The random bits (below one code step) added to element i's value in the state slot
    whose salt is ``salt`` before its code is cut (unbiased stochastic rounding), from
    h = hash_index(i): random32(i, seed ^ salt) & STEP_MASK."""
    return _U(hash_mix(_U(h + _U(seed ^ _U(salt)))) & _U(STEP_MASK))


@scalar
def block_absmax(values, count):
    """max |values[:count]| as the largest of their bits without the sign: an integer max,
    which LLVM vectorises (a float max with NaN semantics it does not); a NaN's bits exceed
    every number's, so a NaN comes out as the max."""
    top = _U(0)
    for j in range(np.uint64(0), count):
        bits = _U(np.float32(values[j]).view(_U) & _U(0x7FFFFFFF))
        top = _U(bits if bits > top else top)
    return _U(top).view(np.float32)


@helper
def block_inverse(absmax):
    """The factor a block's values are encoded with (0 for an absmax below float32's smallest
    normal number), and the absmax to store (0 there; a NaN stays)."""
    normal = absmax >= MIN_NORMAL
    return (np.float32(1.0) / absmax if normal else np.float32(0.0),
            absmax if normal or absmax != absmax else np.float32(0.0))


@scalar
def block_count(n):
    """How many INT8_BLOCK blocks n elements take."""
    return (n + INT8_BLOCK - 1) // INT8_BLOCK
