"""A stand-in for CuPy that runs fastopt's GPU code path on the CPU (tests only).

``tests/test_gpu_emulated.py`` puts this folder first on ``PYTHONPATH`` and runs
``tests/test_gpu.py`` and ``bench/gpu_check.py`` against it, so the Python side of the GPU
backend (dispatch, argument packing by ``KERNEL_SIGNATURE``, kernel names, the
device-resident step counter, graph capture, state dicts) runs on every CI machine. The math
of the CUDA kernels themselves is checked elsewhere (``tests/test_cuda_host.py`` builds the .cu
files with g++); here a launched kernel runs the Numba kernel of the same name and arguments.

Stricter than the real thing where that finds bugs: arrays refuse implicit conversion to
numpy and mixing with numpy arrays (as CuPy does), kernel arguments must have the exact C
types the kernel declares, and while a stream captures a graph any host read-back, host copy
or allocation raises (CUDA forbids them in capture; CuPy's pool may allocate, but a step that
needs memory is not replayable anyway).
"""

from __future__ import annotations

import ctypes
import inspect
import operator
import re

import numpy as np

from . import cuda, random, testing  # noqa: F401  (cupy.cuda, cupy.random, cupy.testing)

float16, float32, float64 = np.float16, np.float32, np.float64
uint16, uint32, uint64, int32, int64 = np.uint16, np.uint32, np.uint64, np.int32, np.int64
nan, inf = np.nan, np.inf


class CaptureError(RuntimeError):
    """What CUDA reports for a forbidden operation during stream capture."""


def _device_op(fn, *args) -> ndarray:
    """``fn`` of the arrays' values as a new device array; in graph capture also recorded,
    so a replay recomputes it into the same array from the inputs' values then (as CuPy's
    kernels are captured)."""
    result = ndarray(np.asarray(fn(*(_unwrap(a) for a in args))))
    stream = cuda.get_current_stream()
    if stream.capturing:
        def replay():
            np.copyto(result._a, fn(*(_unwrap(a) for a in args)), casting="unsafe")
        stream.recorded.append((None, replay))
    return result


def _no_capture(what: str) -> None:
    stream = cuda.get_current_stream()
    if stream.capturing:
        raise CaptureError(f"cudaErrorStreamCaptureUnsupported: {what} while the stream "
                           "is capturing a graph")


class _Flags:
    def __init__(self, a: np.ndarray):
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.flags.owndata


class _Pointer:
    def __init__(self, a: np.ndarray):
        self.ptr = a.ctypes.data


class ndarray:  # noqa: N801  (CuPy's name)
    """Device array: a numpy array that stays behind the device boundary."""

    def __init__(self, a: np.ndarray):
        self._a = a

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _Pointer(self._a))
    device = property(lambda self: cuda.Device(0))
    T = property(lambda self: ndarray(self._a.T))

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None) -> np.ndarray:
        _no_capture("device-to-host copy (.get())")
        return self._a.copy()

    def __getitem__(self, key):
        out = self._a[_unwrap(key)]
        return ndarray(out) if isinstance(out, np.ndarray) else ndarray(np.asarray(out))

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and value.ndim:
            _no_capture("host-to-device copy")
            transfers["host_to_device"] += 1
        self._a[_unwrap(key)] = _unwrap(value)
        stream = cuda.get_current_stream()
        if stream.capturing:  # recorded: a replay copies the value it has then
            where = _unwrap(key)

            def replay(target=self._a, where=where, value=value):
                target[where] = _unwrap(value)
            stream.recorded.append((None, replay))

    def __len__(self):
        return len(self._a)

    def astype(self, dtype, copy=True):
        return _device_op(lambda a: a.astype(dtype), self)

    def view(self, dtype=None):
        return ndarray(self._a.view(dtype))

    def copy(self):
        return ndarray(self._a.copy())

    def reshape(self, *shape):
        return ndarray(self._a.reshape(*shape))

    def ravel(self):
        return ndarray(self._a.ravel())

    def fill(self, value):
        self._a.fill(value)

    def sum(self, *args, **kwargs):  # (device kernels: recorded in a graph capture)
        return _device_op(lambda a: a.sum(*args, **kwargs), self)

    def max(self, *args, **kwargs):
        return _device_op(lambda a: a.max(*args, **kwargs), self)

    def __repr__(self):
        return f"fake_cupy.array({self._a!r})"


