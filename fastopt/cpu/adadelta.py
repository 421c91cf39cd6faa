"""Adadelta update kernel (mirrors kernels/adadelta.cu).

Per element, with grad_factor = grad_mult (1/loss scale x clip coefficient), negated if
maximize::

    grad  = grad_factor * g + weight_decay * p
    sq    = rho * sq + (1 - rho) * grad^2
    delta = sqrt(acc + eps) / sqrt(sq + eps) * grad
    acc   = rho * acc + (1 - rho) * delta^2
    p     = p - lr * delta

with lr = schedule(k - 1) * lr_scale, k the 1-based step.
"""

import numpy as np
from numba import prange

from ._jit import helper, kernel
from .access import (
    decode_state,
    encode_state,
    load_grad,
    load_param,
    state_random,
    store_param,
)
from .convert import LOW16, SHIFT16, step_seed
from .schedule import lr_at


@helper
def adadelta_element(i, params, grads, master, square_avg, acc_delta, grad_factor, weight_decay,
                     rho, one_minus_rho, eps, lr, fmt, seed):
    """The per-element Adadelta math at index i; every scalar is float32."""
    param = load_param(params, master, i)
    grad = grad_factor * load_grad(grads, i, fmt) + weight_decay * param
    sq = rho * decode_state(square_avg[i]) + one_minus_rho * (grad * grad)
    rand = state_random(square_avg, i, seed)  # bf16 state rounding bits (none for float32)
    square_avg[i] = encode_state(square_avg, sq, rand & LOW16)
    acc = decode_state(acc_delta[i])
    delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * grad
    acc_delta[i] = encode_state(acc_delta, rho * acc + one_minus_rho * (delta * delta),
                                rand >> SHIFT16)
    store_param(params, master, i, param - lr * delta, fmt)


@kernel
def adadelta(params, grads, master, square_avg, acc_delta, table, step, lr_scale, grad_mult,
             rho, eps, weight_decay, maximize, fmt, parallel):
    """One Adadelta step k = ``step`` over the whole buffer; returns the lr it used."""
    lr = lr_at(table, step - 1.0) * lr_scale
    grad_factor = np.float32((-1.0 if maximize else 1.0) * grad_mult)
    weight_decay32 = np.float32(weight_decay)
    rho32 = np.float32(rho)
    one_minus_rho = np.float32(1.0 - rho)
    eps32 = np.float32(eps)
    lr32 = np.float32(lr)
    seed = step_seed(step)
    if parallel:
        for i in prange(params.shape[0]):
            adadelta_element(i, params, grads, master, square_avg, acc_delta, grad_factor,
                             weight_decay32, rho32, one_minus_rho, eps32, lr32, fmt, seed)
    else:
        for i in range(params.shape[0]):
            adadelta_element(i, params, grads, master, square_avg, acc_delta, grad_factor,
                             weight_decay32, rho32, one_minus_rho, eps32, lr32, fmt, seed)
    return lr
