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

from ..algorithms._spec import (
    FACTORED_SIGNATURE,
    INT8_BLOCK,
    INT8_SIGNATURE,
    KERNEL_SIGNATURE,
    MULTI_CHUNK,
    MULTI_CHUNK_ROW,
    MULTI_SIGNATURE,
    MULTI_TABLE,
    REDUCE_THREADS,
    SEGMENT_BLOCK,
    SEGMENT_SIGNATURE,
)
from . import build

#: numpy scalar type for each by-value C type
SCALAR_TYPES = {"double": np.float64, "int": np.int32, "long long": np.int64}

DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

BLOCK = 256
#: threads per block of a thread-per-item pass of a tensor-aware kernel (factored moments' fold:
#: a thread per row or column factor)
SEGMENT_THREADS = 128
#: resident blocks per multiprocessor the grid is sized for (the grid-stride loop covers the rest)
BLOCKS_PER_SM = 8


def kernel_name(op: str, dtype: str, state_bf16: bool = False, int8: bool = False,
                multi: bool = False) -> str:
    """The compiled variant for params/grads of format ``dtype`` ('float32', 'float16',
    'bfloat16': what the elements hold, so uint16 bits are named by their format), with
    bfloat16 or int8 state; ``multi``: its multi-tensor launch's (MULTI_SIGNATURE)."""
    if dtype not in DTYPE_SUFFIX:
        raise ValueError(f"no GPU kernel for {dtype} params (float32, float16, bfloat16)")
    multi_part = "_multi" if multi else ""
    if int8:
        return f"{op}_int8{multi_part}_{DTYPE_SUFFIX[dtype]}"
    return f"{op}{multi_part}_{DTYPE_SUFFIX[dtype]}" + ("_sbf16" if state_bf16 else "")


def signature_of(values: dict) -> tuple:
    """The kernel signature ``values`` are for: the uniform one, with the segment tables for a
    tensor-aware kernel and the factored ones for factored moments."""
    return (KERNEL_SIGNATURE + (SEGMENT_SIGNATURE if "segments" in values else ())
            + (FACTORED_SIGNATURE if "tiles" in values else ())
            + (INT8_SIGNATURE if "scale0" in values else ())
            + (MULTI_SIGNATURE if "tensors" in values else ()))


def _address(array) -> int:
    """A numpy array's (the host-built kernels') or a cupy array's data address."""
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data.ptr


