"""grad_sq_norm(grads): sum of squares in float64 (finite iff every gradient is finite)."""

from numba import prange

from ._jit import kernel
from .access import load_grad


@kernel
def grad_sq_norm(grads, fmt, parallel):
    """sum(g^2) accumulated in float64; one read pass over the gradients."""
    total = 0.0
    if parallel:
        for i in prange(grads.shape[0]):
            g = float(load_grad(grads, i, fmt))
            total += g * g
    else:
        for i in range(grads.shape[0]):
            g = float(load_grad(grads, i, fmt))
            total += g * g
    return total
