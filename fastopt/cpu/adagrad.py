"""Adagrad update kernel (mirrors kernels/adagrad.cu).

Per element, with grad_factor = grad_mult (1/loss scale x clip coefficient), negated if
maximize::

    grad = grad_factor * g + weight_decay * p
    sum  = sum + grad^2
    p    = p - clr * grad / (sqrt(sum) + eps)

with clr = lr / (1 + (k - 1) * lr_decay), lr = schedule(k - 1) * lr_scale, k the 1-based step.
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
from .convert import LOW16, step_seed
from .schedule import lr_at


@helper
def adagrad_element(i, params, grads, master, state_sum, grad_factor, weight_decay, clr, eps,
                    fmt, seed):
    """The per-element Adagrad math at index i; every scalar is float32."""
    param = load_param(params, master, i)
    grad = grad_factor * load_grad(grads, i, fmt) + weight_decay * param
    s = decode_state(state_sum[i]) + grad * grad
    state_sum[i] = encode_state(state_sum, s, state_random(state_sum, i, seed) & LOW16)
    store_param(params, master, i, param - clr * (grad / (np.sqrt(s) + eps)), fmt)


@kernel
def adagrad(params, grads, master, state_sum, table, step, lr_scale, grad_mult, lr_decay, eps,
            weight_decay, maximize, fmt, parallel):
    """One Adagrad step k = ``step`` over the whole buffer; returns the lr it used."""
    lr = lr_at(table, step - 1.0) * lr_scale
    clr = np.float32(lr / (1.0 + (step - 1.0) * lr_decay))
    grad_factor = np.float32((-1.0 if maximize else 1.0) * grad_mult)
    weight_decay32 = np.float32(weight_decay)
    eps32 = np.float32(eps)
    seed = step_seed(step)
    if parallel:
        for i in prange(params.shape[0]):
            adagrad_element(i, params, grads, master, state_sum, grad_factor, weight_decay32, clr,
                            eps32, fmt, seed)
    else:
        for i in range(params.shape[0]):
            adagrad_element(i, params, grads, master, state_sum, grad_factor, weight_decay32, clr,
                            eps32, fmt, seed)
    return lr
