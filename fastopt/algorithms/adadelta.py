"""Adadelta (Zeiler 2012) with torch.optim.Adadelta's lr factor on the update.

    sq <- rho sq + (1 - rho) g^2;   delta = sqrt(acc + eps) / sqrt(sq + eps) * g
    acc <- rho acc + (1 - rho) delta^2;   p <- p - lr * delta
"""

from math import sqrt

from .._checks import check_eps, check_real, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, rho):
    one_minus_rho = 1.0 - rho


def element(p, g, square_avg, acc_delta, *, lr, rho, eps, one_minus_rho):
    square_avg = rho * square_avg + one_minus_rho * (g * g)
    delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
    acc_delta = rho * acc_delta + one_minus_rho * (delta * delta)
    p = p - lr * delta


DEFINITION = Definition(
    name="adadelta",
    doc=__doc__,
    classes=(ClassSpec("Adadelta", "Adadelta with torch's lr factor on the update."),),
    hypers=(
        Hyper("rho", 0.9, lambda v: check_real("rho", v, 0.0, 1.0), slots=("rho",)),
        Hyper("eps", 1e-6, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("square_avg", sign="nonnegative"), State("acc_delta", sign="nonnegative")),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=1.0,
    torch_twin={"Adadelta": TorchTwin("Adadelta", dict(
        foreach=None, maximize=False, differentiable=False, capturable=False),
        capturable_xla=False)},
)
