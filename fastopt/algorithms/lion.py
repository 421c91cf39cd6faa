"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as lion-pytorch.

    p <- p (1 - lr wd);   p <- p - lr sign(beta1 m + (1 - beta1) g)
    m <- beta2 m + (1 - beta2) g
Weight decay is lion-pytorch's default form (``p *= 1 - lr wd``, decoupled, scaled by lr).
"""

from .._checks import check_real, check_weight_decay
from ._spec import ClassSpec, Definition, Hyper, State, sign


def prologue(step, lr, beta1, beta2):
    one_minus_beta1 = 1.0 - beta1
    one_minus_beta2 = 1.0 - beta2


def element(p, g, exp_avg, *, lr, beta1, beta2, one_minus_beta1, one_minus_beta2):
    p = p - lr * sign(beta1 * exp_avg + one_minus_beta1 * g)
    exp_avg = beta2 * exp_avg + one_minus_beta2 * g


def _check_betas(betas) -> tuple[float, float]:
    """(beta1, beta2), each in [0, 1] (lion-pytorch's range)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    return (check_real("beta", beta1, 0.0, 1.0, message="Invalid beta parameter at index 0: "
                       "{value}"),
            check_real("beta", beta2, 0.0, 1.0, message="Invalid beta parameter at index 1: "
                       "{value}"))


DEFINITION = Definition(
    name="lion",
    doc=__doc__,
    classes=(ClassSpec("Lion", "Lion (evolved sign momentum), lion-pytorch's formula."),),
    hypers=(
        Hyper("betas", (0.9, 0.99), _check_betas, slots=("beta1", "beta2")),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("exp_avg"),),
    decay="decoupled",
    prologue=prologue,
    element=element,
    lr_default=1e-4,
)
