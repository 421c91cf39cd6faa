"""The one set of Numba options every CPU kernel is compiled with."""

from numba import njit

# error_model="numpy": no division-by-zero checks in the loop, so LLVM can vectorise it.
# fastmath "contract" only: FMA contraction; no reassociation, NaN/inf keep propagating.
KERNEL_OPTIONS = dict(cache=True, parallel=True, nogil=True, error_model="numpy",
                      fastmath={"contract"})
HELPER_OPTIONS = dict(cache=True, error_model="numpy", fastmath={"contract"}, inline="always")

kernel = njit(**KERNEL_OPTIONS)
helper = njit(**HELPER_OPTIONS)
scalar = njit(cache=True, error_model="numpy", fastmath={"contract"})
