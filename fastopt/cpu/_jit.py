"""The one set of Numba options every CPU kernel is compiled with."""

from numba import njit

# error_model="numpy": no division-by-zero checks in the loop, so LLVM can vectorise it.
# No fastmath at all, not even FMA contraction: LLVM contracted a * b + c differently in
# different loop shapes (the serial and the prange loop, the float32 and the 16-bit
# specialisations: 1 ulp apart, bench/NOTES.md 20), and the CUDA kernels (NVRTC --fmad=false)
# and their g++ host build (-ffp-contract=off) contract nothing either. NaN/inf propagate.
KERNEL_OPTIONS = dict(cache=True, parallel=True, nogil=True, error_model="numpy")
HELPER_OPTIONS = dict(cache=True, error_model="numpy", inline="always")

kernel = njit(**KERNEL_OPTIONS)
helper = njit(**HELPER_OPTIONS)
scalar = njit(cache=True, error_model="numpy")
