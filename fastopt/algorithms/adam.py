"""Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019), as torch.optim.Adam/AdamW.

    m <- m + (1 - beta1) (g - m);   v <- beta2 v + (1 - beta2) g^2;   vmax <- max(vmax, v)
    p <- p - lr / (1 - beta1^k) * m / (sqrt(v or vmax) / sqrt(1 - beta2^k) + eps)
"""

from math import sqrt

from .._checks import check_betas, check_eps, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, beta1, beta2):
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    inv_bc2_sqrt = 1.0 / sqrt(bias_correction2)
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2


def element(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, *, beta2, eps, amsgrad, step_size,
            inv_bc2_sqrt, one_minus_beta1, one_minus_beta2):
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    v = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = max(max_exp_avg_sq, v)
        v = max_exp_avg_sq
    p = p - step_size * (exp_avg / (sqrt(v) * inv_bc2_sqrt + eps))


DEFINITION = Definition(
    name="adam",
    doc=__doc__,
    classes=(
        ClassSpec("Adam", "Adam: L2 weight decay added to the gradient; torch.optim.Adam's "
                          "defaults."),
        ClassSpec("AdamW", "AdamW: decoupled weight decay p <- p * (1 - lr * wd); "
                           "torch.optim.AdamW's defaults.",
                  defaults={"weight_decay": 1e-2}, fixed={"decoupled_weight_decay": True}),
    ),
    hypers=(
        Hyper("betas", (0.9, 0.999), check_betas, slots=("beta1", "beta2")),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("amsgrad", False, bool, slots=("amsgrad",), flag=True),
        Hyper("maximize", False, bool),
        Hyper("decoupled_weight_decay", False, bool),
    ),
    state=(State("exp_avg"), State("exp_avg_sq", sign="nonnegative"),
           State("max_exp_avg_sq", when="amsgrad", sign="nonnegative")),
    decay="choice",
    prologue=prologue,
    element=element,
    lr_default=1e-3,
    torch_twin={
        "Adam": TorchTwin("Adam", dict(
            amsgrad=False, maximize=False, foreach=None, capturable=False,
            differentiable=False, decoupled_weight_decay=False, fused=None),
            betas_same_kind=True),
        "AdamW": TorchTwin("AdamW", dict(
            amsgrad=False, maximize=False, foreach=None, capturable=False,
            differentiable=False, fused=None), betas_same_kind=True),
    },
)
