"""Argument checks shared by the functional layer and the optimizers (errors at the edge)."""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from .schedules import Schedule, as_schedule


class ArrayArgumentError(TypeError, ValueError):
    """A buffer argument of the wrong kind, dtype, shape, layout or length.

    Both a ``TypeError`` and a ``ValueError`` (like numpy's ``AxisError`` is both a ``ValueError``
    and an ``IndexError``): catch whichever fits your code.
    """


def is_cupy(array) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def array_module(array) -> str:
    """'numpy' or 'cupy': the one place the backend is chosen from an array's type."""
    if isinstance(array, np.ndarray):
        return "numpy"
    if is_cupy(array):
        return "cupy"
    raise ArrayArgumentError(
        f"expected a numpy.ndarray (or a cupy.ndarray), got {type(array).__name__}")


#: element types each backend's kernels take for params and grads (state: float32, or uint16
#: holding bfloat16 bits)
PARAM_DTYPES = {"numpy": ("float32", "float16", "bfloat16"),
                "cupy": ("float32", "float16", "bfloat16")}
#: the params' formats as the CPU kernels take them (their ``fmt`` argument): a numpy dtype,
#: which Numba types at compile time, so each specialisation holds one format's conversions
#: (fastopt/cpu/convert.py); uint16 stands for bfloat16 bits, which Numba has no type for
FORMATS = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(np.uint16)}
#: the 16-bit ones: a raw uint16 buffer holds one of them (``dtype=``)
HALF_FORMATS = ("float16", "bfloat16")


def dtypes(spec) -> tuple:
    """numpy dtype objects from a dtype, a name or a tuple of them ('bfloat16' needs
    ml_dtypes; without it that name is skipped). Memoised: it runs on every step."""
    if isinstance(spec, tuple) and all(isinstance(d, np.dtype) for d in spec):
        return spec
    return _dtypes(tuple(spec) if isinstance(spec, list) else spec)


