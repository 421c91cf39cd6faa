"""Adam / AdamW update kernel (mirrors kernels/adam.cu).

Per element, with grad_factor = grad_mult (1/loss scale x clip coefficient), negated if
maximize, l2 = weight_decay for Adam (0 for AdamW) and
decay = 1 - lr * weight_decay for AdamW (1 for Adam)::

    grad  = grad_factor * g + l2 * p
    m     = m + (1 - beta1) * (grad - m)
    v     = beta2 * v + (1 - beta2) * grad^2
    vmax  = max(vmax, v)                      (amsgrad; v := vmax below)
    p     = decay * p - step_size * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)

with step_size = lr / (1 - beta1^k), lr = schedule(k - 1) * lr_scale, k the 1-based step.
"""

import math

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
from .convert import LOW16, SHIFT8, SHIFT16, step_seed
from .schedule import lr_at


@helper
def adam_element(i, params, grads, master, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad,
                 grad_factor, l2, decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                 inv_bc2_sqrt, eps, fmt, seed):
    """The per-element Adam math at index i; every scalar is float32."""
    param = load_param(params, master, i)
    grad = grad_factor * load_grad(grads, i, fmt) + l2 * param
    m = decode_state(exp_avg[i])
    m = m + one_minus_beta1 * (grad - m)
    v = beta2 * decode_state(exp_avg_sq[i]) + one_minus_beta2 * (grad * grad)
    rand = state_random(exp_avg, i, seed)  # bf16 state rounding bits (none for float32)
    exp_avg[i] = encode_state(exp_avg, m, rand & LOW16)
    exp_avg_sq[i] = encode_state(exp_avg_sq, v, rand >> SHIFT16)
    if amsgrad:
        v = max(decode_state(max_exp_avg_sq[i]), v)
        max_exp_avg_sq[i] = encode_state(max_exp_avg_sq, v, (rand >> SHIFT8) & LOW16)
    denom = np.sqrt(v) * inv_bc2_sqrt + eps
    store_param(params, master, i, decay * param - step_size * (m / denom), fmt)


@kernel
def adam(params, grads, master, exp_avg, exp_avg_sq, max_exp_avg_sq, table, step, lr_scale,
         grad_mult, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, fmt,
         parallel):
    """One Adam(W) step k = ``step`` over the whole buffer; returns the lr it used."""
    lr = lr_at(table, step - 1.0) * lr_scale
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = np.float32(lr / bias_correction1)
    inv_bc2_sqrt = np.float32(1.0 / math.sqrt(bias_correction2))
    grad_factor = np.float32((-1.0 if maximize else 1.0) * grad_mult)
    l2 = np.float32(0.0 if decoupled else weight_decay)
    decay = np.float32(1.0 - lr * weight_decay if decoupled else 1.0)
    one_minus_beta1 = np.float32(1.0 - beta1)
    one_minus_beta2 = np.float32(1.0 - beta2)
    beta2_32 = np.float32(beta2)
    eps32 = np.float32(eps)
    seed = step_seed(step)
    if parallel:
        for i in prange(params.shape[0]):
            adam_element(i, params, grads, master, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad,
                         grad_factor, l2, decay, one_minus_beta1, beta2_32, one_minus_beta2,
                         step_size, inv_bc2_sqrt, eps32, fmt, seed)
    else:
        for i in range(params.shape[0]):
            adam_element(i, params, grads, master, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad,
                         grad_factor, l2, decay, one_minus_beta1, beta2_32, one_minus_beta2,
                         step_size, inv_bc2_sqrt, eps32, fmt, seed)
    return lr
