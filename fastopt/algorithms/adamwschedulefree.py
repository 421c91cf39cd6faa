"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), as schedulefree's
AdamWScheduleFree.

The params hold y while training (``train()``) and x for evaluation (``eval()``):
    y = (1 - beta1) z + beta1 x
    train(): p <- lerp(p, z, 1 - beta1);   eval(): p <- lerp(p, z, 1 - 1/beta1)
Step k (lr_k: the schedule's lr times its own linear warm-up min(1, k / warmup_steps)):
    lr_max <- max(lr_max, lr_k);   w = k^r lr_max^weight_lr_power
    weight_sum <- weight_sum + w;   c = w / weight_sum;   v <- beta2 v + (1 - beta2) g^2
    u = g / (sqrt(v / (1 - beta2^k)) + eps) + weight_decay y      (decay taken at y)
    y <- lerp(y, z, c) + lr_k (beta1 (1 - c) - 1) u;   z <- z - lr_k u
weight_sum and lr_max are per-step scalars; z starts as a copy of the params.
"""

import numbers
from math import sqrt

from .._checks import check_eps, check_real, check_weight_decay, kernel_eps
from ._spec import INIT_PARAMS, ClassSpec, Definition, Hyper, Modes, Scalar, State


def prologue(step, lr, beta1, beta2, warmup_steps, r, weight_lr_power, weight_sum, lr_max):
    scheduled_lr = lr
    if step <= warmup_steps:
        scheduled_lr = lr * (step / warmup_steps)
    lr_max = max(scheduled_lr, lr_max)
    weight = step**r * lr_max**weight_lr_power
    weight_sum = weight_sum + weight
    ckp1 = 0.0
    if weight_sum != 0.0:
        ckp1 = weight / weight_sum
    lerp_from_start = abs(ckp1) < 0.5  # torch.lerp's two forms
    one_minus_ckp1 = 1.0 - ckp1
    y_step = scheduled_lr * (beta1 * (1.0 - ckp1) - 1.0)
    bias_correction2 = 1.0 - beta2**step
    one_minus_beta2 = 1.0 - beta2


def element(p, g, z, exp_avg_sq, *, beta2, eps, weight_decay, scheduled_lr, ckp1,
            one_minus_ckp1, lerp_from_start, y_step, bias_correction2, one_minus_beta2):
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    g = g / (sqrt(exp_avg_sq / bias_correction2) + eps)
    if weight_decay != 0.0:  # (as schedulefree: no term at 0, an inf param stays inf)
        g = g + weight_decay * p
    if lerp_from_start:
        p = p + ckp1 * (z - p)
    else:
        p = z - (z - p) * one_minus_ckp1
    p = p + y_step * g
    z = z - scheduled_lr * g


def _check_betas(betas) -> tuple[float, float]:
    """(beta1, beta2): beta1 in (0, 1) (eval() divides by it), beta2 in [0, 1)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    beta1 = check_real("beta", beta1, 0.0, 1.0, high_open=True,
                       message="Invalid beta parameter at index 0: {value}")
    if beta1 == 0.0:
        raise ValueError("Invalid beta parameter at index 0: 0.0 (eval() divides by beta1)")
    return beta1, check_real("beta", beta2, 0.0, 1.0, high_open=True,
                             message="Invalid beta parameter at index 1: {value}")


def _check_warmup(value) -> int:
    """An integer >= 0 (any integral type, or an integral float)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or (
            isinstance(value, float) and value.is_integer())):
        raise ValueError(f"Invalid warmup_steps value: {value!r} (an integer >= 0)")
    return int(check_real("warmup_steps", float(value), high_open=True))


DEFINITION = Definition(
    name="adamwschedulefree",
    doc=__doc__,
    classes=(ClassSpec("AdamWScheduleFree", "Schedule-Free AdamW (train() before steps)."),),
    hypers=(
        Hyper("betas", (0.9, 0.999), _check_betas, slots=("beta1", "beta2")),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("warmup_steps", 0, _check_warmup, slots=("warmup_steps",)),
        Hyper("r", 0.0, lambda v: check_real("r", v, high_open=True), slots=("r",)),
        Hyper("weight_lr_power", 2.0,
              lambda v: check_real("weight_lr_power", v, high_open=True),
              slots=("weight_lr_power",)),
    ),
    state=(State("z", init=INIT_PARAMS, quantizable=False),
           State("exp_avg_sq", sign="nonnegative")),
    scalars=(Scalar("weight_sum", 0.0, group=True), Scalar("lr_max", -1.0, group=True)),
    decay="own",
    prologue=prologue,
    element=element,
    lr_default=2.5e-3,
    modes=Modes("z", to_train=lambda h: 1.0 - h["betas"][0],
                to_eval=lambda h: 1.0 - 1.0 / h["betas"][0]),
    group_step="k",
    group_keys={"foreach": None, "scheduled_lr": 0.0},
)
