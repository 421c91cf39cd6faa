"""Numba CPU backend: one update kernel per optimizer definition (``ops/<name>.py``, written
by ``fastopt.codegen``; reached through ``fastopt.engine``), the schedule evaluated inside."""

from .reduce import grad_sq_norm
from .threads import num_threads

# Below this many elements one thread beats waking the pool (measured in bench/NOTES.md).
PARALLEL_MIN_SIZE = 16_384
# The 16-bit params / bfloat16 state specialisations vectorise only in their prange loop, so
# their crossover is much lower (measured: parallel wins from ~1000 elements).
PARALLEL_MIN_SIZE_SCALAR_SERIAL = 768
#: the state formats whose kernels' serial loop LLVM vectorises over float32 params: float32,
#: and int8 (its block loops; measured serial 6.5 / 9.9 / 25.2 µs against parallel 9.4 / 12.8 /
#: 30.2 µs for AdamW at 1,000 / 4,000 / 16,000 elements, parallel ahead from 64,000:
#: bench/NOTES.md, twentieth session). 16-bit params and bfloat16 state: prange loop only.
SERIAL_SIMD_STATE = frozenset({"float32", "int8"})


def serial_simd(float32_params: bool, state_dtype: str) -> bool:
    """Whether the kernels' serial loop is vectorised for these params and this state format
    (then a serial pass wins up to PARALLEL_MIN_SIZE elements, else up to ~1000)."""
    return float32_params and state_dtype in SERIAL_SIMD_STATE


def use_parallel(n: int, serial_simd: bool = True) -> bool:
    """Whether a pass over n elements should run on all Numba threads; ``serial_simd``:
    whether the kernel's serial loop is vectorised (``serial_simd()`` above)."""
    limit = PARALLEL_MIN_SIZE if serial_simd else PARALLEL_MIN_SIZE_SCALAR_SERIAL
    return n >= limit and num_threads() > 1


__all__ = ["grad_sq_norm", "serial_simd", "use_parallel", "PARALLEL_MIN_SIZE"]
