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
