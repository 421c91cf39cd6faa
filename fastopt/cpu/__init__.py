"""Numba CPU backend: one update kernel per optimizer definition (``ops/<name>.py``, written
by ``fastopt.codegen``; reached through ``fastopt.engine``), the schedule evaluated inside."""

from .reduce import grad_sq_norm
from .threads import num_threads

#: Below this many elements one thread beats waking the pool: float32 params with float32
#: state, and int8 state over any params (AdamW, 2 threads, both loops forced: float32 even at
#: 12,000-16,384 elements, int8 serial still ahead at 16,384: bench/NOTES.md, twenty-first
#: session). Every format's serial loop is vectorised, as its parallel one is.
PARALLEL_MIN_SIZE = 16_384
#: The same for 16-bit params or bfloat16 state (their conversions make an element dearer,
#: so the parallel loop pays off sooner: even at ~8,000 elements, ahead from 12,000).
PARALLEL_MIN_SIZE_16BIT = 8_192


def parallel_min_size(float32_params: bool, state_dtype: str) -> int:
    """The fewest elements for which these params and this state format take the parallel
    loop (``state_dtype``: "float32", "bfloat16" or "int8")."""
    if state_dtype == "int8" or (float32_params and state_dtype == "float32"):
        return PARALLEL_MIN_SIZE
    return PARALLEL_MIN_SIZE_16BIT


def use_parallel(n: int, min_size: int = PARALLEL_MIN_SIZE) -> bool:
    """Whether a pass over n elements should run on all Numba threads (``min_size``: from
    ``parallel_min_size`` for an optimizer step)."""
    return n >= min_size and num_threads() > 1


__all__ = ["grad_sq_norm", "parallel_min_size", "use_parallel", "PARALLEL_MIN_SIZE"]
