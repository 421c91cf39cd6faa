"""Element access by buffer type, resolved at compile time (one specialisation per dtype).

State buffers are float32, or bfloat16 bits (``state_dtype="bfloat16"``) read exactly and
written with stochastic rounding seeded by the step and the buffer.

float32 params are updated in place. 16-bit params arrive as uint16 bits (format ``fmt``:
FP16 or BF16); the ``master`` argument's dtype says how they keep their float32 values
(``master_weights=``, mirrors the load/store of kernels/common.cuh):
- float32: the master copy; the math reads and writes it, and the params get it rounded to
  nearest even in the same pass ("fp32");
- int16: the master's low 16 bits beside bfloat16 params, which hold it rounded to nearest,
  ties away from zero: the two make the master exactly ("remainder");
- uint16 (the params themselves): no master; the math reads the params and they get its
  result rounded stochastically, seeded by the step and the element ("none").
"""

import numpy as np
from numba import types
from numba.extending import overload

from ..algorithms._spec import PARAM_SALT
from .convert import (
    LOW16,
    bf16_to_float,
    float_to_bf16_stochastic,
    from_float,
    is_bf16,
    join_remainder,
    random32,
    split_master,
    to_float,
    to_half_stochastic,
)


def load_param(params, master, i, fmt):
    """The float32 value of param i."""


def load_grad(grads, i, fmt):
    """The float32 value of gradient i."""


def store_param(params, master, i, value, fmt, seed):
    """Write param i (and its master or remainder; ``seed``: the step's, for the rounding of
    master_weights="none")."""


def format_eps(params, fmt):
    """The machine epsilon of the params' format (torch's finfo(dtype).eps): float32's for
    float32 params, else float16's or bfloat16's (``fmt``), as a float64."""


def decode_state(x):
    """The float32 value of a state element (float32, or bfloat16 bits)."""


def add_l2(g, l2, p):
    """The gradient with the L2 weight decay term, g + l2 * p; g itself where ``l2`` is None
    (chosen at compile time: no term at all, so an inf param stays inf, as in torch)."""


def encode_state(state, value, rand16):
    """The element to store into ``state``: float32 as is, or bfloat16 bits rounded
    stochastically with these 16 random bits. (No index argument: an index parameter inlined
    several times into a prange body reads to Numba as overwriting the loop index.)"""


def state_random(state, i, seed):
    """32 random bits for element i's bf16 state rounding (0, and no work, for float32)."""


# (the implementations name the index j: an inlined parameter called i would overwrite the
# caller's prange index)
def _is_f32(array) -> bool:
    return array.dtype == types.float32


_SALT = np.uint32(PARAM_SALT)


@overload(load_param, inline="always")
def _load_param(params, master, j, fmt):
    if _is_f32(params):
        return lambda params, master, j, fmt: params[j]
    if _is_f32(master):
        return lambda params, master, j, fmt: master[j]
    if master.dtype == types.int16:
        return lambda params, master, j, fmt: join_remainder(params[j], master[j])
    return lambda params, master, j, fmt: to_float(params[j], fmt)


@overload(load_grad, inline="always")
def _load_grad(grads, j, fmt):
    if _is_f32(grads):
        return lambda grads, j, fmt: grads[j]
    return lambda grads, j, fmt: to_float(grads[j], fmt)


@overload(store_param, inline="always")
def _store_param(params, master, j, value, fmt, seed):
    if _is_f32(params):
        def store(params, master, j, value, fmt, seed):
            params[j] = value
    elif _is_f32(master):
        def store(params, master, j, value, fmt, seed):
            master[j] = value
            params[j] = from_float(value, fmt)
    elif master.dtype == types.int16:
        def store(params, master, j, value, fmt, seed):
            params[j], master[j] = split_master(value)
    else:
        def store(params, master, j, value, fmt, seed):
            rand = random32(j, seed ^ _SALT) & LOW16
            params[j] = to_half_stochastic(value, rand, fmt)
    return store


@overload(format_eps, inline="always")
def _format_eps(params, fmt):
    if _is_f32(params):
        return lambda params, fmt: 2.0 ** -23
    if is_bf16(fmt):
        return lambda params, fmt: 2.0 ** -7
    return lambda params, fmt: 2.0 ** -10


@overload(add_l2, inline="always")
def _add_l2(g, l2, p):
    if isinstance(l2, types.NoneType):
        return lambda g, l2, p: g
    return lambda g, l2, p: g + l2 * p


@overload(decode_state, inline="always")
def _decode_state(x):
    if x == types.float32:
        return lambda x: x
    return lambda x: bf16_to_float(x)


@overload(encode_state, inline="always")
def _encode_state(state, value, rand16):
    if _is_f32(state):
        return lambda state, value, rand16: value
    return lambda state, value, rand16: float_to_bf16_stochastic(value, rand16)


@overload(state_random, inline="always")
def _state_random(state, j, seed):
    if _is_f32(state):
        return lambda state, j, seed: np.uint32(0)
    return lambda state, j, seed: random32(j, seed)
