"""FlatBuffer: many arrays of any shapes packed into one aligned contiguous buffer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from ._checks import is_cupy, xp_of

#: every view starts on a 64-byte boundary (a cache line; a full AVX-512 / 4 x 16-byte vector)
ALIGN_BYTES = 64


class FlatBuffer:
    """One contiguous 1-D buffer holding several arrays; ``views[i]`` has ``shapes[i]``.

    ``FlatBuffer(arrays)`` copies the arrays in; ``FlatBuffer.empty(shapes)`` and
    ``like()`` make buffers of the same layout (e.g. for gradients). Each view starts on a
    64-byte boundary; the gaps between views are zero and stay zero under every optimizer
    (zero gradient, zero state, zero parameter give a zero update). The buffer lives where
    the arrays do: cupy arrays (or ``xp=cupy``) give a GPU buffer for the CUDA kernels.

    ``align_elements``: each view also starts on a multiple of this many elements. With
    ``state_dtype="int8"`` pass ``fastopt.Int8State.BLOCK``, so that each array's state has
    blocks (and scales) of its own, as fastopt.torch lays out each param: otherwise a block
    may span two arrays, whose small values then keep codes only relative to the other's
    largest.
    """

    def __init__(self, arrays: Iterable, dtype=np.float32, align_elements: int | None = None):
        arrays = list(arrays)
        xp = xp_of(arrays[0]) if arrays and is_cupy(arrays[0]) else np
        arrays = [xp.asarray(a) for a in arrays]
        self._init_layout([a.shape for a in arrays], dtype, xp, align_elements)
        for view, array in zip(self.views, arrays, strict=True):
            view[...] = array

    @classmethod
    def empty(cls, shapes: Sequence[Sequence[int]], dtype=np.float32, xp=np,
              align_elements: int | None = None) -> FlatBuffer:
        """A zero-filled FlatBuffer with views of these shapes (``xp``: numpy or cupy)."""
        fb = cls.__new__(cls)
        fb._init_layout([tuple(s) for s in shapes], dtype, xp, align_elements)
        return fb

    def like(self) -> FlatBuffer:
        """A zero-filled FlatBuffer with the same layout (shapes, offsets, dtype, device)."""
        return FlatBuffer.empty(self.shapes, self.buffer.dtype, xp_of(self.buffer),
                                self.align_elements)

    def _init_layout(self, shapes: list[tuple[int, ...]], dtype, xp,
                     align_elements: int | None) -> None:
        dtype = np.dtype(dtype)
        if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
            raise TypeError(f"dtype must be a floating type (float32, float16, "
                            f"ml_dtypes.bfloat16, ...), got {dtype}")
        if align_elements is not None and (isinstance(align_elements, bool) or not isinstance(
                align_elements, (int, np.integer)) or align_elements < 1):
            raise ValueError(f"align_elements must be a positive int, got {align_elements!r}")
        self.align_elements = None if align_elements is None else int(align_elements)
        step = max(1, ALIGN_BYTES // dtype.itemsize)
        if align_elements is not None:
            step = math.lcm(step, int(align_elements))
        offsets, total = [], 0
        for shape in shapes:
            offsets.append(total)
            total += -(-math.prod(shape) // step) * step
        raw = xp.zeros(total * dtype.itemsize + ALIGN_BYTES, dtype=np.uint8)
        address = raw.ctypes.data if xp is np else raw.data.ptr
        start = -address % ALIGN_BYTES
        self.buffer = raw[start:start + total * dtype.itemsize].view(dtype)
        self.shapes = list(shapes)
        self.offsets = offsets
        self.views = [self.buffer[o:o + math.prod(s)].reshape(s)
                      for o, s in zip(offsets, shapes, strict=True)]

    @property
    def data(self) -> np.ndarray:
        """The flat buffer (same as ``buffer``)."""
        return self.buffer

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.views[i]

    def __iter__(self):
        return iter(self.views)

    def __array__(self, dtype=None, copy=None):
        if dtype is not None and np.dtype(dtype) != self.buffer.dtype:
            return self.buffer.astype(dtype)
        return self.buffer.copy() if copy else self.buffer

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self.views)} arrays, {self.buffer.size} elements, "
                f"dtype={self.buffer.dtype})")
