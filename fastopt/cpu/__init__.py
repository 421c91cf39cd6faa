"""Numba CPU backend: one update kernel per optimizer definition (``ops/<name>.py``, written
by ``fastopt.codegen``; reached through ``fastopt.engine``), the schedule evaluated inside."""

from .reduce import grad_sq_norm
from .threads import num_threads

#: Below this many elements one thread beats waking the pool, for every params and state
#: format: the serial loop is vectorised as the parallel one is (AdamW, 2 threads: serial
#: 4.3-6.2 µs against parallel 7.1-10.3 µs at 1,000 elements, even at ~16,000, parallel ahead
#: from 64,000: bench/NOTES.md, twenty-first session).
PARALLEL_MIN_SIZE = 16_384


def use_parallel(n: int) -> bool:
    """Whether a pass over n elements should run on all Numba threads."""
    return n >= PARALLEL_MIN_SIZE and num_threads() > 1


__all__ = ["grad_sq_norm", "use_parallel", "PARALLEL_MIN_SIZE"]
