"""grad_sq_norm(grads): sum of squares in float64 (finite iff every gradient is finite)."""

from numba import prange

from ._jit import kernel


@kernel
def grad_sq_norm(grads, parallel):
    """sum(g^2) accumulated in float64; one read pass over the gradients."""
    total = 0.0
    if parallel:
        for i in prange(grads.shape[0]):
            g = float(grads[i])
            total += g * g
    else:
        for i in range(grads.shape[0]):
            g = float(grads[i])
            total += g * g
    return total
