"""Adamax (Kingma & Ba 2015, section 7.1), as torch.optim.Adamax.

    m <- m + (1 - beta1) (g - m);   u <- max(beta2 u, |g| + eps)
    p <- p - lr / (1 - beta1^k) * m / u
"""

from .._checks import check_betas, check_eps, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, beta1):
    clr = lr / (1.0 - beta1**step)
    one_minus_beta1 = 1.0 - beta1


def element(p, g, exp_avg, exp_inf, *, beta2, eps, clr, one_minus_beta1):
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_inf = max(beta2 * exp_inf, abs(g) + eps)
    p = p - clr * (exp_avg / exp_inf)


DEFINITION = Definition(
    name="adamax",
    doc=__doc__,
    classes=(ClassSpec("Adamax", "Adamax: Adam with the infinity norm."),),
    hypers=(
        Hyper("betas", (0.9, 0.999), check_betas, slots=("beta1", "beta2")),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("exp_avg"), State("exp_inf", sign="nonnegative")),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=2e-3,
    torch_twin={"Adamax": TorchTwin("Adamax", dict(
        foreach=None, maximize=False, differentiable=False, capturable=False))},
)
