"""int8 optimizer state on the host (numpy or cupy arrays): the container, and the codes of
``_spec`` (INT8_BLOCK, INT8_MANTISSA_BITS, INT8_EXPONENT_BITS) written as array operations,
independently of the kernels' (``fastopt/cpu/int8.py``, ``kernels/common.cuh``), which the
tests compare with these on every code.

Format of one state buffer of n elements (``Int8State``):
- ``codes``: uint8, n: each element's 8-bit float of y = x / absmax of its block, |y| <= 1.
  Code 0 is 0; a code c > 0 (its low 7 bits for a signed state, whose bit 7 is the sign) is
  2^(e - 2^E + 1) (1 + f / 8) with e = c >> 3 and f = c & 7: E = 4 exponent bits for signed
  states (down to 2^-14 of the absmax), E = 5 for non-negative ones (down to 2^-30);
- ``absmax``: float32, ceil(n / INT8_BLOCK): each block's largest |x|.

The kernels round stochastically (seeded by the step and the element, so a resumed run is
bit-identical); ``quantize`` here rounds half up (loading float state, filling initial
values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .algorithms._spec import (
    INT8_BLOCK,
    INT8_CODE_VERSION,
    INT8_EXPONENT_BITS,
    INT8_MANTISSA_BITS,
    STATE_DTYPES,
)

__all__ = ["Int8State", "quantize", "dequantize", "blocks", "INT8_BLOCK", "INT8_CODE_VERSION"]

_SHIFT = 23 - INT8_MANTISSA_BITS
_MIN_NORMAL = np.float32(2.0 ** -126)


def blocks(n: int) -> int:
    """How many blocks (absmax values) an int8 state of n elements has."""
    return -(-n // INT8_BLOCK)


def _bias(signed: bool) -> int:
    return (127 - (1 << INT8_EXPONENT_BITS["signed" if signed else "nonnegative"]) + 1) \
        << INT8_MANTISSA_BITS


@dataclass(eq=False)
class Int8State:
    """One int8 state buffer: ``codes`` (uint8, one per element) and ``absmax`` (float32, one
    per block of INT8_BLOCK elements), numpy or cupy arrays, updated in place by the
    kernels. Whether its values are signed is its optimizer's declaration (``State.sign``)."""

    #: elements per block (one absmax each)
    BLOCK: ClassVar[int] = INT8_BLOCK

    codes: object
    absmax: object

    @classmethod
    def zeros(cls, n: int, xp=np) -> Int8State:
        """The int8 state of n zeros (numpy, or ``xp=cupy``)."""
        return cls(xp.zeros(n, dtype=np.uint8), xp.zeros(blocks(n), dtype=np.float32))

    @property
    def shape(self) -> tuple[int]:
        return self.codes.shape

    @property
    def size(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.absmax.nbytes

    def decode(self, signed: bool):
        """The float32 values (an array where the codes are)."""
        return dequantize(self, signed)

    def assign(self, values, signed: bool) -> None:
        """Store float32 ``values`` (rounded half up), in place."""
        made = quantize(values, signed)
        self.codes[...] = made.codes
        self.absmax[...] = made.absmax

    def copy(self) -> Int8State:
        return Int8State(self.codes.copy(), self.absmax.copy())

    def __getitem__(self, index: slice) -> Int8State:
        """Elements [start, stop) with their blocks' scales (views); ``start`` must begin a
        block."""
        start, stop, stride = index.indices(self.size)
        if stride != 1 or start % INT8_BLOCK:
            raise ValueError(f"an int8 state's part starts at a multiple of {INT8_BLOCK} "
                             f"elements (a block), got {index}")
        first = start // INT8_BLOCK
        return Int8State(self.codes[start:stop],
                         self.absmax[first:first + blocks(max(stop - start, 0))])


def _xp(array):
    from ._checks import xp_of

    return xp_of(array)


def _host(array) -> np.ndarray:
    from ._checks import is_cupy

    return array.get() if is_cupy(array) else np.asarray(array)


def quantize(values, signed: bool) -> Int8State:
    """float32 ``values`` (1-D, numpy or cupy) as int8 state where they are, each element
    rounded half up to its code. (Computed on the host: loading and filling state, not a
    step's work.)"""
    xp = _xp(values)
    values = _host(values).astype(np.float32, copy=False).reshape(-1)
    n = values.shape[0]
    rows = np.zeros(blocks(n) * INT8_BLOCK, dtype=np.float32)
    rows[:n] = values
    rows = rows.reshape(-1, INT8_BLOCK)
    bits = rows.view(np.uint32) & np.uint32(0x7FFFFFFF)
    absmax = bits.max(axis=1).view(np.float32) if n else np.zeros(0, dtype=np.float32)
    normal = absmax >= _MIN_NORMAL
    absmax = np.where(normal | np.isnan(absmax), absmax, np.float32(0.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(normal, np.float32(1.0) / absmax, np.float32(0.0)).astype(np.float32)
        y = (rows * inv[:, None]).astype(np.float32)
    u = y.view(np.uint32)
    magnitude = (((u & np.uint32(0x7FFFFFFF)) + np.uint32(1 << (_SHIFT - 1))) >> np.uint32(
        _SHIFT)).astype(np.int64) - _bias(signed)
    one = (127 << INT8_MANTISSA_BITS) - _bias(signed)
    # below the smallest code's value: signed, 0 or that code, the nearer (half of it rounds
    # up); non-negative, that code unless 0 (as the kernels' encoders: fastopt/cpu/int8.py)
    above_half = np.abs(y) > np.float32(smallest(signed) / 2 if signed else 0.0)
    magnitude = np.minimum(np.where(magnitude >= 1 << INT8_MANTISSA_BITS, magnitude,
                                    np.where(above_half, 1 << INT8_MANTISSA_BITS, 0)), one)
    codes = magnitude.astype(np.uint8)
    if signed:
        codes |= ((u >> np.uint32(24)) & np.uint32(0x80)).astype(np.uint8)
    return Int8State(xp.asarray(codes.reshape(-1)[:n].copy()), xp.asarray(absmax))


def dequantize(state: Int8State, signed: bool):
    """The float32 values of int8 state (an array where the codes are)."""
    xp = _xp(state.codes)
    codes = _host(state.codes).reshape(-1)
    n = codes.shape[0]
    c = codes.astype(np.uint32)
    magnitude = c & np.uint32(0x7F) if signed else c
    values = ((magnitude + np.uint32(_bias(signed))) << np.uint32(_SHIFT)).view(np.float32)
    values = np.where(magnitude == 0, np.float32(0.0), values)
    if signed:
        values = np.where((c & np.uint32(0x80)) != 0, -values, values)
    scale = np.repeat(_host(state.absmax).astype(np.float32, copy=False), INT8_BLOCK)[:n]
    with np.errstate(invalid="ignore"):
        return xp.asarray((values * scale).astype(np.float32))


def smallest(signed: bool) -> float:
    """The smallest nonzero |y| a code holds (relative to the block's absmax)."""
    return 2.0 ** (2 - (1 << INT8_EXPONENT_BITS["signed" if signed else "nonnegative"]))


#: the state-dict keys of a buffer's raw int8 form (beside its float32 values under its own
#: name), and of the code's version
CODES_KEY = "{}_codes"
ABSMAX_KEY = "{}_absmax"
VERSION_KEY = "int8_code_version"


def signed(definition, name: str) -> bool:
    """Whether state ``name`` of a definition holds signed values (its ``State.sign``)."""
    return next(s.sign for s in definition.state if s.name == name) == "signed"


def check_state_dtype(definition, state_dtype) -> str:
    """``state_dtype`` checked for this definition (ValueError, saying why)."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {', '.join(map(repr, STATE_DTYPES))}, "
                         f"got {state_dtype!r}")
    if definition.factored is not None and state_dtype != "float32":
        from ._functional import factored_refusal

        raise ValueError(factored_refusal(definition))
    if state_dtype == "int8" and definition.int8_refusal is not None:
        raise ValueError(definition.int8_refusal)
    return state_dtype


def arrays(state: dict) -> list[tuple[str, object]]:
    """A state dict's buffers as (name, array) pairs, an int8 buffer's codes and absmax each
    under its raw key (for the checks that user buffers share no memory with them)."""
    out = []
    for name, value in state.items():
        if isinstance(value, Int8State):
            out += [(CODES_KEY.format(name), value.codes), (ABSMAX_KEY.format(name),
                                                            value.absmax)]
        else:
            out.append((name, value))
    return out


def raw_entries(state: dict, host_copy) -> dict:
    """The raw form of a state's int8 buffers for a state dict: numpy copies of the codes and
    scales under CODES_KEY and ABSMAX_KEY, and the code's version (none for other state)."""
    out = {}
    for name, value in state.items():
        if isinstance(value, Int8State):
            out[CODES_KEY.format(name)] = host_copy(value.codes)
            out[ABSMAX_KEY.format(name)] = host_copy(value.absmax)
    if out:
        out[VERSION_KEY] = INT8_CODE_VERSION
    return out


def raw_entry(saved: dict, name: str, n: int, host_copy) -> Int8State | None:
    """Buffer ``name``'s raw int8 form in a state dict, checked (None if it has none)."""
    codes_key, absmax_key = CODES_KEY.format(name), ABSMAX_KEY.format(name)
    if codes_key not in saved and absmax_key not in saved:
        return None
    if codes_key not in saved or absmax_key not in saved:
        raise KeyError(f"state_dict has one of {codes_key!r} and {absmax_key!r} (int8 "
                       "state's codes and block scales) without the other")
    version = saved.get(VERSION_KEY, INT8_CODE_VERSION)
    if version != INT8_CODE_VERSION:
        raise ValueError(f"state_dict holds int8 state of code version {version!r}; this "
                         f"fastopt reads version {INT8_CODE_VERSION}")
    codes, absmax = host_copy(saved[codes_key]), host_copy(saved[absmax_key])
    if codes.dtype != np.uint8 or codes.shape != (n,) or absmax.dtype != np.float32 \
            or absmax.shape != (blocks(n),):
        from ._checks import ArrayArgumentError

        raise ArrayArgumentError(
            f"state_dict[{codes_key!r}] and [{absmax_key!r}] must be uint8 of shape ({n},) "
            f"and float32 of shape ({blocks(n)},), got {codes.dtype} {codes.shape} and "
            f"{absmax.dtype} {absmax.shape}")
    return Int8State(codes, absmax)


def memory_report(n: int, parts: list[tuple[str, int, int]]) -> dict[str, float]:
    """Bytes per parameter of n parameters by component, from (name, bytes, scale bytes)
    triples (an int8 state buffer: its codes' bytes, and its absmax's, which go to
    ``scales``); with ``total``."""
    report: dict[str, float] = {}
    for name, size, scales in parts:
        report[name] = report.get(name, 0.0) + size / max(n, 1)
        if scales:
            report["scales"] = report.get("scales", 0.0) + scales / max(n, 1)
    report["total"] = sum(report.values())
    return report


def parts_of(name: str, value) -> tuple[str, int, int]:
    """A buffer's (name, bytes, scale bytes) for ``memory_report``."""
    if isinstance(value, Int8State):
        return name, value.codes.nbytes, value.absmax.nbytes
    return name, value.nbytes, 0
