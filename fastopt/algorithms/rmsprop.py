"""RMSprop (Tieleman & Hinton 2012) with momentum and the centered form, as torch.optim.RMSprop.

    sq <- alpha sq + (1 - alpha) g^2;   ga <- ga + (1 - alpha) (g - ga)          (centered)
    avg = sqrt(sq - ga^2) + eps (centered) or sqrt(sq) + eps
    b <- momentum b + g / avg; p <- p - lr b   (momentum > 0), else p <- p - lr g / avg
"""

from math import sqrt

from .._checks import check_eps, check_real, check_weight_decay, kernel_eps
from ._spec import ClassSpec, Definition, Hyper, State, TorchTwin


def prologue(step, lr, alpha, momentum):
    one_minus_alpha = 1.0 - alpha
    has_momentum = momentum > 0.0


def element(p, g, square_avg, momentum_buffer, grad_avg, *, lr, alpha, one_minus_alpha, eps,
            momentum, centered, has_momentum):
    square_avg = alpha * square_avg + one_minus_alpha * (g * g)
    if centered:
        grad_avg = grad_avg + one_minus_alpha * (g - grad_avg)
        avg = sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = sqrt(square_avg) + eps
    if has_momentum:
        momentum_buffer = momentum * momentum_buffer + g / avg
        p = p - lr * momentum_buffer
    else:
        p = p - lr * (g / avg)


DEFINITION = Definition(
    name="rmsprop",
    doc=__doc__,
    classes=(ClassSpec("RMSprop", "RMSprop with torch's momentum and centered options."),),
    hypers=(
        Hyper("alpha", 0.99, lambda v: check_real("alpha", v), slots=("alpha",)),
        Hyper("eps", 1e-8, check_eps, slots=("eps",), to_kernel=kernel_eps),
        Hyper("weight_decay", 0.0, check_weight_decay),
        Hyper("momentum", 0.0, lambda v: check_real("momentum", v), slots=("momentum",)),
        Hyper("centered", False, bool, slots=("centered",), flag=True),
        Hyper("maximize", False, bool),
    ),
    state=(State("square_avg", sign="nonnegative"), State("momentum_buffer", when="momentum > 0.0"),
           State("grad_avg", when="centered")),
    decay="l2",
    prologue=prologue,
    element=element,
    lr_default=1e-2,
    torch_twin={"RMSprop": TorchTwin("RMSprop", dict(
        momentum=0, centered=False, foreach=None, maximize=False, differentiable=False,
        capturable=False), capturable_xla=False)},
)
