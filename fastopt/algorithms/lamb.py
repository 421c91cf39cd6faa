"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), as optax.lamb
(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, then the lr):

    m <- m + (1 - beta1) (g - m);   v <- beta2 v + (1 - beta2) g^2
    u = (m / (1 - beta1^k)) / (sqrt(v / (1 - beta2^k)) + eps) + weight_decay p
    per tensor: r = ||p|| / ||u||, or 1 where either norm is 0
    p <- p - lr r u
Two passes: the first updates m and v and sums p^2 and u^2 per tensor, the second applies u.
apex's FusedLAMB differs: it clips the gradients to a global norm first (max_grad_norm=1.0 by
default; here ``max_grad_norm`` is off unless set) and, unless ``use_nvlamb=True``, applies
no trust ratio to tensors without weight decay.
"""

from math import sqrt

from .._checks import check_betas, check_eps, check_weight_decay
from ._spec import ClassSpec, Definition, Hyper, State


def prologue(step, lr, beta1, beta2):
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2


def reduce(p, g, exp_avg, exp_avg_sq, *, beta2, eps, weight_decay, bias_correction1,
           bias_correction2, one_minus_beta1, one_minus_beta2):
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    denom = sqrt(exp_avg_sq / bias_correction2) + eps
    update = exp_avg / bias_correction1 / denom + weight_decay * p
    param_sq = p * p
    update_sq = update * update


def segment(param_sq, update_sq):
    trust_ratio = 1.0
    if param_sq != 0.0 and update_sq != 0.0:  # (a NaN norm gives a NaN ratio, as optax's)
        trust_ratio = sqrt(param_sq) / sqrt(update_sq)


def element(p, g, exp_avg, exp_avg_sq, *, lr, eps, weight_decay, bias_correction1,
            bias_correction2, trust_ratio):
    denom = sqrt(exp_avg_sq / bias_correction2) + eps
    update = exp_avg / bias_correction1 / denom + weight_decay * p
    p = p - lr * (trust_ratio * update)


DEFINITION = Definition(
    name="lamb",
    doc=__doc__,
    classes=(ClassSpec("LAMB", "LAMB: Adam scaled per tensor by ||p|| / ||u|| "
                               "(optax.lamb)."),),
    hypers=(
        Hyper("betas", (0.9, 0.999), check_betas, slots=("beta1", "beta2")),
        Hyper("eps", 1e-6, check_eps, slots=("eps",)),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("exp_avg"), State("exp_avg_sq", sign="nonnegative")),
    decay="own",
    prologue=prologue,
    element=element,
    lr_default=1e-3,
    reductions=("param_sq", "update_sq"),
    reduce=reduce,
    segment=segment,
)
