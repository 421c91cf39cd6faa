"""Adagrad (Duchi et al. 2011) with torch.optim.Adagrad's lr_decay and initial accumulator.

    sum <- sum + g^2;   p <- p - lr / (1 + (k - 1) lr_decay) * g / (sqrt(sum) + eps)
"""

from math import sqrt

from .._checks import check_eps, check_real, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, lr_decay):
    clr = lr / (1.0 + (step - 1.0) * lr_decay)


def element(p, g, sum, *, eps, clr):
    sum = sum + g * g
    p = p - clr * (g / (sqrt(sum) + eps))


DEFINITION = Definition(
    name="adagrad",
    doc=__doc__,
    classes=(ClassSpec("Adagrad", "Adagrad with torch's lr_decay and "
                                  "initial_accumulator_value."),),
    hypers=(
        Hyper("lr_decay", 0.0, lambda v: check_real("lr_decay", v), slots=("lr_decay",)),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("initial_accumulator_value", 0.0,
              lambda v: check_real("initial_accumulator_value", v)),
        Hyper("eps", 1e-10, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("maximize", False, bool),
    ),
    state=(State("sum", init="initial_accumulator_value", aliases=("state_sum",),
                 sign="nonnegative"),),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=1e-2,
    torch_twin={"Adagrad": TorchTwin("Adagrad", dict(foreach=None, maximize=False,
                                                        differentiable=False, fused=None),
                                      state_at_construction=True)},
)