@functools.lru_cache(maxsize=64)
def _dtypes(spec) -> tuple:
    out = []
    for d in spec if isinstance(spec, tuple) else (spec,):
        if isinstance(d, str) and d == "bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                continue
            d = ml_dtypes.bfloat16
        out.append(np.dtype(d))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, memoised (numpy 2's ``.name`` is a Python property costing microseconds)."""
    return dtype.name


def dtype_arg(dtype) -> str | None:
    """A ``dtype=`` argument's name: 'float16' from "float16", np.float16 or
    np.dtype('float16'); 'bfloat16' likewise (ml_dtypes.bfloat16); None stays None."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def param_dtype(array, dtype=None) -> str:
    """The element type a buffer holds: its own, or ``dtype`` for raw uint16 bits."""
    if dtype is None:
        return array.dtype.name
    name = dtype_arg(dtype)
    if name not in HALF_FORMATS:
        raise ValueError(f"dtype must be 'float16' or 'bfloat16' for uint16 buffers, got "
                         f"{dtype!r}")
    if array.dtype.name not in ("uint16", name):
        raise ArrayArgumentError(f"dtype={name!r} describes uint16 bits, but the buffer has "
                                 f"dtype {array.dtype}")
    return name


def kernel_view(array):
    """The buffer as the CPU kernels take it: float32 as is, 16-bit formats as uint16 bits."""
    return array if array.dtype == np.float32 else array.view(np.uint16)


def xp_of(array):
    """numpy or cupy, whichever the array belongs to."""
    if array_module(array) == "cupy":
        import cupy

        return cupy
    return np


def check_buffer(name: str, array, size: int | None = None, *, writable: bool = True,
                 like=None, dtype=None, size_of: str | None = None):
    """A 1-D C-contiguous array of ``size`` elements (writable if asked) of a kernel dtype.

    ``like``: the params array; the buffer must then be of the same kind (numpy/cupy) and,
    for cupy, on the same device. ``dtype``: the dtype (or tuple of dtypes) wanted (default:
    any param dtype). ``size_of``: what ``size`` is (default: the params' length).
    """
    module = array_module(array)
    if like is not None:
        expected = array_module(like)
        if module != expected:
            raise ArrayArgumentError(f"{name} is a {module} array but params is a {expected} "
                                     "array")
        if module == "cupy" and array.device.id != like.device.id:
            raise ArrayArgumentError(f"{name} is on GPU {array.device.id} but params is on GPU "
                                     f"{like.device.id}")
    allowed = dtypes(PARAM_DTYPES[module] if dtype is None else dtype)
    if array.dtype not in allowed:  # dtype objects: a C-level comparison on the step path
        names = " or ".join(d.name for d in allowed)
        raise ArrayArgumentError(f"{name} must have dtype {names}, got {array.dtype}")
    if array.ndim != 1:
        raise ArrayArgumentError(f"{name} must be 1-D, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ArrayArgumentError(f"{name} must be contiguous (got a strided view)")
    if writable and module == "numpy" and not array.flags.writeable:
        raise ArrayArgumentError(f"{name} must be writable (got a read-only array)")
    if size is not None and array.shape[0] != size:
        what = size_of or ("like params" if like is not None and size != 1
                           else "(a per-step scalar)")
        raise ArrayArgumentError(f"{name} must have {size} elements {what}, "
                                 f"got {array.shape[0]}")
    return array


def check_disjoint(**arrays) -> None:
    """No two of the named buffers may share memory (a kernel would read what it wrote)."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    for i, (name, array) in enumerate(items):
        check_apart(name, array, items[i + 1:])


def check_apart(name: str, array, others) -> None:
    """``array`` shares memory with none of the (name, buffer) pairs in ``others``."""
    xp = xp_of(array)
    for other_name, other in others:
        if xp.may_share_memory(array, other):
            raise ArrayArgumentError(f"{name} and {other_name} must not share memory")


def check_step(step) -> int:
    """The 1-based number of the step being taken."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer (the 1-based step number), got {step!r}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the k-th step uses schedule.at(k - 1)), got {step}")
    if step >= 2**63:
        raise ValueError(f"step must be < 2**63 (the kernels take it as a signed 64-bit "
                         f"int), got {step}")
    return int(step)


def check_lr(lr) -> Schedule:
    """A Schedule from a Schedule or a learning rate >= 0 (torch's message)."""
    if isinstance(lr, Schedule):
        return lr
    value = _as_real(lr)
    if value is None or not 0.0 <= value < math.inf:
        raise _invalid(f"Invalid learning rate: {lr}", lr)
    return as_schedule(value)


def check_real(name: str, value, low: float = 0.0, high: float = math.inf,
               high_open: bool = False, message: str | None = None) -> float:
    """A real in [low, high] (or [low, high)); torch-style ValueError otherwise.

    ``message``: a template with ``{value}``, formatted only on error (this runs every step).
    """
    number = value if type(value) is float else _as_real(value)
    if number is None or not (low <= number <= high) or (high_open and number == high):
        template = message or "Invalid {name} value: {value}"
        raise _invalid(template.format(name=name, value=value), value)
    return number


def _as_real(value) -> float | None:
    """A real number's float (a 0-d numpy array of one too, as torch's comparisons take it),
    or None."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return None


def _invalid(message: str, value) -> Exception:
    """A bad hyperparameter's error: TypeError for what is no real number at all (a string,
    None, a bool, a list: torch's comparisons raise TypeError there), else ValueError."""
    if _as_real(value) is None and not (isinstance(value, numbers.Integral)
                                        and not isinstance(value, bool)):
        return TypeError(f"{message} (a {type(value).__name__}: it must be a real number)")
    return ValueError(message)


_BETA_MESSAGES = ("Invalid beta parameter at index 0: {value}",
                  "Invalid beta parameter at index 1: {value}")


def check_betas(betas) -> tuple[float, float]:
    """(beta1, beta2), each in [0, 1)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    return (check_real("beta", beta1, 0.0, 1.0, high_open=True, message=_BETA_MESSAGES[0]),
            check_real("beta", beta2, 0.0, 1.0, high_open=True, message=_BETA_MESSAGES[1]))


def check_eps(eps) -> float:
    return check_real("epsilon", eps)


#: The smallest eps the kernels are given (the smallest normal float32). With eps = 0 an
#: element whose state and gradient are zero (FlatBuffer padding, say) would compute 0/0 = NaN;
#: with this floor it computes 0. Any nonzero state gives a denominator (sqrt(v) >= 3.7e-23)
#: that absorbs the floor entirely, so every other result is unchanged.
EPS_FLOOR = float(np.finfo(np.float32).tiny)


def kernel_eps(eps: float) -> float:
    """The eps the kernels compute with: ``eps``, or EPS_FLOOR where it is smaller."""
    return eps if eps >= EPS_FLOOR else EPS_FLOOR


def check_weight_decay(weight_decay) -> float:
    """A finite weight decay >= 0 (torch's message; inf would turn every param into inf)."""
    return check_real("weight_decay", weight_decay, high_open=True)


def check_lr_scale(lr_scale) -> float:
    """A finite multiplier >= 0 on the scheduled lr (inf would turn every param into inf)."""
    return check_real("lr_scale", lr_scale, high_open=True)


#: the range of 1 / grad_scale: the kernels multiply each gradient by it as a float32, so it
#: must be a normal float32 (a smaller one flushes every gradient to 0, a larger one to inf)
_FLOAT32_NORMAL = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def grad_mult(grad_scale) -> float:
    """1 / grad_scale: the kernels multiply every gradient by it (as a float32) in their pass.

    grad_scale must be > 0 with 1 / grad_scale a normal float32 (about 2.9e-39 <= grad_scale
    <= 8.5e37); outside that range the unscaled gradients would be flushed to 0 or inf.
    """
    scale = check_real("grad_scale", grad_scale)
    if scale == 0.0 or not _FLOAT32_NORMAL[0] <= 1.0 / scale <= _FLOAT32_NORMAL[1]:
        raise ValueError(f"Invalid grad_scale value: {grad_scale} (1 / grad_scale must be a "
                         "normal float32)")
    return 1.0 / scale


def check_max_grad_norm(max_grad_norm) -> float | None:
    """None (no clipping) or a norm > 0."""
    if max_grad_norm is None:
        return None
    value = check_real("max_grad_norm", max_grad_norm)  # inf: never clips
    if value == 0.0:
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
    return value


def check_master_weights(master_weights, dtype: str | None = None) -> str:
    """``master_weights`` checked (ValueError): one of MASTER_WEIGHTS, and "remainder" not for
    float16 params (``dtype``: the params' format, when known). float32 params need no master
    whatever the mode."""
    from .algorithms._spec import MASTER_WEIGHTS

    if not isinstance(master_weights, str) or master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"master_weights must be one of {', '.join(map(repr, MASTER_WEIGHTS))}"
                         f", got {master_weights!r}")
    if master_weights == "remainder" and dtype == "float16":
        raise ValueError("master_weights='remainder' keeps the float32 master as bfloat16 "
                         "params plus their 16-bit remainders, which float16 params cannot "
                         "hold (float16 has 5 exponent bits, not float32's 8): give float16 "
                         "params master_weights='fp32' or 'none', or use bfloat16 params")
    return master_weights
