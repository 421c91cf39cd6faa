"""Numba CPU backend: one update kernel per optimizer definition (``ops/<name>.py``, written
by ``fastopt.codegen``; reached through ``fastopt.engine``), the schedule evaluated inside."""

from .reduce import grad_sq_norm
from .threads import num_threads

# Below this many elements one thread beats waking the pool (measured in bench/NOTES.md).
PARALLEL_MIN_SIZE = 16_384
# The 16-bit params / bfloat16 state specialisations vectorise only in their prange loop, so
# their crossover is much lower (measured: parallel wins from ~1000 elements).
PARALLEL_MIN_SIZE_SCALAR_SERIAL = 768


def use_parallel(n: int, serial_simd: bool = True) -> bool:
    """Whether a pass over n elements should run on all Numba threads; ``serial_simd``:
    whether the kernel's serial loop is vectorised (float32 params and state)."""
    limit = PARALLEL_MIN_SIZE if serial_simd else PARALLEL_MIN_SIZE_SCALAR_SERIAL
    return n >= limit and num_threads() > 1


__all__ = ["grad_sq_norm", "use_parallel", "PARALLEL_MIN_SIZE"]
