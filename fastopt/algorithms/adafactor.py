"""Adafactor, as torch.optim.Adafactor 2.13 (its arguments, defaults, state names and
numbers): factored second moments for tensors of 2 or more dims, a full one for the others.

    per tensor, step k: w = k^beta2_decay, rho = min(lr, 1/sqrt(k)),
    alpha = max(eps2, ||p|| / sqrt(numel)) rho (p before the decay), p *= 1 - lr wd;
    (..., R, C): row_var = lerp(row_var, mean_c g^2, w), col_var = lerp(col_var, mean_r g^2, w),
    est = row_var col_var / max(mean_r row_var, eps1); others: variance = lerp(variance, g^2, w)
    u = g / sqrt(max(est, eps1^2));   p -= alpha / max(1, ||u|| / (sqrt(numel) d)) u
eps1 None is the params' machine epsilon (torch's finfo(param.dtype).eps; bfloat16 params
with a float32 master: bfloat16's).
"""

from .._checks import check_real, check_weight_decay
from . import _adafactor as math_
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def _beta2_decay(value) -> float:
    return check_real("beta2_decay", value, -float("inf"), 0.0,
                      message="beta2_decay should be <= 0 but is: {value}")


def _eps(value) -> tuple:
    try:
        eps1, eps2 = value
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a pair (eps1, eps2), got {value!r}") from None
    if eps1 is not None:
        eps1 = check_real("epsilon1", eps1, message="epsilon1 should be >= 0 but is: {value}")
    return eps1, check_real("epsilon2", eps2, message="epsilon2 should be >= 0 but is: {value}")


def _d(value) -> float:
    return check_real("d", value, 1.0, message="Clipping threshold d should be >= 1 but is: "
                                               "{value}")


DEFINITION = Definition(
    name="adafactor",
    doc=__doc__,
    classes=(ClassSpec("Adafactor", "Adafactor: factored second moments, a relative step "
                                    "(torch.optim.Adafactor)."),),
    hypers=(
        Hyper("beta2_decay", -0.8, _beta2_decay, slots=("beta2_decay",)),
        Hyper("eps", (None, 1e-3), _eps, slots=("eps1", "eps2"), format_eps=True),
        Hyper("d", 1.0, _d, slots=("d",)),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("maximize", False, bool),
    ),
    state=(State("row_var", layout="rows", sign="nonnegative"),
           State("col_var", layout="cols", sign="nonnegative"),
           State("variance", layout="unfactored", sign="nonnegative")),
    decay="own",
    prologue=math_.prologue,
    element=math_.element,
    lr_default=1e-2,
    segment=math_.segment,
    factored=math_,
    torch_twin={"Adafactor": TorchTwin("Adafactor", group_defaults={"foreach": None})},
)
