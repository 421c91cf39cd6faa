"""bfloat16 bits <-> float32 on the host (numpy or cupy arrays), round to nearest even."""

import numpy as np


def decode(bits):
    """float32 values of bfloat16 bits (uint16)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(values, xp=np):
    """bfloat16 bits (uint16) of float32 values, rounded to nearest even; NaN stays NaN."""
    u = xp.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (u >> np.uint32(16)) | np.uint32(0x40)
    return xp.where(nan, quiet, rounded).astype(np.uint16)


def split_master(master, xp=np):
    """A float32 master as (bfloat16 bits, int16 remainders) (master_weights="remainder"):
    the bits are the master rounded to nearest with ties away from zero (its high half, plus
    one where the low half is >= 0x8000), the remainders its low half; a NaN keeps its high
    half, made quiet. ``join_remainder`` gives the master back exactly (every quiet NaN
    included). Mirrors split_master in fastopt/cpu/convert.py and kernels/common.cuh."""
    u = xp.asarray(master, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u + np.uint32(0x8000)) >> np.uint32(16)
    bits = xp.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
    return bits, (u & np.uint32(0xFFFF)).astype(np.uint16).view(np.int16)


def join_remainder(bits, remainder):
    """The float32 master that bfloat16 params (their uint16 bits, or a bfloat16 array) and
    their int16 remainders make: a negative remainder means the bits were rounded up (one
    more than the master's high half), except on a NaN, and on a zero (no master rounds up
    to one: a param set to 0 in place without refresh_master() keeps its stale remainder,
    which made its bits 0xFFFF or 0x7FFF, NaNs; now a subnormal next to 0)."""
    if bits.dtype.itemsize != 2 or bits.dtype.kind not in "uV" and bits.dtype.name != \
            "bfloat16":
        raise TypeError(f"join_remainder takes bfloat16 params or their uint16 bits, got "
                        f"{bits.dtype}")
    if remainder.dtype != np.int16 or remainder.shape != bits.shape:
        raise TypeError(f"join_remainder takes int16 remainders of the params' shape "
                        f"{bits.shape}, got {remainder.dtype} {remainder.shape}")
    high = bits.view(np.uint16).astype(np.uint32)
    up = (remainder < 0) & ((high & np.uint32(0x7FFF)) - np.uint32(1) < np.uint32(0x7F80))
    low = remainder.view(np.uint16).astype(np.uint32)
    return (((high - up.astype(np.uint32)) << np.uint32(16)) | low).view(np.float32)