def _binary(op, reflected=False):
    def method(self, other):
        if isinstance(other, np.ndarray) and other.ndim:
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")
        return _device_op(lambda a, b: op(b, a) if reflected else op(a, b), self, other)

    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "lshift", "rshift", "matmul", "lt", "le", "gt", "ge", "eq", "ne"):
    _op = getattr(operator, _name if _name not in ("and", "or") else _name + "_")
    setattr(ndarray, f"__{_name}__", _binary(_op))
    if _name not in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(ndarray, f"__r{_name}__", _binary(_op, reflected=True))


def _cublas(method):
    """A matrix product: cuBLAS, which CuPy 14 refuses during stream capture (as here)."""
    def checked(self, other):
        if cuda.get_current_stream().capturing:
            raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                      "unsupported")
        return method(self, other)

    return checked


ndarray.__matmul__ = _cublas(ndarray.__matmul__)
ndarray.__rmatmul__ = _cublas(ndarray.__rmatmul__)
def _host_read(convert):
    """A conversion that reads the device value back to the host (forbidden in capture)."""

    def method(self):
        _no_capture("device-to-host read")
        return convert(self._a)

    return method


for _name, _convert in (("__float__", float), ("__int__", int), ("__bool__", bool),
                        ("item", np.ndarray.item)):
    setattr(ndarray, _name, _host_read(_convert))
ndarray.__neg__ = lambda self: ndarray(-self._a)
ndarray.__abs__ = lambda self: ndarray(np.abs(self._a))
ndarray.__hash__ = None


def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, tuple):
        return tuple(_unwrap(e) for e in x)
    return x


def _alloc(a: np.ndarray) -> ndarray:
    _no_capture("memory allocation")
    return ndarray(a)


#: host-to-device copies made so far (a test can check a step makes none)
transfers = {"host_to_device": 0}


def asarray(x, dtype=None):
    if isinstance(x, ndarray):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    _no_capture("host-to-device copy")
    transfers["host_to_device"] += 1
    return ndarray(np.array(x, dtype=dtype))


array = asarray


def zeros(shape, dtype=float):
    return _alloc(np.zeros(shape, dtype))


def ones(shape, dtype=float):
    return _alloc(np.ones(shape, dtype))


def empty(shape, dtype=float):
    return _alloc(np.empty(shape, dtype))


def full(shape, fill_value, dtype=None):
    return _alloc(np.full(shape, _unwrap(fill_value), dtype))


def zeros_like(a, dtype=None):
    return _alloc(np.zeros_like(_unwrap(a), dtype))


def empty_like(a, dtype=None):
    return _alloc(np.empty_like(_unwrap(a), dtype))


def _device_only(*arrays):
    for a in arrays:
        if isinstance(a, np.ndarray) and a.ndim:
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")
    return [_unwrap(a) for a in arrays]


def where(condition, x, y):
    _device_only(condition, x, y)
    return _device_op(np.where, condition, x, y)


def dot(a, b):
    _device_only(a, b)
    return _device_op(np.dot, a, b)


def sqrt(a):
    _device_only(a)
    return _device_op(np.sqrt, a)


def maximum(a, b):
    _device_only(a, b)
    return _device_op(np.maximum, a, b)


def isfinite(a):
    _device_only(a)
    return _device_op(np.isfinite, a)


def copyto(dst, src):
    np.copyto(*_device_only(dst, src))


def may_share_memory(a, b, max_work=None):
    if not (isinstance(a, ndarray) and isinstance(b, ndarray)):
        return False
    return np.may_share_memory(a._a, b._a)


def from_dlpack(x):
    raise TypeError("this fake CuPy has no DLPack import (there are no CUDA tensors here)")


