"""NAdam (Dozat 2016) with torch's momentum schedule, as torch.optim.NAdam.

    mu_k = beta1 (1 - 0.5 * 0.96^(k psi));   mu_product <- mu_product * mu_k  (a scalar)
    m <- m + (1 - beta1) (g - m);   v <- beta2 v + (1 - beta2) g^2
    d = sqrt(v / (1 - beta2^k)) + eps
    p <- p - lr (1 - mu_k) / (1 - mu_product) g / d
           - lr mu_k+1 / (1 - mu_product mu_k+1) m / d
"""

from math import sqrt

from .._checks import check_betas, check_eps, check_real, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, Scalar, State, TorchTwin


def prologue(step, lr, beta1, beta2, momentum_decay, mu_product):
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1.0) * momentum_decay))
    mu_product = mu_product * mu
    grad_step = lr * (1.0 - mu) / (1.0 - mu_product)
    avg_step = lr * mu_next / (1.0 - mu_product * mu_next)
    bias_correction2 = 1.0 - beta2**step
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2


def element(p, g, exp_avg, exp_avg_sq, *, beta2, eps, grad_step, avg_step, bias_correction2,
            one_minus_beta1, one_minus_beta2):
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    denom = sqrt(exp_avg_sq / bias_correction2) + eps
    p = p - grad_step * (g / denom)
    p = p - avg_step * (exp_avg / denom)


DEFINITION = Definition(
    name="nadam",
    doc=__doc__,
    classes=(ClassSpec("NAdam", "NAdam with torch's momentum_decay schedule."),),
    hypers=(
        Hyper("betas", (0.9, 0.999), check_betas, slots=("beta1", "beta2")),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("momentum_decay", 4e-3, lambda v: check_real("momentum_decay", v),
              slots=("momentum_decay",)),
        Hyper("decoupled_weight_decay", False, bool),
        Hyper("maximize", False, bool),
    ),
    state=(State("exp_avg"), State("exp_avg_sq", sign="nonnegative")),
    scalars=(Scalar("mu_product", 1.0),),
    decay="choice",
    prologue=prologue,
    element=element,
    lr_default=2e-3,
    torch_twin={"NAdam": TorchTwin("NAdam", dict(
        maximize=False, foreach=None, capturable=False, differentiable=False,
        decoupled_weight_decay=False))},
)