def multi_tables(tensors: list[dict], chunk: int = MULTI_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The tables of a multi-tensor launch (MULTI_SIGNATURE) over tensors whose kernel
    arguments are ``tensors`` (``Prepared.kernel_values`` each): a row of MULTI_TABLE per
    tensor (buffer addresses, element count) and a row of MULTI_CHUNK_ROW per chunk of
    ``chunk`` elements (a multiple of INT8_BLOCK; the last chunk of a tensor may be shorter;
    an empty tensor has none). At least one chunk, so that a launch over empty tensors still
    advances the step counter. int64 numpy arrays (host memory)."""
    if chunk <= 0 or chunk % INT8_BLOCK:
        raise ValueError(f"a chunk of {chunk} elements: it must be a positive multiple of "
                         f"{INT8_BLOCK}")
    rows = [[int(values["n"]) if name == "n" else 0 if values.get(name) is None
             else _address(values[name]) for name in MULTI_TABLE] for values in tensors]
    rows = np.array(rows, dtype=np.int64).reshape(len(tensors), len(MULTI_TABLE))
    # (numpy, not a Python loop over the chunks: a table is made again whenever the
    # gradients move, ~2,000 chunks for GPT-2 small)
    n = rows[:, MULTI_TABLE.index("n")]
    per_tensor = -(-n // chunk)
    tensor = np.repeat(np.arange(len(tensors), dtype=np.int64), per_tensor)
    first = (np.arange(tensor.shape[0], dtype=np.int64)
             - np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)) * chunk
    columns = {"tensor": tensor, "first": first, "stop": np.minimum(first + chunk, n[tensor])}
    chunks = np.stack([columns[k] for k in MULTI_CHUNK_ROW], axis=1)
    if not chunks.shape[0]:
        chunks = np.zeros((1, len(MULTI_CHUNK_ROW)), dtype=np.int64)
    return rows, chunks


def pack_args(values: dict) -> tuple:
    """The kernel's arguments in declaration order (``signature_of``); scalars as their exact
    C types."""
    args = []
    signature = signature_of(values)
    for name, ctype in signature:
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


def bind(op: str, dtype: str, values: dict, between=None):
    """Kernel ``op``'s launch for params of format ``dtype`` and the state's dtype (float32,
    or bfloat16 bits as uint16), resolved once: the functions, the grid and the packed
    arguments (the arrays by reference, so the launch sees their values at the time it runs).
    Returns a function of no arguments that launches on the current stream, with no host
    sync and no allocation (capturable in a CUDA graph). ``between``: a tensor-aware kernel's
    matrix stage, called after the first pass's launch (it queues its own work on the
    stream). ``values`` with ``tensors`` and ``chunks`` (``bind_multi``'s): the multi-tensor
    entry point, a block per chunk."""
    state_bf16 = values["state0"].dtype == np.uint16
    module = _module(f"{op}.cu")
    args = pack_args(values)
    if "segments" in values:  # a tensor-aware kernel: its passes, in order
        launches = []
        for stem, typed, grid, block in segmented_passes(op, values):
            if stem is None:
                launches.append(between)
                continue
            kernel = module.get_function(kernel_name(stem, dtype, state_bf16) if typed
                                         else stem)
            launches.append(functools.partial(kernel, (grid,), (block,), args))
        launches = [launch for launch in launches if launch is not None]

        def run_segmented() -> None:
            for launch in launches:
                launch()

        return run_segmented
    n, int8, multi = int(values["n"]), "scale0" in values, "tensors" in values
    kernel = module.get_function(kernel_name(op, dtype, state_bf16, int8, multi))
    if multi:  # a block per chunk of the tensors (multi_tables)
        grid = (int(values["chunks"].shape[0]),)
    elif int8:  # a warp per block of INT8_BLOCK elements
        warps = -(-n // INT8_BLOCK)
        grid = (max(1, min(_grid(values["params"].device.id), -(-warps // (BLOCK // 32)))),)
    else:
        grid = (max(1, min(_grid(values["params"].device.id), -(-n // BLOCK))),)
    return lambda: kernel(grid, (BLOCK,), args)


def bind_multi(op: str, dtype: str, tensors: list[dict], chunk: int = MULTI_CHUNK):
    """``bind`` for one launch of kernel ``op``'s multi-tensor entry point over ``tensors``
    (``Prepared.kernel_values`` of each: alike in every argument but the buffers and ``n``,
    the step counter and lr output shared): the tables (``multi_tables``) copied once to the
    device of the first tensor's params, kept alive by the launch. The launch holds no
    gradient array, only the gradients' addresses in the table: the caller keeps them alive
    while it may launch, or binds again where they move."""
    import cupy

    first = tensors[0]
    for values in tensors[1:]:
        if values.keys() != first.keys():
            raise ValueError("a multi-tensor launch's tensors take different kernels")
        for key, value in first.items():
            if key in MULTI_TABLE:  # (each tensor's own buffers, of the same types)
                if key != "n" and values[key].dtype != value.dtype:
                    raise ValueError(f"a multi-tensor launch's tensors differ in the type of "
                                     f"{key!r}")
                continue
            # (the scalar slots: stand-ins, Definition.multi_launch has no per-step scalars)
            if key.startswith("scalar") or values[key] is value:
                continue
            if isinstance(value, (int, float, bool, np.generic)) and values[key] == value:
                continue
            raise ValueError(f"a multi-tensor launch's tensors differ in {key!r}")
    table, chunks = multi_tables(tensors, chunk)
    with cupy.cuda.Device(first["params"].device.id):
        # (the entry point reads every buffer from the table: its uniform gradient argument
        # is unused, and the params stand in for it, so that the launch holds no gradient
        # array and a gradient made anew can take the same memory)
        values = dict(first, grads=first["params"], tensors=cupy.asarray(table),
                      chunks=cupy.asarray(chunks))
    return bind(op, dtype, values)


def segmented_passes(op: str, values: dict, block: int | None = None) -> list[tuple]:
    """The launches of one step of tensor-aware kernel ``op``, in order: (kernel stem, typed,
    grid, block); typed: the stem takes the params' format suffix (``kernel_name``), else one
    entry point serves all. A stem None is the matrix stage's place (between the first pass
    and the segment pass). ``block``: threads per block for every pass (the host-built tests'
    small blocks), else SEGMENT_BLOCK for a block-per-item pass and SEGMENT_THREADS for a
    thread-per-item one. Passes with nothing to do (a model without matrices) are left out."""
    chunks = int(values["chunks"].shape[0])

    def per_thread(items: int) -> tuple[int, int]:
        threads = block or SEGMENT_THREADS
        return -(-items // threads), threads

    per_block = block or SEGMENT_BLOCK
    segment = (f"{op}_segment", False, int(values["n_segments"]), per_block)
    if "tiles" not in values:  # reduce, [the matrix stage], segment, update
        return [(f"{op}_reduce", True, chunks, per_block), (None, False, 0, 0), segment,
                (op, True, chunks, per_block)]
    # factored moments (kernels/factored.cuh): stats, fold, means, reduce, segment, update
    factors = int(values["n_rows"]) + int(values["n_cols"])
    passes = [(f"{op}_stats", True, int(values["tiles"].shape[0]), per_block),
              (f"{op}_fold", False, *per_thread(factors)),
              (f"{op}_means", False, int(values["means"].shape[0]), per_block),
              (f"{op}_reduce", True, chunks, per_block), segment,
              (op, True, chunks, per_block)]
    return [p for p in passes if p[2] > 0]


def launch(op: str, dtype: str, values: dict, between=None) -> None:
    """Run kernel ``op`` once on the current stream (``bind``'s launch, used once)."""
    bind(op, dtype, values, between)()


#: threads of the gradient norm's last pass (one block); every block of its passes has at most
#: REDUCE_THREADS (kernels/control.cu's shared arrays)
FOLD = REDUCE_THREADS
if BLOCK > REDUCE_THREADS:
    raise ImportError("fastopt.gpu.launch: BLOCK exceeds REDUCE_THREADS (kernels/control.cu)")


def control_buffers(device_id: int) -> dict:
    """The device buffers of a step's gradient norm (made once per optimizer, outside any
    graph capture: one partial sum per block of the largest grid, the norm, the control)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return {"partial": cupy.zeros(_grid(device_id), dtype=np.float64),
                "norm": cupy.zeros(1, dtype=np.float64),
                "control": cupy.asarray([1.0, 0.0])}


def grad_control(grads, dtype: str, mult: float, max_norm: float | None, skip: bool,
                 buffers: dict) -> None:
    """The gradient norm (times ``mult``) into buffers['norm'] and the update kernel's
    control (clip coefficient, skip flag) into buffers['control'], on the current stream
    (kernels/control.cu: two launches): no host sync, capturable."""
    import cupy

    module = _module("control.cu")
    n = int(grads.shape[0])
    partial = buffers["partial"]
    # (at most one block per partial slot: buffers made for another device, or by an older
    # version, may be smaller)
    grid = max(1, min(_grid(cupy.cuda.Device().id), -(-n // BLOCK), partial.shape[0]))
    suffix = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    module.get_function(f"fo_grad_sq_{suffix}")((grid,), (BLOCK,), (
        grads, np.int64(n), partial))
    module.get_function("fo_grad_control")((1,), (FOLD,), (
        partial, np.int64(grid), np.float64(mult),
        np.float64(0.0 if max_norm is None else max_norm), np.int32(bool(skip)),
        buffers["norm"], buffers["control"]))
