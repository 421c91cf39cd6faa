"""CUDA backend: kernels/ compiled with NVRTC through CuPy, launched on cupy arrays."""
