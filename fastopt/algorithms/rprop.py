"""Rprop (Riedmiller & Braun 1993), as torch.optim.Rprop.

    s = sign(g prev)
    step_size <- clamp(step_size * (etaplus if s > 0, etaminus if s < 0, 1 if s = 0),
                       step_size_min, step_size_max)
    g <- 0 where s < 0;   p <- p - sign(g) step_size;   prev <- g
step_size starts at the lr of the first step; the lr plays no other part, so Rprop refuses a
schedule (in torch a later lr reaches only params that take their first step later).
"""

from .._checks import check_real
from ._spec import INIT_LR, ClassSpec, Definition, Hyper, State, TorchTwin, sign


def prologue(step, lr, etaminus, etaplus):
    pass


def element(p, g, prev, step_size, *, etaminus, etaplus, step_size_min, step_size_max):
    direction = sign(g * prev)
    factor = 1.0
    if direction > 0.0:
        factor = etaplus
    if direction < 0.0:
        factor = etaminus
        g = 0.0
    step_size = min(max(step_size * factor, step_size_min), step_size_max)
    p = p - sign(g) * step_size
    prev = g


def _check_etas(etas) -> tuple[float, float]:
    try:
        minus, plus = etas
        ok = 0.0 < minus < 1.0 < plus
    except (TypeError, ValueError):
        raise ValueError(f"etas must be a pair (etaminus, etaplus), got {etas!r}") from None
    if not ok:
        raise ValueError(f"Invalid eta values: {minus}, {plus}")
    return float(minus), float(plus)


def _check_step_sizes(step_sizes) -> tuple[float, float]:
    try:
        low, high = step_sizes
    except (TypeError, ValueError):
        raise ValueError("step_sizes must be a pair (min, max), got "
                         f"{step_sizes!r}") from None
    low = check_real("step_sizes[0]", low, message="Invalid step size: {value}")
    high = check_real("step_sizes[1]", high, message="Invalid step size: {value}")
    if low > high:
        raise ValueError(f"Invalid step sizes: min {low} > max {high}")
    return low, high


DEFINITION = Definition(
    name="rprop",
    doc=__doc__,
    classes=(ClassSpec("Rprop", "Rprop (resilient backpropagation) with torch's options."),),
    hypers=(
        Hyper("etas", (0.5, 1.2), _check_etas, slots=("etaminus", "etaplus")),
        Hyper("step_sizes", (1e-6, 50.0), _check_step_sizes,
              slots=("step_size_min", "step_size_max")),
        Hyper("maximize", False, bool),
    ),
    state=(State("prev"), State("step_size", init=INIT_LR, sign="nonnegative")),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=1e-2,
    schedulable=False,
    torch_twin={"Rprop": TorchTwin("Rprop", dict(
        foreach=None, maximize=False, differentiable=False, capturable=False))},
)
