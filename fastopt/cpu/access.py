"""Element access by buffer type, resolved at compile time (one specialisation per dtype).

float32 params are updated in place. 16-bit params arrive as uint16 bits (format ``fmt``:
FP16 or BF16) with a float32 ``master`` copy: the math reads and writes the master, and the
16-bit params get the master rounded to nearest even in the same pass (mirrors the
load/store of kernels/common.cuh).
"""

from numba import types
from numba.extending import overload

from .convert import from_float, to_float


def load_param(params, master, i):
    """The float32 value of param i."""


def load_grad(grads, i, fmt):
    """The float32 value of gradient i."""


def store_param(params, master, i, value, fmt):
    """Write param i (and its master copy for 16-bit params)."""


def _is_f32(array) -> bool:
    return array.dtype == types.float32


@overload(load_param, inline="always")
def _load_param(params, master, i):
    if _is_f32(params):
        return lambda params, master, i: params[i]
    return lambda params, master, i: master[i]


@overload(load_grad, inline="always")
def _load_grad(grads, i, fmt):
    if _is_f32(grads):
        return lambda grads, i, fmt: grads[i]
    return lambda grads, i, fmt: to_float(grads[i], fmt)


@overload(store_param, inline="always")
def _store_param(params, master, i, value, fmt):
    if _is_f32(params):
        def store(params, master, i, value, fmt):
            params[i] = value
    else:
        def store(params, master, i, value, fmt):
            master[i] = value
            params[i] = from_float(value, fmt)
    return store
