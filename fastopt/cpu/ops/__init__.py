"""Generated Numba kernels, one module per optimizer definition (python -m fastopt.codegen)."""
