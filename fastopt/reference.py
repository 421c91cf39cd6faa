"""Float64 numpy one-step oracles: the truth every backend is tested against.

Each function returns the new (params, *state) arrays for the k-th step (k = ``step`` >= 1) with
learning rate ``lr`` (already taken from the schedule at k - 1). Formulas as ``torch.optim``
(Kingma & Ba 2015, Loshchilov & Hutter 2019, Duchi et al. 2011, Zeiler 2012); names as in
``fastopt/cpu/*.py``.
"""

import numpy as np


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _l2(grad, weight_decay, params):
    """grad + weight_decay * params; as torch, no term at weight_decay 0 (an inf param
    stays inf rather than 0 * inf = NaN)."""
    return grad + weight_decay * params if weight_decay != 0.0 else grad


def _sign(x):
    """torch.sign: 1, -1, or 0 for +-0 and NaN (numpy's sign keeps NaN)."""
    return np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0))


def adam(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr, beta1=0.9,
         beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False,
         maximize=False):
    """Adam (decoupled=False, L2 added to the gradient) or AdamW (decoupled=True)."""
    params, grads, exp_avg, exp_avg_sq = _f64(params, grads, exp_avg, exp_avg_sq)
    grad = -grads if maximize else grads
    if decoupled:
        params = params * (1.0 - lr * weight_decay)
    else:
        grad = _l2(grad, weight_decay, params)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    v = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = np.maximum(np.asarray(max_exp_avg_sq, np.float64), exp_avg_sq)
        v = max_exp_avg_sq
    denom = np.sqrt(v) / np.sqrt(bias_correction2) + eps
    params = params - lr / bias_correction1 * exp_avg / denom
    return params, exp_avg, exp_avg_sq, max_exp_avg_sq


def adagrad(params, grads, state_sum, *, step, lr, lr_decay=0.0, eps=1e-10, weight_decay=0.0,
            maximize=False):
    """Adagrad with torch's lr_decay: clr = lr / (1 + (step - 1) * lr_decay)."""
    params, grads, state_sum = _f64(params, grads, state_sum)
    grad = _l2(-grads if maximize else grads, weight_decay, params)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    state_sum = state_sum + grad * grad
    params = params - clr * grad / (np.sqrt(state_sum) + eps)
    return params, state_sum


def adadelta(params, grads, square_avg, acc_delta, *, step, lr, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False):
    """Adadelta (Zeiler 2012) with torch's lr factor on the update."""
    del step  # Adadelta has no step-dependent term beyond the schedule
    params, grads, square_avg, acc_delta = _f64(params, grads, square_avg, acc_delta)
    grad = _l2(-grads if maximize else grads, weight_decay, params)
    square_avg = rho * square_avg + (1.0 - rho) * grad * grad
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * grad
    acc_delta = rho * acc_delta + (1.0 - rho) * delta * delta
    params = params - lr * delta
    return params, square_avg, acc_delta


def sgd(params, grads, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False):
    """SGD as torch.optim.SGD: the momentum buffer starts as the first (decayed) gradient
    (``momentum_buffer=None``), then b <- momentum b + (1 - dampening) g; Nesterov uses
    g + momentum b. Returns (params, momentum_buffer) (None without momentum)."""
    del step  # no step-dependent term beyond the schedule
    params, grads = _f64(params, grads)
    grad = _l2(-grads if maximize else grads, weight_decay, params)
    buf = None
    if momentum != 0.0:
        if momentum_buffer is None:
            buf = grad
        else:
            buf = momentum * np.asarray(momentum_buffer, np.float64) + (1.0 - dampening) * grad
        grad = grad + momentum * buf if nesterov else buf
    return params - lr * grad, buf


