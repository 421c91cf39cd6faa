"""Adafactor (Shazeer & Stern 2018), as torch.optim.Adafactor 2.13's code: the math its
definition (``adafactor.py``) declares; the factored driver of ``fastopt.codegen`` calls it.

Per tensor, step k: w = k^beta2_decay, rho = min(lr, 1/sqrt(k)),
alpha = max(eps2, ||p|| / sqrt(numel)) rho (p before the decay), p *= 1 - lr wd.
A tensor of 2 or more dims, as (batch, R, C): row_var = lerp(row_var, mean_c g^2, w),
col_var = lerp(col_var, mean_r g^2, w), est = row_var col_var / max(mean_r row_var, eps1);
others: variance = lerp(variance, g^2, w), est = variance. u = g / sqrt(max(est, eps1^2));
p -= alpha / max(1, ||u|| / (sqrt(numel) d)) u.
"""

from math import sqrt


def prologue(step, lr, beta2_decay, eps1, eps2, d, weight_decay):
    one_minus_beta2 = step**beta2_decay
    beta2_t = 1.0 - one_minus_beta2
    rho = min(lr, 1.0 / sqrt(step))
    eps1_sq = eps1 * eps1
    decay = 1.0 - lr * weight_decay


def moment(v, sq, *, one_minus_beta2, beta2_t):
    # torch.lerp(v, sq, w): its two forms, exact at w = 1
    if one_minus_beta2 < 0.5:
        v = v + one_minus_beta2 * (sq - v)
    else:
        v = sq - (sq - v) * beta2_t


def estimate(row, col, row_mean, *, eps1):
    est = row * col / max(row_mean, eps1)


def direction(g, est, *, eps1_sq):
    u = 1.0 / sqrt(max(est, eps1_sq)) * g


def segment(param_sq, update_sq, numel, *, rho, eps2, d):
    alpha = max(eps2, sqrt(param_sq) / sqrt(numel)) * rho
    denom = max(1.0, sqrt(update_sq) / (sqrt(numel) * d))
    step_size = alpha / denom


def element(p, u, *, decay, step_size):
    p = p * decay
    p = p - step_size * u