# ---------------------------------------------------------------------------- kernels


class RawModule:
    """Holds the CUDA source; ``get_function`` checks the kernel is defined in it."""

    def __init__(self, code: str, options=(), name_expressions=None, **_):
        if not all(isinstance(o, str) for o in options):
            raise TypeError(f"NVRTC options must be strings, got {options!r}")
        self.code, self.options = code, tuple(options)

    def get_function(self, name: str) -> _Kernel:
        if not re.search(rf"\b{re.escape(name)}\b", self.code):
            raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        if name.startswith("fo_"):  # the driver's own kernels (kernels/control.cu)
            return _ControlKernel(name)
        return _Kernel(name)


class _ControlKernel:
    """kernels/control.cu's gradient-norm kernels, in numpy with the same summation order
    (per thread of the grid, each block's threads in order, then per thread of the last
    block, those in order)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, grid, block, args, **_):
        values = [_unwrap(a) if isinstance(a, ndarray) else a for a in args]
        if any(isinstance(a, np.ndarray) and not isinstance(a, ndarray) and a.ndim
               for a in args):
            raise TypeError(f"{self.name}: host arrays cannot be kernel arguments")
        if block[0] > 256:  # (FO_REDUCE_THREADS: the kernels' shared arrays)
            raise RuntimeError(f"{self.name}: more threads per block than FO_REDUCE_THREADS")
        stream = cuda.get_current_stream()
        call = (grid[0], block[0], values)
        if stream.capturing:
            stream.recorded.append((self, call))
        else:
            self.run(call)

    @staticmethod
    def _strided_then_ordered(values: np.ndarray, threads: int, block: int) -> np.ndarray:
        """Each thread's strided sum (thread t: values t, t + threads, ...), then each
        block's sums added in thread order."""
        padded = np.zeros(-(-values.size // threads) * threads)
        padded[: values.size] = values
        per_thread = padded.reshape(-1, threads).sum(axis=0)
        totals = []
        for b in range(threads // block):
            total = 0.0
            for t in per_thread[b * block:(b + 1) * block]:
                total += t
            totals.append(total)
        return np.array(totals)

    def run(self, call) -> None:
        grid, block, v = call
        if self.name.startswith("fo_grad_sq_"):
            grads, n, partial = v
            if grads.dtype == np.uint16:  # raw bits: their format's values
                grads = (_bf16_values(grads) if self.name.endswith("bf16")
                         else grads.view(np.float16))
            g = grads[: int(n)].astype(np.float64)
            partial[:grid] = self._strided_then_ordered(g * g, grid * block, block)
        else:  # fo_grad_control (one block)
            partial, parts, mult, max_norm, skip, norm_out, control = v
            total = self._strided_then_ordered(partial[: int(parts)], block, block)[0]
            with np.errstate(all="ignore"):
                norm = float(np.sqrt(total)) * float(mult)
                coef = 1.0
                if max_norm > 0.0:
                    coef = float(max_norm) / (norm + 1e-6)
                    coef = 1.0 if coef >= 1.0 else coef
            norm_out[0] = norm
            control[0] = coef
            control[1] = 1.0 if (skip and not np.isfinite(norm)) else 0.0


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


#: a tensor-aware kernel's passes before its update (``<op>_<pass>...``), and those of them
#: with one entry point for every format
_PASSES = ("reduce", "segment", "stats", "fold", "means")
_UNTYPED = ("segment", "fold", "means")


#: a factored pass -> its work items, from its arguments: a block each (stats: the tiles;
#: means: their entries; segment: the tensors) or a thread each (fold: the factors)
_GRID_OF = {"stats": lambda a: (len(a["tiles"]._a), False),
            "means": lambda a: (len(a["means"]._a), False),
            "segment": lambda a: (int(a["n_segments"]), False),
            "fold": lambda a: (int(a["n_rows"]) + int(a["n_cols"]), True)}


def _grid_misses_work(kernel, grid: int, block: int, spec, args) -> bool:
    """Whether a tensor-aware pass's launch shape misses its work: a block per item exactly,
    or enough threads for a thread per item."""
    items, per_thread = _GRID_OF[kernel.pass_](dict(zip((n for n, _ in spec), args,
                                                         strict=True)))
    if per_thread:
        return grid != -(-items // block)
    return grid != items


def _cpu_row_blocks(segments: np.ndarray, factored: np.ndarray, n: int) -> dict:
    """The Numba factored kernel's ``blocks`` and ``col_partial`` for the tensors of the
    segment table (factored ones as (batch, rows, cols), the others flat)."""
    from fastopt.segments import SegmentTable

    shapes = [(int(b), int(r), int(c)) if f else (int(b * r * c),)
              for (_, b, r, c, *_), f in zip(segments, factored, strict=True)]
    blocks, size = SegmentTable([int(o) for o in segments[:, 0]], shapes, n).row_blocks()
    return {"blocks": blocks, "col_partial": np.zeros(size)}


#: C type of a by-value kernel argument -> the numpy scalar type it must be packed as
_SCALARS = {"double": np.float64, "int": np.int32, "long long": np.int64}
_POINTERS = {"float*": np.float32, "const double*": np.float64, "double*": np.float64,
             "unsigned long long*": np.uint64, "const long long*": np.int64}
#: what a T* argument may hold: the format's own dtype or its raw bits (CuPy has no bfloat16)
_PARAM_TYPES = {"f32": (np.float32,), "f16": (np.float16, np.uint16), "bf16": (np.uint16,)}
#: the params' format (fastopt._checks.FORMATS names; the CPU kernels' ``fmt``) by suffix
_FORMATS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _at(address: int, count: int, dtype) -> np.ndarray:
    """``count`` elements of ``dtype`` at a device (here: host) address."""
    if count == 0 or address == 0:
        return np.zeros(count, dtype)
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(address),
                         dtype=dtype)


class _Kernel:
    """One variant, e.g. ``adam_bf16_sbf16``: runs the Numba kernel of the same op."""

    def __init__(self, name: str):
        parts = name.split("_")
        self.name, self.op = name, parts[0]
        #: an int8-state kernel (``adam_int8_f32``): the Numba ``<op>_int8`` kernel
        self.int8 = parts[1] == "int8"
        if self.int8:
            parts = [parts[0], *parts[2:]]
        #: a multi-tensor launch (``adam_multi_f32``, ``adam_int8_multi_f32``): the Numba
        #: kernel on each tensor of its table, the step counter advanced once
        self.multi = parts[1] == "multi"
        if self.multi:
            parts = [parts[0], *parts[2:]]
        #: a tensor-aware kernel's reduce or segment pass (``lamb_reduce_f32``,
        #: ``lamb_segment``): checked, then nothing, as the Numba kernel the update pass runs
        #: does all three; with a matrix stage (Muon) the reduce pass runs the Numba first
        #: pass (``muon_first``), the update pass the rest
        #: with factored moments (Adafactor) also its stats, fold and means passes: checked,
        #: then nothing
        self.pass_ = parts[1] if parts[1] in _PASSES else None
        self.suffix = "f32" if self.pass_ in _UNTYPED else parts[2 if self.pass_ else 1]
        self.state_type = np.uint8 if self.int8 else np.uint16 if name.endswith("_sbf16") \
            else np.float32

    def __call__(self, grid, block, args, **_):
        from fastopt.algorithms import REGISTRY
        from fastopt.algorithms._spec import (
            FACTORED_SIGNATURE,
            INT8_SIGNATURE,
            KERNEL_SIGNATURE,
            MULTI_SIGNATURE,
            SEGMENT_SIGNATURE,
        )

        if not (len(grid) >= 1 and len(block) >= 1 and grid[0] >= 1 and block[0] >= 1):
            raise ValueError(f"bad launch shape {grid} x {block}")
        d = REGISTRY[self.op]
        segmented = d.segmented
        spec = KERNEL_SIGNATURE + (SEGMENT_SIGNATURE if segmented else ()) \
            + (FACTORED_SIGNATURE if d.factored is not None else ()) \
            + (INT8_SIGNATURE if self.int8 else ()) + (MULTI_SIGNATURE if self.multi else ())
        if self.multi and not d.multi_launch:
            raise ValueError(f"{self.name}: {self.op} has no multi-tensor launch")
        if self.multi and grid[0] != len(args[[name for name, _ in spec].index("chunks")]):
            raise ValueError(f"{self.name}: a block per chunk, got a grid of {grid[0]}")
        if segmented and self.pass_ in (None, "reduce") \
                and grid[0] != len(args[[name for name, _ in spec].index("chunks")]):
            raise ValueError(f"{self.name}: a block per chunk, got a grid of {grid[0]}")
        if len(args) != len(spec):
            raise TypeError(f"{self.name} takes {len(spec)} arguments, got {len(args)}")
        if self.pass_ in _GRID_OF and _grid_misses_work(self, grid[0], block[0], spec, args):
            raise ValueError(f"{self.name}: grid {grid[0]} x {block[0]} does not cover its "
                             "work (fastopt.gpu.launch.segmented_passes)")
        if self.int8 and block[0] % 32:  # a warp per block of INT8_BLOCK elements
            raise ValueError(f"{self.name}: blocks of whole warps, got {block[0]} threads")
        values = {}
        names = [name for name, _ in spec]
        mode = args[names.index("master_mode")]
        for (name, ctype), value in zip(spec, args, strict=True):
            values[name] = self._checked(name, ctype, value, mode)
        first = self.pass_ == "reduce" and REGISTRY[self.op].matrix is not None
        if self.pass_ is not None and not first:
            return
        stream = cuda.get_current_stream()
        if stream.capturing:
            stream.recorded.append((self, values))
        else:
            self.run(values)

    def _checked(self, name, ctype, value, master_mode=0):
        from fastopt.algorithms._spec import MASTER_MODES

        if ctype in _SCALARS:
            if type(value) is not _SCALARS[ctype]:
                raise TypeError(f"{self.name}: {name} must be packed as {_SCALARS[ctype]}, "
                                f"got {type(value)}")
            return value
        if not isinstance(value, ndarray):
            raise TypeError(f"{self.name}: {name} must be a device array, got {type(value)}")
        if self.pass_ in _UNTYPED and ctype in ("T*", "const T*", "S*"):
            return value._a  # (one entry point for every format: it reads no element)
        want = {"T*": _PARAM_TYPES[self.suffix], "const T*": _PARAM_TYPES[self.suffix],
                "S*": (self.state_type,)}.get(ctype) or (_POINTERS[ctype],)
        if name == "master" and self.suffix != "f32":  # (what it holds: master_mode's)
            if master_mode not in MASTER_MODES.values() or (
                    master_mode == MASTER_MODES["remainder"] and self.suffix != "bf16"):
                raise ValueError(f"{self.name}: master_mode {master_mode} for "
                                 f"{self.suffix} params")
            want = {MASTER_MODES["fp32"]: (np.float32,), MASTER_MODES["remainder"]: (np.int16,),
                    MASTER_MODES["none"]: _PARAM_TYPES[self.suffix]}[int(master_mode)]
        if value.dtype not in want:
            raise TypeError(f"{self.name}: {name} ({ctype}) must hold "
                            f"{' or '.join(np.dtype(w).name for w in want)}, got {value.dtype}")
        return value._a

    def run(self, values: dict) -> None:
        """The kernel's work (now, or at a replay of a captured graph)."""
        if self.multi:
            self._run_multi(values)
        else:
            self._run_one(values)

    def _run_multi(self, values: dict) -> None:
        """A multi-tensor launch: every chunk of the ``chunks`` table within its tensor, the
        chunks of each tensor tiling it exactly once; then the Numba kernel on each tensor of
        the ``tensors`` table (its buffers at the addresses the table holds, of the types the
        uniform arguments have) at the same step, and the shared counter advanced once."""
        from fastopt.algorithms import REGISTRY
        from fastopt.algorithms._spec import INT8_BLOCK, MULTI_CHUNK_ROW, MULTI_TABLE

        tensors, chunks = values["tensors"], values["chunks"]
        size = MULTI_TABLE.index("n")
        covered = {t: [] for t in range(len(tensors))}
        for row in chunks:
            chunk = dict(zip(MULTI_CHUNK_ROW, (int(v) for v in row), strict=True))
            covered[chunk["tensor"]].append((chunk["first"], chunk["stop"]))
        for t, spans in covered.items():
            n, at = int(tensors[t][size]), 0
            for first, stop in sorted(spans):
                if (first, stop) == (0, 0) and n == 0:
                    continue
                if first != at or not first < stop <= n or first % INT8_BLOCK:
                    raise ValueError(f"{self.name}: tensor {t}'s chunks {sorted(spans)} do "
                                     f"not tile its {n} elements")
                at = stop
            if at != n:
                raise ValueError(f"{self.name}: tensor {t}'s chunks stop at {at} of {n}")
        if values["control"][1] != 0.0:
            return
        state_slots = len(REGISTRY[self.op].state)
        step, lr = values["step_state"][0], None
        for row in tensors:
            n = int(row[size])
            one = dict(values, n=np.int64(n), step_state=np.array([step, 0], np.uint64),
                       lr_out=np.zeros(1))
            for slot, name in enumerate(MULTI_TABLE[:size]):
                if name not in values:  # (a kernel without int8 scales)
                    continue
                dummy = name.startswith("state") and int(name[5:]) >= state_slots
                count = 1 if dummy else -(-n // INT8_BLOCK) if name.startswith("scale") else n
                one[name] = _at(int(row[slot]), count, values[name].dtype)
            self._run_one(one)
            lr = one["lr_out"][0]
        values["lr_out"][0] = lr
        values["step_state"][0] = step + 1

    def _run_one(self, values: dict) -> None:
        """What the CUDA kernel does: nothing if control[1] (skip) is set; else step
        k = step_state[0] + 1, lr from the table, the update with grad_mult * control[0],
        lr_out[0] = lr, step_state[0] = k."""
        from fastopt._checks import FORMATS
        from fastopt.algorithms import REGISTRY
        from fastopt.engine import cpu_kernel, l2_term

        control = values["control"]
        if control[1] != 0.0:  # a skipped step: nothing changes, not even k
            return
        first = self.pass_ == "reduce"  # (a matrix stage's first pass)
        n = int(values["n"])
        kernel = cpu_kernel(self.op, f"{self.op}_first" if first else
                            f"{self.op}_int8" if self.int8 else "", parallel=n >= 16384)
        k = int(values["step_state"][0]) + 1
        table = values["table"][: int(values["table_rows"])].view()
        table.flags.writeable = False  # (the types fastopt.engine passes on the CPU, so that
        # the kernel's compiled specialisation is the CPU's, not one more to compile)
        extra = {"step": k, "fmt": FORMATS[_FORMATS[self.suffix]], "parallel": n >= 16384,
                 "table": table, "grad_mult": values["grad_mult"] * control[0],
                 "decoupled": bool(values["decoupled"]), "maximize": bool(values["maximize"]),
                 "fresh": int(values["fresh"]),
                 "l2": l2_term(REGISTRY[self.op], float(values["weight_decay"]),
                               bool(values["decoupled"]))}
        if "tiles" in values:  # factored moments: the CPU's row blocks in place of the tiles
            extra.update(_cpu_row_blocks(values["segments"], values["factored"], n))
        args = []
        for name in inspect.signature(kernel.py_func).parameters:
            value = extra[name] if name in extra else values[name]
            if isinstance(value, np.ndarray) and value.dtype == np.float16:
                value = value.view(np.uint16)
            if isinstance(value, np.ndarray) and value.ndim == 1 and name != "table":
                value = value[:n]
            args.append(value)
        lr = kernel(*args)
        if not first:
            values["lr_out"][0] = lr
            values["step_state"][0] = k