def rmsprop(params, grads, square_avg, momentum_buffer=None, grad_avg=None, *, step, lr,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False):
    """RMSprop as torch.optim.RMSprop: returns (params, square_avg, momentum_buffer, grad_avg)
    (None for the buffers the options do not use)."""
    del step
    params, grads, square_avg = _f64(params, grads, square_avg)
    grad = _l2(-grads if maximize else grads, weight_decay, params)
    square_avg = alpha * square_avg + (1.0 - alpha) * grad * grad
    if centered:
        grad_avg = np.asarray(grad_avg, np.float64) + (1.0 - alpha) * (grad - grad_avg)
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0.0:
        momentum_buffer = momentum * np.asarray(momentum_buffer, np.float64) + grad / avg
        params = params - lr * momentum_buffer
    else:
        params = params - lr * grad / avg
    return params, square_avg, momentum_buffer, grad_avg


def adamax(params, grads, exp_avg, exp_inf, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
           weight_decay=0.0, maximize=False):
    """Adamax as torch.optim.Adamax: u <- max(beta2 u, |g| + eps); p -= lr/(1-b1^k) m / u."""
    params, grads, exp_avg, exp_inf = _f64(params, grads, exp_avg, exp_inf)
    grad = _l2(-grads if maximize else grads, weight_decay, params)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_inf = np.maximum(beta2 * exp_inf, np.abs(grad) + eps)
    params = params - lr / (1.0 - beta1**step) * exp_avg / exp_inf
    return params, exp_avg, exp_inf


def nadam(params, grads, exp_avg, exp_avg_sq, mu_product, *, step, lr, beta1=0.9,
          beta2=0.999, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
          decoupled_weight_decay=False, maximize=False):
    """NAdam as torch.optim.NAdam; ``mu_product`` is the product of the mu's before this step.
    Returns (params, exp_avg, exp_avg_sq, mu_product)."""
    params, grads, exp_avg, exp_avg_sq = _f64(params, grads, exp_avg, exp_avg_sq)
    grad = -grads if maximize else grads
    if decoupled_weight_decay:
        params = params * (1.0 - lr * weight_decay)
    else:
        grad = _l2(grad, weight_decay, params)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = mu_product * mu
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    denom = np.sqrt(exp_avg_sq / (1.0 - beta2**step)) + eps
    params = params - lr * (1.0 - mu) / (1.0 - mu_product) * grad / denom
    params = params - lr * mu_next / (1.0 - mu_product * mu_next) * exp_avg / denom
    return params, exp_avg, exp_avg_sq, mu_product


