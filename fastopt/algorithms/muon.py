"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"), as
torch.optim.Muon 2.13 computes it (its code, where its docstring differs):

    buf <- lerp(buf, g, 1 - momentum)                  (torch's docstring: mu buf + g)
    d = lerp(g, buf, momentum) if nesterov else buf    (torch's docstring: g + mu buf)
    O = NS_k(d): k Newton-Schulz steps on d / max(||d||_F, eps) (transposed if rows > cols):
        A = X X^T;  B = b A + c A A;  X <- a X + B X
    p <- p (1 - lr weight_decay);   p <- p - lr r O
with r = sqrt(max(1, rows / cols)) ("original", the default) or 0.2 sqrt(max(rows, cols))
("match_rms_adamw"); the decay uses the unadjusted lr. 2-D params only.
Two passes around the host stage: the first updates buf and writes d (fused), the stage
orthogonalises each matrix (BLAS / cuBLAS; torch's bf16 matmul in fastopt.torch), the second
applies the decay and the update (fused).
"""

import math
import numbers
from math import sqrt

from .._checks import check_real, xp_of
from ._spec import ClassSpec, Definition, Hyper, MatrixStage, State, TorchTwin

#: torch.optim.Muon's Newton-Schulz coefficients (a, b, c) and eps
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def prologue(step, lr, momentum, weight_decay):
    buffer_weight = 1.0 - momentum  # torch.lerp's weight, a float32 in the element
    # torch.lerp's two forms: from the start where |weight| < 0.5, else from the end
    buffer_from_start = abs(buffer_weight) < 0.5
    nesterov_from_start = abs(momentum) < 0.5
    decay = 1.0 - lr * weight_decay


def reduce(p, g, momentum_buffer, *, momentum, nesterov, buffer_weight, buffer_from_start,
           nesterov_from_start):
    if buffer_from_start:
        momentum_buffer = momentum_buffer + buffer_weight * (g - momentum_buffer)
    else:
        momentum_buffer = g - (g - momentum_buffer) * (1.0 - buffer_weight)
    direction = momentum_buffer
    if nesterov:
        if nesterov_from_start:
            direction = g + momentum * (momentum_buffer - g)
        else:
            direction = momentum_buffer - (momentum_buffer - g) * (1.0 - momentum)


def segment(rows, cols, *, lr, adjust_lr):
    ratio = sqrt(max(1.0, rows / cols))
    if adjust_lr != 0.0:  # "match_rms_adamw"
        ratio = 0.2 * sqrt(max(rows, cols))
    adjusted_lr = lr * ratio


def element(p, g, momentum_buffer, *, decay, adjusted_lr):
    p = p * decay
    p = p - adjusted_lr * g


def newton_schulz(matrix, hypers: dict):
    """The stage on a float32 numpy or cupy matrix, in float32 (BLAS sgemm / cuBLAS; on a
    GPU every operation stays on the device: no host sync)."""
    xp = xp_of(matrix)
    a, b, c = hypers["ns_coefficients"]
    transposed = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if transposed else matrix
    x = x / xp.maximum(xp.sqrt((x * x).sum()), x.dtype.type(hypers["eps"]))
    for _ in range(hypers["ns_steps"]):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if transposed else x


def newton_schulz_torch(matrix, hypers: dict):
    """The stage on a float32 torch matrix, as torch.optim.Muon computes it: in bfloat16,
    with torch's addmm (one rounding per product and sum)."""
    import torch

    a, b, c = hypers["ns_coefficients"]
    x = matrix.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=hypers["eps"])
    for _ in range(hypers["ns_steps"]):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


def _check_weight_decay(value) -> float:
    return check_real("weight_decay", value,
                      message="weight decay should be >= 0 but is: {value}")


def _check_momentum(value) -> float:
    return check_real("momentum", value, message="momentum should be >= 0 but is: {value}")


def _check_coefficients(value) -> tuple[float, float, float]:
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if len(values) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    checked = tuple(check_real("ns_coefficients", v, -math.inf,
                               message="ns_coefficients must be finite reals, got {value}")
                    for v in values)
    if not all(map(math.isfinite, checked)):
        raise ValueError(f"ns_coefficients must be finite reals, got {value!r}")
    return checked


def _check_eps(value) -> float:
    return check_real("eps", value, message="Invalid epsilon value: {value}")


def _check_ns_steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ns_steps must be an integer, got {value!r}")  # (as torch's range)
    if value < 0:
        raise ValueError(f"ns_steps must be >= 0, got {value!r}")
    if value >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    return int(value)


def _check_adjust_lr_fn(value):
    if value not in ADJUST_LR_FNS or isinstance(value, bool):
        raise ValueError(f"Adjust learning rate function {value} is not supported")
    return value


DEFINITION = Definition(
    name="muon",
    doc=__doc__,
    classes=(ClassSpec("Muon", "Muon: momentum orthogonalised per 2-D matrix by Newton-Schulz "
                               "steps (torch.optim.Muon)."),),
    hypers=(
        Hyper("weight_decay", 0.1, _check_weight_decay),
        Hyper("momentum", 0.95, _check_momentum, slots=("momentum",)),
        Hyper("nesterov", True, bool, slots=("nesterov",), flag=True),
        Hyper("ns_coefficients", NS_COEFFICIENTS, _check_coefficients),
        Hyper("eps", 1e-7, _check_eps),
        Hyper("ns_steps", 5, _check_ns_steps),
        Hyper("adjust_lr_fn", None, _check_adjust_lr_fn, slots=("adjust_lr",),
              to_kernel=lambda fn: 1.0 if fn == "match_rms_adamw" else 0.0),
    ),
    state=(State("momentum_buffer"),),
    decay="own",
    prologue=prologue,
    element=element,
    lr_default=1e-3,
    torch_twin={"Muon": TorchTwin("Muon")},
    reduce=reduce,
    segment=segment,
    matrix=MatrixStage(newton_schulz, newton_schulz_torch,
                       "Muon only supports 2D parameters whereas we found a parameter with "
                       "size: {shape}"),
    per_param_step=False,
)
