"""ASGD (Polyak & Juditsky 1992, with Bottou's step sizes), as torch.optim.ASGD.

    p <- p (1 - lambd eta) - eta g;   ax <- ax + mu (p - ax)   (ax <- p while mu = 1)
    then, for the next step:  eta <- lr / (1 + lambd lr k)^alpha;   mu <- 1 / max(1, k - t0)
eta and mu are per-step scalars. As in torch, eta starts at the lr of the first step and
step k uses the eta computed at the end of step k - 1: a changed lr shows one step late.
"""

import math

from .._checks import check_real, check_weight_decay
from ._spec import ClassSpec, Definition, Hyper, Scalar, State, TorchTwin


def prologue(step, lr, lambd, alpha, t0, eta, mu):
    if step == 1.0:
        eta = lr  # torch's eta starts at the lr of the param's first step
    eta_now = eta
    average = mu != 1.0
    mu_now = mu
    shrink = 1.0 - lambd * eta_now
    eta = lr / (1.0 + lambd * lr * step) ** alpha
    mu = 1.0 / max(1.0, step - t0)


def _finite(name: str):
    """Any finite real, as torch takes (a negative t0 averages from the start)."""
    def check(value):
        number = check_real(name, value, -math.inf, high_open=True)
        if not math.isfinite(number):
            raise ValueError(f"Invalid {name} value: {value}")
        return number
    return check


def element(p, g, ax, *, eta_now, mu_now, shrink, average):
    p = p * shrink
    p = p - eta_now * g
    if average:
        ax = ax + (p - ax) * mu_now
    else:
        ax = p


DEFINITION = Definition(
    name="asgd",
    doc=__doc__,
    classes=(ClassSpec("ASGD", "Averaged SGD with torch's step-size schedule."),),
    hypers=(
        Hyper("lambd", 1e-4, _finite("lambd"), slots=("lambd",)),
        Hyper("alpha", 0.75, _finite("alpha"), slots=("alpha",)),
        Hyper("t0", 1e6, _finite("t0"), slots=("t0",)),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("ax", quantizable=False),),
    scalars=(Scalar("eta", 0.0), Scalar("mu", 1.0)),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=1e-2,
    torch_twin={"ASGD": TorchTwin("ASGD", dict(
        foreach=None, maximize=False, differentiable=False, capturable=False),
        capturable_what="params, mus, etas, and state_steps")},
)