def radam(params, grads, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
          weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    """RAdam as torch.optim.RAdam: Adam's moments; the adaptive step, rectified, only once
    the SMA length rho_k exceeds 5. Returns (params, exp_avg, exp_avg_sq)."""
    params, grads, exp_avg, exp_avg_sq = _f64(params, grads, exp_avg, exp_avg_sq)
    grad = -grads if maximize else grads
    if decoupled_weight_decay:
        params = params * (1.0 - lr * weight_decay)
    else:
        grad = _l2(grad, weight_decay, params)
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad**2
    m_hat = exp_avg / (1.0 - beta1**step)
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * step * beta2**step / (1.0 - beta2**step)
    if rho > 5.0:
        rect = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        adaptive = np.sqrt(1.0 - beta2**step) / (np.sqrt(exp_avg_sq) + eps)
        params = params - lr * rect * m_hat * adaptive
    else:
        params = params - lr * m_hat
    return params, exp_avg, exp_avg_sq


def rprop(params, grads, prev, step_size, *, step, lr, etas=(0.5, 1.2),
          step_sizes=(1e-6, 50.0), maximize=False):
    """Rprop as torch.optim.Rprop (``step_size`` starts at the first lr; ``lr`` and ``step``
    are not used). Returns (params, prev, step_size)."""
    params, grads, prev, step_size = _f64(params, grads, prev, step_size)
    grad = -grads if maximize else grads
    same = grad * prev
    factor = np.where(same > 0, etas[1], np.where(same < 0, etas[0], 1.0))
    step_size = np.clip(step_size * factor, step_sizes[0], step_sizes[1])
    grad = np.where(same < 0, 0.0, grad)
    return params - _sign(grad) * step_size, grad, step_size


def asgd(params, grads, ax, eta, mu, *, step, lr, lambd=1e-4, alpha=0.75, t0=1e6,
         weight_decay=0.0, maximize=False):
    """ASGD as torch.optim.ASGD: this step uses ``eta`` and ``mu`` as the previous step left
    them (at step 1: eta = lr, mu = 1) and leaves new ones computed from this step's lr.
    Returns (params, ax, eta, mu)."""
    params, grads, ax = _f64(params, grads, ax)
    grad = _l2(-grads if maximize else grads, weight_decay, params)
    if step == 1:
        eta, mu = lr, 1.0
    params = params * (1.0 - lambd * eta) - eta * grad
    ax = params.copy() if mu == 1.0 else ax + mu * (params - ax)
    return (params, ax, lr / (1.0 + lambd * lr * step) ** alpha,
            1.0 / max(1.0, step - t0))


def lion(params, grads, exp_avg, *, step, lr, betas=(0.9, 0.99), weight_decay=0.0,
         maximize=False):
    """Lion as lion-pytorch: p *= 1 - lr wd; p -= lr sign(interpolated momentum).
    Returns (params, exp_avg)."""
    params, grads, exp_avg = _f64(params, grads, exp_avg)
    grad = -grads if maximize else grads
    beta1, beta2 = betas
    params = params * (1.0 - lr * weight_decay)
    params = params - lr * _sign(beta1 * exp_avg + (1.0 - beta1) * grad)
    return params, beta2 * exp_avg + (1.0 - beta2) * grad


def ademamix(params, grads, exp_avg, exp_avg_slow, exp_avg_sq, *, step, lr,
             betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha_beta3=None, eps=1e-8,
             weight_decay=0.0, maximize=False):
    """AdEMAMix, the paper's Algorithm 1 (decoupled decay, warm-ups at the 1-based step).
    Returns (params, exp_avg, exp_avg_slow, exp_avg_sq)."""
    params, grads, exp_avg, exp_avg_slow, exp_avg_sq = _f64(params, grads, exp_avg,
                                                            exp_avg_slow, exp_avg_sq)
    grad = -grads if maximize else grads
    beta1, beta2, beta3 = betas
    if t_alpha_beta3 is None:
        alpha_k, beta3_k = alpha, beta3
    else:
        if beta1 <= 0.0:  # (log(0): the schedule is undefined; pytorch-optimizer refuses it)
            raise ValueError("AdEMAMix's beta3 warm-up (t_alpha_beta3) needs beta1 > 0")
        alpha_k = min(step * alpha / t_alpha_beta3, alpha)
        f = step / t_alpha_beta3
        lb1, lb3 = np.log(beta1), np.log(beta3)
        beta3_k = min(np.exp(lb1 * lb3 / ((1 - f) * lb3 + f * lb1)), beta3)
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad**2
    exp_avg_slow = beta3_k * exp_avg_slow + (1.0 - beta3_k) * grad
    m_hat = exp_avg / (1.0 - beta1**step)
    v_hat = exp_avg_sq / (1.0 - beta2**step)
    params = params - lr * ((m_hat + alpha_k * exp_avg_slow) / (np.sqrt(v_hat) + eps)
                            + weight_decay * params)
    return params, exp_avg, exp_avg_slow, exp_avg_sq


def adamwschedulefree(params, grads, z, exp_avg_sq, weight_sum, lr_max, *, step, lr,
                      betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                      weight_lr_power=2.0):
    """Schedule-Free AdamW as schedulefree's, in train mode (``params`` hold y; ``lr`` is
    the schedule's, before the optimizer's own warm-up). Returns (params, z, exp_avg_sq,
    weight_sum, lr_max)."""
    y, grads, z, exp_avg_sq = _f64(params, grads, z, exp_avg_sq)
    beta1, beta2 = betas
    lr_k = lr * min(1.0, step / warmup_steps) if warmup_steps else lr
    lr_max = max(lr_max, lr_k)
    weight = step**r * lr_max**weight_lr_power
    weight_sum = weight_sum + weight
    c = weight / weight_sum if weight_sum else 0.0
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grads**2
    u = _l2(grads / (np.sqrt(exp_avg_sq / (1.0 - beta2**step)) + eps), weight_decay, y)
    x = (y - (1.0 - beta1) * z) / beta1  # the average the params would show in eval mode
    z = z - lr_k * u
    x = (1.0 - c) * x + c * z
    return (1.0 - beta1) * z + beta1 * x, z, exp_avg_sq, weight_sum, lr_max


def lamb(params, grads, exp_avg, exp_avg_sq, *, step, lr, segments, beta1=0.9, beta2=0.999,
         eps=1e-6, weight_decay=0.0, maximize=False):
    """LAMB as optax.lamb: Adam's bias-corrected update plus weight_decay * p, scaled per
    tensor by ||p|| / ||u|` (1 where either norm is 0). ``segments``: (offset, size) of each
    tensor in the flat buffers; elements outside them do not change."""
    params, grads, old_m, old_v = _f64(params, grads, exp_avg, exp_avg_sq)
    grad = -grads if maximize else grads
    exp_avg = beta1 * old_m + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * old_v + (1.0 - beta2) * grad * grad
    m_hat = exp_avg / (1.0 - beta1**step)
    v_hat = exp_avg_sq / (1.0 - beta2**step)
    update = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * params
    new = params.copy()
    inside = np.zeros(params.shape, dtype=bool)
    for offset, size in segments:
        part = slice(offset, offset + size)
        inside[part] = True
        p_norm = np.linalg.norm(params[part])
        u_norm = np.linalg.norm(update[part])
        ratio = p_norm / u_norm if p_norm != 0 and u_norm != 0 else 1.0  # (NaN: NaN)
        new[part] = params[part] - lr * ratio * update[part]
    exp_avg = np.where(inside, exp_avg, old_m)
    exp_avg_sq = np.where(inside, exp_avg_sq, old_v)
    return new, exp_avg, exp_avg_sq


def muon(params, grads, momentum_buffer, *, step, lr, segments, weight_decay=0.1,
         momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7,
         ns_steps=5, adjust_lr_fn=None):
    """Muon as torch.optim.Muon's code, in float64 throughout (torch runs Newton-Schulz in
    bfloat16): buf = momentum buf + (1 - momentum) g; d = (1 - momentum) g + momentum buf
    with nesterov, else buf; d / max(||d||_F, eps) through ``ns_steps`` quintic steps
    X <- a X + (b A + c A^2) X, A = X X^T (on the transpose of a tall matrix); then
    p (1 - lr weight_decay) - lr r O, r = sqrt(max(1, rows / cols)) or, for
    "match_rms_adamw", 0.2 sqrt(max(rows, cols)). ``segments``: (offset, (rows, cols)) of
    each matrix; ``step`` is unused (Muon has no step-dependent term)."""
    del step
    params, grads, old_buf = _f64(params, grads, momentum_buffer)
    a, b, c = ns_coefficients
    buf = momentum * old_buf + (1.0 - momentum) * grads
    direction = (1.0 - momentum) * grads + momentum * buf if nesterov else buf
    new, new_buf = params.copy(), old_buf.copy()
    for offset, (rows, cols) in segments:
        part = slice(offset, offset + rows * cols)
        new_buf[part] = buf[part]
        x = direction[part].reshape(rows, cols)
        if rows > cols:
            x = x.T
        x = x / max(np.sqrt(np.sum(x * x)), eps)
        for _ in range(ns_steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        if rows > cols:
            x = x.T
        if adjust_lr_fn == "match_rms_adamw":
            ratio = 0.2 * np.sqrt(max(rows, cols))
        else:
            ratio = np.sqrt(max(1.0, rows / cols))
        new[part] = params[part] * (1.0 - lr * weight_decay) - lr * ratio * x.ravel()
    return new, new_buf


#: finfo(float32).eps: Adafactor's eps1 for float32 params when it is None
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _lerp(start, end, weight: float):
    """torch.lerp's formula: from the end for weights of 1/2 or more, so an infinite end at
    weight 1 (Adafactor's first step) gives NaN, as in torch, not inf."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def adafactor(params, grads, row_var, col_var, variance, *, step, lr, segments,
              beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0,
              maximize=False, param_eps=FLOAT32_EPS):
    """Adafactor as torch.optim.Adafactor 2.13's code, in float64 (the oracle fastopt's
    Adafactor kernel is checked against). Per tensor, step k: w = k^beta2_decay,
    rho = min(lr, 1/sqrt(k)), alpha = max(eps2, ||p|| / sqrt(numel)) rho (p before the
    decay), p *= 1 - lr wd.
    A tensor of 2 or more dims, as (batch, R, C): row_var = lerp(row_var, mean_c g^2, w),
    col_var = lerp(col_var, mean_r g^2, w), est = row_var col_var / max(mean_r row_var,
    eps1); others: variance = lerp(variance, g^2, w), est = variance. u = g /
    sqrt(max(est, eps1^2)); p -= alpha / max(1, ||u|| / (sqrt(numel) d)) u. eps1 None is
    ``param_eps`` (torch: finfo(param dtype).eps).

    ``segments``: (offset, shape) of each tensor in the flat params. The state is packed
    in the same order, each tensor taking only what it has: ``row_var`` batch * R values,
    ``col_var`` batch * C, ``variance`` numel (tensors of fewer than 2 dims).
    Returns (params, row_var, col_var, variance)."""
    params, grads = _f64(params, grads)
    row_var, col_var, variance = (np.array(a, dtype=np.float64)  # (copies: updated in place)
                                  for a in (row_var, col_var, variance))
    eps1 = param_eps if eps1 is None else eps1
    grad = -grads if maximize else grads
    one_minus_beta2 = step**beta2_decay
    rho = min(lr, 1.0 / np.sqrt(step))
    new = params.copy()
    rows_at = cols_at = var_at = 0
    for offset, shape in segments:
        numel = int(np.prod(shape))
        part = slice(offset, offset + numel)
        p, g = params[part], grad[part]
        alpha = max(eps2, np.sqrt(np.sum(p * p)) / np.sqrt(numel)) * rho
        p = p * (1.0 - lr * weight_decay)
        if len(shape) >= 2:
            batch, rows, cols = int(np.prod(shape[:-2])), shape[-2], shape[-1]
            g3 = g.reshape(batch, rows, cols)
            r = row_var[rows_at:rows_at + batch * rows].reshape(batch, rows)
            c = col_var[cols_at:cols_at + batch * cols].reshape(batch, cols)
            r[...] = _lerp(r, np.mean(g3 * g3, axis=2), one_minus_beta2)
            c[...] = _lerp(c, np.mean(g3 * g3, axis=1), one_minus_beta2)
            row_mean = np.maximum(np.mean(r, axis=1), eps1)
            est = (r[:, :, None] * c[:, None, :] / row_mean[:, None, None]).ravel()
            rows_at, cols_at = rows_at + batch * rows, cols_at + batch * cols
        else:
            v = variance[var_at:var_at + numel]
            v[...] = _lerp(v, g * g, one_minus_beta2)
            est = v
            var_at += numel
        u = g / np.sqrt(np.maximum(est, eps1 * eps1))
        denom = max(1.0, np.sqrt(np.sum(u * u)) / (np.sqrt(numel) * d))
        new[part] = p - alpha / denom * u
    return new, row_var, col_var, variance
