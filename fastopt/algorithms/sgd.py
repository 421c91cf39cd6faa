"""SGD with momentum, dampening and Nesterov momentum, as torch.optim.SGD.

    b <- g on the first step, else b <- momentum b + (1 - dampening) g     (momentum != 0)
    g <- g + momentum b (nesterov) or b;   p <- p - lr g
"""

from .._checks import check_real, check_weight_decay
from ._spec import FIRST_GRAD, ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, momentum, dampening):
    has_momentum = momentum != 0.0
    one_minus_dampening = 1.0 - dampening


def element(p, g, momentum_buffer, *, lr, momentum, nesterov, has_momentum, fresh,
            one_minus_dampening):
    if has_momentum:
        if fresh:
            momentum_buffer = g
        else:
            momentum_buffer = momentum * momentum_buffer + one_minus_dampening * g
        if nesterov:
            g = g + momentum * momentum_buffer
        else:
            g = momentum_buffer
    p = p - lr * g


def _validate(h: dict) -> None:
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


DEFINITION = Definition(
    name="sgd",
    doc=__doc__,
    classes=(ClassSpec("SGD", "SGD with momentum (torch.optim.SGD's arguments and numbers).",
                       bench={"momentum": 0.9}),),
    hypers=(
        Hyper("momentum", 0.0, lambda v: check_real("momentum", v), slots=("momentum",)),
        Hyper("dampening", 0.0, lambda v: check_real("dampening", v, -float("inf")),
              slots=("dampening",)),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("nesterov", False, bool, slots=("nesterov",), flag=True),
        Hyper("maximize", False, bool),
    ),
    state=(State("momentum_buffer", init=FIRST_GRAD, when="momentum != 0.0"),),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=1e-3,
    validate=_validate,
    validate_at_construction_only=True,
    torch_twin={"SGD": TorchTwin("SGD", dict(nesterov=False, maximize=False, foreach=None,
                                                differentiable=False, fused=False))},
)
