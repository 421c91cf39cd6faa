"""RAdam (Liu et al. 2019), the variance-rectified Adam, as torch.optim.RAdam.

    m <- m + (1 - beta1) (g - m);   v <- beta2 v + (1 - beta2) g^2
    rho_inf = 2 / (1 - beta2) - 1;   rho_k = rho_inf - 2 k beta2^k / (1 - beta2^k)
    rho_k > 5:  r = sqrt((rho_k - 4)(rho_k - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_k))
                p <- p - lr m / (1 - beta1^k) sqrt(1 - beta2^k) / (sqrt(v) + eps) r
    otherwise:  p <- p - lr m / (1 - beta1^k)
The branch is taken once per step (rho_k depends on k alone), never per element.
"""

from math import sqrt

from .._checks import check_betas, check_eps, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, beta1, beta2):
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    root_bias_correction2 = sqrt(bias_correction2)
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * step * beta2**step / bias_correction2
    rectify = rho > 5.0
    rect = 0.0
    if rectify:
        rect_inf = (rho_inf - 4.0) * (rho_inf - 2.0) / rho_inf
        rect = sqrt((rho - 4.0) * (rho - 2.0) / rho / rect_inf)
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2


def element(p, g, exp_avg, exp_avg_sq, *, lr, beta2, eps, bias_correction1,
            root_bias_correction2, rectify, rect, one_minus_beta1, one_minus_beta2):
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    corrected = exp_avg / bias_correction1
    if rectify:
        p = p - corrected * lr * (root_bias_correction2 / (sqrt(exp_avg_sq) + eps)) * rect
    else:
        p = p - corrected * lr


DEFINITION = Definition(
    name="radam",
    doc=__doc__,
    classes=(ClassSpec("RAdam", "RAdam (rectified Adam) with torch's options."),),
    hypers=(
        Hyper("betas", (0.9, 0.999), check_betas, slots=("beta1", "beta2")),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("decoupled_weight_decay", False, bool),
        Hyper("maximize", False, bool),
    ),
    state=(State("exp_avg"), State("exp_avg_sq", sign="nonnegative")),
    decay="choice",
    prologue=prologue,
    element=element,
    lr_default=1e-3,
    torch_twin={"RAdam": TorchTwin("RAdam", dict(
        maximize=False, foreach=None, capturable=False, differentiable=False,
        decoupled_weight_decay=False))},
)
