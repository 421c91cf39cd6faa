"""CuPy launchers for the generated CUDA kernels (``kernels/<name>.cu``).

Every kernel has the one uniform signature ``KERNEL_SIGNATURE`` (``fastopt/algorithms/_spec.py``,
the one place it is defined; the generator writes it into each .cu file): ``T`` stands for the
param/grad element type, ``S`` for the state's (float, or bfloat16 bits). The launcher, the fake
CuPy and the host-emulation tests build their argument lists from it, so no caller has a
per-optimizer case.
"""

from __future__ import annotations

import functools

import numpy as np

from ..algorithms._spec import KERNEL_SIGNATURE
from . import build

#: numpy scalar type for each by-value C type
SCALAR_TYPES = {"double": np.float64, "int": np.int32, "long long": np.int64}

DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

BLOCK = 256
#: resident blocks per multiprocessor the grid is sized for (the grid-stride loop covers the rest)
BLOCKS_PER_SM = 8


def kernel_name(op: str, dtype: str, state_bf16: bool = False) -> str:
    """The compiled variant for params/grads of format ``dtype`` ('float32', 'float16',
    'bfloat16': what the elements hold, so uint16 bits are named by their format)."""
    if dtype not in DTYPE_SUFFIX:
        raise ValueError(f"no GPU kernel for {dtype} params (float32, float16, bfloat16)")
    return f"{op}_{DTYPE_SUFFIX[dtype]}" + ("_sbf16" if state_bf16 else "")


def pack_args(values: dict) -> tuple:
    """The kernel's arguments in declaration order; scalars as their exact C types."""
    args = []
    for name, ctype in KERNEL_SIGNATURE:
        value = values[name]
        args.append(SCALAR_TYPES[ctype](value) if ctype in SCALAR_TYPES else value)
    return tuple(args)


@functools.cache
def _module(source_name: str):
    import cupy

    return cupy.RawModule(code=build.source(source_name), options=build.nvrtc_options(),
                          name_expressions=None)


@functools.cache
def _grid(device_id: int) -> int:
    import cupy

    sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
    return sms * BLOCKS_PER_SM  # enough blocks in flight to saturate memory


def launch(op: str, dtype: str, values: dict) -> None:
    """Run kernel ``op`` for params of format ``dtype`` and the state's dtype (float32, or
    bfloat16 bits as uint16) on the current stream; no host sync."""
    import cupy

    name = kernel_name(op, dtype, values["state0"].dtype == np.uint16)
    kernel = _module(f"{op}.cu").get_function(name)
    n = int(values["n"])
    grid = max(1, min(_grid(cupy.cuda.Device().id), -(-n // BLOCK)))
    kernel((grid,), (BLOCK,), pack_args(values))
