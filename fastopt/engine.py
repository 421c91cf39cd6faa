"""The one route from every API to a kernel: picks the backend, packs the uniform signature.

``Prepared`` holds one optimizer's kernel call with everything that is fixed between steps
packed once (buffers, hyperparameter slots, weight-decay form, 16-bit format, serial or
parallel loop); ``cpu(...)``/``gpu(...)`` then add what changes per step. The optimizer classes
build it at construction (and again when their hyperparameters or state change),
``fastopt.functional`` per call, ``fastopt.torch`` once per bucket. Nothing here checks user
input: the callers check at their edge.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from ._checks import FORMATS
from ._int8 import Int8State
from .algorithms import Definition
from .algorithms._spec import (
    CPU_INT8_SIGNATURE,
    CPU_PER_STEP,
    CPU_SIGNATURE,
    FACTORED_SIGNATURE,
    INT8_SCALES,
    KERNEL_SLOTS,
    MASTER_MODES,
    REDUCTION_SLOTS,
    SCALAR_SLOTS,
    SEGMENT_SIGNATURE,
    STATE_SLOTS,
)
from .cpu.threads import kernel_guard, parallel_ok
from .schedules import host_lr
from .segments import SegmentTable


@functools.cache
def cpu_kernel(name: str, entry: str = "", parallel: bool = True):
    """The Numba kernel of definition ``name`` (its module is imported on first use; nothing
    is compiled until the first call); ``entry``: another kernel of its module (a matrix
    stage's first pass, ``<name>_first``); ``parallel``: its prange loop, else its serial
    twin ``<entry>_serial`` (each compiled only when first run)."""
    module = importlib.import_module(f"fastopt.cpu.ops.{name}")
    return getattr(module, (entry or name) + ("" if parallel else "_serial"))


def _dummy_state(xp):
    """A stand-in for state slots a definition does not use (never read by the kernel)."""
    return xp.zeros(1, dtype=np.float32)


def _dummy_scalar(xp):
    """A stand-in for scalar slots a definition does not use (never read or written)."""
    return xp.zeros(1, dtype=np.float64)


#: the CPU kernels' fixed arguments (packed once per Prepared); ``Prepared.cpu`` passes the
#: per-step ones after them in this order
CPU_FIXED = tuple(name for name in CPU_SIGNATURE if name not in CPU_PER_STEP)
if CPU_FIXED != ("params", "master", *(f"state{i}" for i in range(STATE_SLOTS)),
                 *(f"scalar{i}" for i in range(SCALAR_SLOTS)), "weight_decay", "decoupled",
                 "maximize", *(f"h{i}" for i in range(KERNEL_SLOTS)), "fmt", "l2") \
        or CPU_PER_STEP != ("grads", "table", "step", "lr_scale", "grad_mult", "fresh",
                            "parallel") \
        or CPU_INT8_SIGNATURE != (*CPU_FIXED, *INT8_SCALES, *CPU_PER_STEP):
    # (the order Prepared packs and passes them in)
    raise ImportError("fastopt.engine packs the CPU kernel arguments in an order that "
                      "CPU_SIGNATURE no longer has")

#: A matrix stage's definition (Muon) runs its elementwise passes serially below this many
#: params: its BLAS stage's threads and Numba's parallel threads, alternating within each
#: step, spin-wait against each other on few cores, which cost far more than parallel
#: passes save while the stage dominates the step (measured in bench/NOTES.md, "Muon")
MATRIX_PARALLEL_MIN = 1 << 24


def l2_term(definition: Definition, weight_decay: float, decoupled: bool):
    """The CPU kernels' ``l2`` argument (CPU_SIGNATURE): the L2 weight decay factor added to
    the gradient, as a float32, or None where the step adds no such term (weight decay 0,
    decoupled decay, or a definition whose decay is not L2). None compiles the kernel without
    the term, as torch adds none: ``0 * p`` would make an inf param NaN."""
    if definition.decay not in ("l2", "choice") or decoupled or weight_decay == 0.0:
        return None
    return np.float32(weight_decay)


def master_weights_of(dtype: str, master) -> str:
    """Which of MASTER_WEIGHTS a master buffer means for params of format ``dtype``: a float32
    master (and every float32 param, which needs none) "fp32", int16 remainders "remainder",
    none "none"."""
    if dtype == "float32" or (master is not None and master.dtype == np.float32):
        return "fp32"
    return "none" if master is None else "remainder"


_CPU_DUMMY = _dummy_state(np)
_CPU_DUMMY_SCALAR = _dummy_scalar(np)


class Prepared:
    """The fixed part of one optimizer's kernel call.

    ``params``/``grads``: as the kernels take them (16-bit params as uint16 bits on the CPU;
    cupy arrays of the params' own element type or bits on the GPU). ``master``: how 16-bit
    params keep their float32 values (``master_weights=``): their float32 master ("fp32"),
    the int16 remainders beside bfloat16 params ("remainder"), or None ("none": the params
    alone, stochastically rounded; None for float32 params too). ``states``: the definition's active
    state buffers in kernel order, by name. ``hypers``: the checked hyperparameters.
    ``scalars``: the definition's per-step scalars by name, one-element float64 arrays (numpy
    or cupy) that the kernel reads and updates in place.
    ``dtype``: what the params hold ('float32', 'float16', 'bfloat16').
    ``compiled``: the entry-point cache of an earlier ``Prepared`` over buffers of the same
    types (the same optimizer with other hyperparameter values, or after a load), shared;
    None for a new one. ``one_shot``: a call made once (the functional layer): use Numba's
    dispatcher and skip finding the entry point, which costs more than it saves then.
    ``stage``: how a definition's matrix stage (Muon's) computes: "numpy" (numpy or cupy
    arrays, float32: the core optimizers and the functional layer) or "torch" (torch's ops,
    as its torch twin: fastopt.torch).
    """

    __slots__ = ("definition", "params", "master", "master_mode", "states", "scales", "int8",
                 "scalars", "slots", "weight_decay", "decoupled", "maximize", "l2", "fmt",
                 "parallel", "on_gpu", "dtype", "_fixed", "_fn", "_compiled", "segments",
                 "_segment_arrays", "hypers", "stage", "_first", "_serial")

    def __init__(self, definition: Definition, params, master, states: dict, hypers: dict,
                 dtype: str, on_gpu: bool, parallel: bool = False, scalars: dict | None = None,
                 compiled: dict | None = None, one_shot: bool = False,
                 segments: SegmentTable | None = None, stage: str = "numpy"):
        d = definition
        #: the tensors' layout (a tensor-aware definition's; None for elementwise ones)
        self.segments = segments
        if d.segmented != (segments is not None):
            raise ValueError(f"{d.name} {'needs' if d.segmented else 'takes no'} segment table")
        if d.matrix is not None:
            segments.check_matrices(d.matrix.only_2d)
        self.hypers, self.stage = hypers, stage
        #: a matrix stage's first pass: (serial, parallel) kernels
        self._first = None if on_gpu or d.matrix is None else tuple(
            cpu_kernel(d.name, f"{d.name}_first", parallel) for parallel in (False, True))
        self._segment_arrays = () if segments is None else segment_arrays(
            d, segments, params, on_gpu)
        self.definition, self.params, self.dtype, self.on_gpu = d, params, dtype, on_gpu
        # (no master: the params stand in, so the CPU kernels tell the mode by its dtype)
        self.master = params if master is None else master
        self.master_mode = MASTER_MODES[master_weights_of(dtype, master)]
        #: int8 state (Int8State buffers): the codes go in the state slots, each block's
        #: absmax in the scale slots, and the kernel is ``<name>_int8``
        self.int8 = any(isinstance(v, Int8State) for v in states.values())
        if self.int8:
            if d.int8_refusal is not None:
                raise ValueError(d.int8_refusal)
            scales = {name: v.absmax for name, v in states.items()}
            states = {name: v.codes for name, v in states.items()}
            first_scale = next(iter(scales.values()))
            self.scales = tuple(scales.get(name, first_scale) for name in d.state_names) \
                + (first_scale,) * (STATE_SLOTS - len(d.state))
        else:
            self.scales = ()
        first = next(iter(states.values()), None)
        if first is None:
            first = _dummy_state(_xp(params)) if on_gpu else _CPU_DUMMY
        self.states = tuple(states.get(name, first) for name in d.state_names) \
            + (first,) * (STATE_SLOTS - len(d.state))
        scalars = scalars or {}
        if set(scalars) != set(d.scalar_names):
            raise ValueError(f"{d.name} needs the scalars {d.scalar_names}, got {sorted(scalars)}")
        dummy = _dummy_scalar(_xp(params)) if on_gpu else _CPU_DUMMY_SCALAR
        self.scalars = tuple(scalars[name] for name in d.scalar_names) \
            + (dummy,) * (SCALAR_SLOTS - len(d.scalars))
        self.slots = d.slot_values(hypers)
        self.weight_decay = float(hypers.get("weight_decay", 0.0))
        if d.decay == "choice":
            self.decoupled = bool(hypers.get("decoupled_weight_decay", False))
        else:
            self.decoupled = d.decay == "decoupled"
        self.maximize = bool(hypers.get("maximize", False))
        self.l2 = l2_term(d, self.weight_decay, self.decoupled)
        self.fmt = FORMATS[dtype]
        self.parallel = parallel and (d.matrix is None or params.shape[0] >= MATRIX_PARALLEL_MIN)
        #: the kernel (its prange loop) and its serial twin
        self._fn = None if on_gpu else cpu_kernel(d.name, f"{d.name}_int8" * self.int8)
        self._serial = None if on_gpu else cpu_kernel(d.name, f"{d.name}_int8" * self.int8,
                                                      parallel=False)
        if on_gpu and not isinstance(params, np.ndarray):  # (numpy: the host-built kernels)
            _no_control(params.device.id)  # made now: a copy to the device is not capturable
        #: (grads dtype, writeable, parallel, l2 is None) -> the compiled specialisation's
        #: entry point; None: always through the dispatcher
        self._compiled: dict | None = None if one_shot else ({} if compiled is None
                                                              else compiled)
        #: the CPU kernel's fixed arguments, in CPU_FIXED order (checked at import below)
        self._fixed = (params, self.master, *self.states, *self.scalars, self.weight_decay,
                       self.decoupled, self.maximize, *self.slots, self.fmt, self.l2,
                       *self._segment_arrays, *self.scales)

    def cpu(self, grads, table: np.ndarray, step: int, lr_scale: float, grad_mult: float,
            fresh: int = 0) -> float:
        """Run the Numba kernel for step ``step`` (1-based); returns the lr it used."""
        parallel = parallel_ok(self.parallel)  # serial in a child forked from GNU OpenMP
        if self._first is not None:  # a matrix stage: its first pass, then the stage
            with kernel_guard(parallel):
                self._first[parallel](*self._fixed, grads, table, step, lr_scale, grad_mult,
                                      int(fresh), parallel)
            self.matrix_stage()
        cache = self._compiled
        key = (grads.dtype, grads.flags.writeable, parallel, self.l2 is None)
        compiled = None if cache is None else cache.get(key)
        with kernel_guard(parallel):  # one parallel launch at a time under workqueue
            if compiled is not None:  # the arguments in CPU_SIGNATURE order
                return compiled(*self._fixed, grads, table, step, lr_scale, grad_mult,
                                int(fresh), parallel)
            args = (*self._fixed, grads, table, step, lr_scale, grad_mult, int(fresh), parallel)
            fn = self._fn if parallel else self._serial
            lr = fn(*args)  # Numba's dispatcher: types the arguments, compiles once
        if cache is None:
            return lr
        # then the compiled specialisation directly: the same machine code without the
        # dispatcher typing 30 arguments every step (~0.5 µs, bench/NOTES.md 20). Only the
        # grads (float32 or 16-bit bits, read-only or not), the parallel flag (serial in a
        # forked child) and, in a cache shared with another Prepared (other hyperparameter
        # values), ``l2`` (None or float32) change type: they key the cache.
        compiled = fn.overloads.get(tuple(fn.typeof_pyval(a) for a in args))
        if compiled is not None:
            cache[key] = compiled.entry_point
        return lr

    def gpu(self, grads, table, table_rows: int, step_state, lr_out, lr_scale: float,
            grad_mult: float, fresh: int = 0, control=None) -> None:
        """Launch the CUDA kernel on the current stream: step k = step_state[0] + 1 read on
        the device; no host sync. ``control``: a device array (clip factor, skip flag) the
        kernel reads (None: no clipping, no skip)."""
        self.gpu_launcher(grads, table, table_rows, step_state, lr_out, lr_scale, grad_mult,
                          fresh, control)()

    def gpu_launcher(self, grads, table, table_rows: int, step_state, lr_out,
                     lr_scale: float, grad_mult: float, fresh: int = 0, control=None):
        """``gpu``'s launch with these arguments resolved once: a function of no arguments
        that launches on the current stream (the arrays' values read when it runs), for a
        caller that repeats the same call (fastopt.torch's whole-bucket step)."""
        from .gpu import launch

        run = launch.bind(self.definition.name, self.dtype, self.kernel_values(
            grads, table, table_rows, step_state, lr_out, lr_scale, grad_mult, fresh,
            control), between=None if self.definition.matrix is None else self.matrix_stage)
        if self.definition.matrix is None or self.stage != "numpy":
            return run
        name = self.definition.name

        def refusing_capture() -> None:
            _refuse_cublas_in_capture(name)
            run()

        return refusing_capture

    def cpu_passes_only(self, grads, table: np.ndarray, step: int) -> None:
        """A matrix-stage definition's two elementwise passes on the CPU without the stage
        between them (what the benchmark times against its traffic roofline)."""
        parallel = parallel_ok(self.parallel)
        args = (*self._fixed, grads, table, step, 1.0, 1.0, 0, parallel)
        with kernel_guard(parallel):
            self._first[parallel](*args)
            (self._fn if parallel else self._serial)(*args)

    def matrix_stage(self) -> None:
        """The definition's matrix stage (Muon's Newton-Schulz) on each tensor's direction, as
        a (rows, cols) matrix, in place: after the first pass, before the update. On a GPU
        it runs on the current stream, between the kernel launches (no host sync; with
        ``stage="torch"`` on torch's current stream, which fastopt.torch launches on)."""
        stage, table = self.definition.matrix, self.segments
        direction = self._segment_arrays[-1]
        for offset, shape in zip(table.offsets, table.shapes, strict=True):
            rows, cols = shape
            view = direction[offset:offset + rows * cols].reshape(rows, cols)
            if self.stage == "torch":
                import torch

                matrix = torch.as_tensor(view)  # (the same memory: numpy, or cupy's device)
                matrix.copy_(stage.torch(matrix, self.hypers))
            else:
                view[...] = stage.numpy(view, self.hypers)

    def kernel_values(self, grads, table, table_rows: int, step_state, lr_out,
                      lr_scale: float, grad_mult: float, fresh: int, control=None) -> dict:
        """The CUDA kernel's arguments by name (``KERNEL_SIGNATURE``)."""
        if control is None:  # (numpy arrays: the host-built CUDA kernels of the tests)
            control = _NO_CONTROL_HOST if isinstance(self.params, np.ndarray) \
                else _no_control(self.params.device.id)
        s = self.states
        values = {"params": self.params, "grads": grads, "master": self.master,
                  **dict(zip(INT8_SCALES, self.scales, strict=False)),
                  "state0": s[0], "state1": s[1], "state2": s[2], "state3": s[3],
                  "table": table, "table_rows": table_rows, "step_state": step_state,
                  "lr_out": lr_out, "lr_scale": lr_scale, "grad_mult": grad_mult,
                  "control": control,
                  "weight_decay": self.weight_decay, "decoupled": self.decoupled,
                  "maximize": self.maximize, "fresh": int(fresh),
                  "master_mode": self.master_mode, "n": self.params.shape[0]}
        if self.segments is not None:
            arrays = self._segment_arrays
            names = [name for name, ctype in SEGMENT_SIGNATURE if ctype.endswith("*")]
            if self.definition.factored is not None:  # (the CUDA tables: segment_arrays)
                names += [name for name, ctype in FACTORED_SIGNATURE if ctype.endswith("*")]
                values["n_rows"] = arrays[names.index("row_sq")].shape[0]
                values["n_cols"] = arrays[names.index("col_sq")].shape[0]
            values.update(zip(names, arrays, strict=True))
            values["n_segments"] = len(self.segments)
        values.update((f"h{i}", v) for i, v in enumerate(self.slots))
        values.update((f"scalar{i}", v) for i, v in enumerate(self.scalars))
        return values


#: the per-chunk sums of a factored definition's kernel (p^2 and u^2 per tensor)
FACTORED_SUMS = 2


def segment_arrays(d: Definition, segments: SegmentTable, params, on_gpu: bool) -> tuple:
    """A segmented kernel's tables and buffers (``CPU_SEGMENT_ARGS``): the segment and chunk
    tables where the params are, the partial sums and per-tensor values it writes, and a
    matrix stage's float32 directions (n elements; one otherwise); for factored moments
    (Adafactor) also the factors' layout, which tensors are factored and the statistics'
    tables and buffers: ``codegen.FACTORED_ARGS`` on the CPU, ``FACTORED_SIGNATURE``'s
    on a GPU."""
    if segments.size != params.shape[0]:
        raise ValueError(f"a segment table for {segments.size} elements, the params have "
                         f"{params.shape[0]}")
    if on_gpu and not isinstance(params, np.ndarray):
        xp = _xp(params)
        rows, chunks = segments.device(xp, params.device.id)
    else:  # (numpy: the CPU, or the host-built CUDA kernels of the tests)
        xp, rows, chunks = np, segments.rows, segments.chunks
    base = (rows, chunks,
            xp.zeros((chunks.shape[0], FACTORED_SUMS if d.factored is not None
                      else len(d.reductions)), dtype=np.float64),
            xp.zeros((rows.shape[0], REDUCTION_SLOTS), dtype=np.float64),
            xp.zeros(params.shape[0] if d.matrix is not None else 1, dtype=np.float32))
    if d.factored is None:
        return base
    layout, (n_rows, n_cols, _) = segments.factored_layout()
    factored = np.array([len(shape) >= 2 for shape in segments.shapes], dtype=np.int64)
    if on_gpu:  # FACTORED_SIGNATURE's tables and buffers (kernels/factored.cuh)
        fold, tiles, means, row_sums, col_sums = segments.gpu_plan()

        def made():
            return base + (*(xp.asarray(t) for t in (layout, factored, fold, tiles, means)),
                           *(xp.zeros(size) for size in (n_rows, n_cols, row_sums, col_sums)),
                           xp.zeros(n_rows, dtype=np.float32))

        if xp is np:  # (the host-built kernels of the tests)
            return made()
        with xp.cuda.Device(params.device.id):  # (where the params are, not the current one)
            return made()
    # the CPU's: codegen.FACTORED_ARGS
    blocks, partial = segments.row_blocks()
    return base + (layout, factored, blocks, np.zeros(n_rows), np.zeros(partial),
                   np.zeros(n_cols), np.zeros(n_rows, dtype=np.float32))


def run_once(prepared: Prepared, grads, schedule, step: int, lr_scale: float,
             grad_mult: float, fresh: int) -> float:
    """One kernel call for step ``step`` (1-based) that keeps no device state between calls
    (the functional layer, fastopt.torch): on a GPU the step counter is a new device array
    set by a fill on the stream and the schedule's table is copied once per device. Returns
    the lr the kernel used (on a GPU computed on the host, the same evaluator)."""
    if not prepared.on_gpu:
        return prepared.cpu(grads, schedule.table, step, lr_scale, grad_mult, fresh)
    params = prepared.params
    xp = _xp(params)
    step_state = xp.zeros(2, dtype=np.uint64)
    step_state[0] = step - 1
    prepared.gpu(grads, device_table(schedule, params.device.id), schedule.table.shape[0],
                 step_state, xp.empty(1, dtype=np.float64), lr_scale, grad_mult, fresh)
    return host_lr(schedule, step - 1) * lr_scale


_NO_CONTROL_HOST = np.array([1.0, 0.0])


def _refuse_cublas_in_capture(name: str) -> None:
    """Raise before the update's launches if the current CuPy stream is capturing a graph
    (a clipped or skippable step has captured its gradient-norm kernels by then): a matrix
    stage on CuPy calls cuBLAS, which CuPy refuses during stream capture (CuPy 14:
    NotImplementedError, with the first pass already captured)."""
    import cupy

    if cupy.cuda.get_current_stream().is_capturing():
        raise RuntimeError(
            f"{name}'s matrix stage runs on CuPy's cuBLAS matmul, which CuPy refuses while a "
            "stream captures a CUDA graph: step it eagerly, or capture fastopt.torch's "
            "optimizer (its stage runs on torch's matmul)")


@functools.cache
def _no_control(device_id: int):
    """The kernels' ``control`` for a step without clipping or skipping: factor 1, no skip
    (one per device, never written)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.asarray([1.0, 0.0])


@functools.lru_cache(maxsize=64)
def device_table(schedule, device_id: int):
    """A schedule's table on a GPU, copied once per (schedule, device); schedules are
    immutable, so the copy stays valid."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.asarray(schedule.table)


def _xp(array):
    from ._checks import xp_of

    return xp_of(array)
