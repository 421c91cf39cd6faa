"""AdEMAMix (Pagliardini et al. 2024), the paper's Algorithm 1 with decoupled weight decay.

    m1 <- m1 + (1 - beta1) (g - m1);   v <- beta2 v + (1 - beta2) g^2
    m2 <- m2 + (1 - beta3_k) (g - m2)                        (the slow EMA, not debiased)
    d = sqrt(v) / sqrt(1 - beta2^k) + eps
    p <- p (1 - lr wd) - lr (m1 / (1 - beta1^k) + alpha_k m2) / d
With t_alpha_beta3 = T the warm-ups, evaluated at the 1-based step k:
    alpha_k = min(k alpha / T, alpha)
    beta3_k = min(exp(ln b1 ln b3 / ((1 - k/T) ln b3 + (k/T) ln b1)), beta3)
(T = None: alpha_k = alpha, beta3_k = beta3). As pytorch-optimizer 4.1.0's AdEMAMix with
``weight_decouple=True``.
"""

from math import exp, log, sqrt

from .._checks import check_eps, check_real, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State


def prologue(step, lr, beta1, beta2, beta3, alpha, t_alpha_beta3):
    bias_correction1 = 1.0 - beta1**step
    root_bias_correction2 = sqrt(1.0 - beta2**step)
    alpha_k = alpha
    beta3_k = beta3
    if t_alpha_beta3 > 0.0:  # 0.0: None (no warm-up)
        alpha_k = min(step * alpha / t_alpha_beta3, alpha)
        fraction = step / t_alpha_beta3
        log_beta1 = log(beta1)
        log_beta3 = log(beta3)
        mixed = (1.0 - fraction) * log_beta3 + fraction * log_beta1
        beta3_k = min(exp(log_beta1 * log_beta3 / mixed), beta3)
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2
    one_minus_beta3 = 1.0 - beta3_k


def element(p, g, exp_avg, exp_avg_slow, exp_avg_sq, *, lr, beta2, eps, bias_correction1,
            root_bias_correction2, alpha_k, one_minus_beta1, one_minus_beta2, one_minus_beta3):
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    exp_avg_slow = exp_avg_slow + one_minus_beta3 * (g - exp_avg_slow)
    denom = sqrt(exp_avg_sq) / root_bias_correction2 + eps
    p = p - lr * ((exp_avg / bias_correction1 + alpha_k * exp_avg_slow) / denom)


def _check_betas(betas) -> tuple[float, float, float]:
    try:
        beta1, beta2, beta3 = betas
    except (TypeError, ValueError):
        raise ValueError("betas must be a triple (beta1, beta2, beta3), got "
                         f"{betas!r}") from None
    return tuple(check_real("beta", b, 0.0, 1.0, high_open=True,
                            message=f"Invalid beta parameter at index {i}: {{value}}")
                 for i, b in enumerate((beta1, beta2, beta3)))


def _check_t(value):
    """None (no warm-up) or a number of steps > 0."""
    if value is None:
        return None
    message = "Invalid t_alpha_beta3 value: {value} (a number of steps > 0, or None)"
    steps = check_real("t_alpha_beta3", value, high_open=True, message=message)
    if steps == 0.0:
        raise ValueError(message.format(value=value))
    return steps


def _validate(h: dict) -> None:
    beta1, _, beta3 = h["betas"]
    if h["t_alpha_beta3"] is not None and (beta1 == 0.0 or beta3 == 0.0):
        raise ValueError("the beta3 warm-up (t_alpha_beta3) needs beta1 > 0 and beta3 > 0, "
                         f"got betas={h['betas']}")


DEFINITION = Definition(
    name="ademamix",
    doc=__doc__,
    classes=(ClassSpec("AdEMAMix", "AdEMAMix: Adam with a mixture of a fast and a slow EMA."),),
    hypers=(
        Hyper("betas", (0.9, 0.999, 0.9999), _check_betas, slots=("beta1", "beta2", "beta3")),
        Hyper("alpha", 5.0, lambda v: check_real("alpha", v, high_open=True),
              slots=("alpha",)),
        Hyper("t_alpha_beta3", None, _check_t, slots=("t_alpha_beta3",),
              to_kernel=lambda v: 0.0 if v is None else v),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("exp_avg"), State("exp_avg_slow"), State("exp_avg_sq", sign="nonnegative")),
    decay="decoupled",
    prologue=prologue,
    element=element,
    lr_default=1e-3,
    validate=_validate,
    decay_keys={"weight_decouple": True, "fixed_decay": False},
    saved_group_step="step",
)
