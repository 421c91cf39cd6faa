"""Numba CPU backend: one pure update kernel per optimizer, schedule evaluated inside."""

import numba

from .adadelta import adadelta
from .adagrad import adagrad
from .adam import adam
from .reduce import grad_sq_norm

# Below this many elements one thread beats waking the pool (measured in bench/NOTES.md).
PARALLEL_MIN_SIZE = 16_384


def use_parallel(n: int) -> bool:
    """Whether a pass over n elements should run on all Numba threads."""
    return n >= PARALLEL_MIN_SIZE and numba.get_num_threads() > 1


__all__ = ["adam", "adagrad", "adadelta", "grad_sq_norm", "use_parallel", "PARALLEL_MIN_SIZE"]
