"""The functional layer's machinery: argument checks, then ``fastopt.engine``.

``fastopt/functional.py`` (generated from the definitions) has one function per public
optimizer name with its explicit signature; each calls ``run`` here. ``run`` checks every
argument (buffers, hyperparameters with torch's messages, step, schedule), picks the backend
from the array type (numpy: the Numba kernels; cupy: the CUDA kernels, on the current stream)
and runs one kernel call. ``step`` is the 1-based number of the step being taken.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import cpu
from ._checks import (
    ArrayArgumentError,
    check_apart,
    check_buffer,
    check_disjoint,
    check_lr,
    check_lr_scale,
    check_master_weights,
    check_step,
    dtype_arg,
    dtype_name,
    grad_mult,
    is_cupy,
    kernel_view,
    param_dtype,
    xp_of,
)
from ._int8 import INT8_BLOCK, Int8State
from ._int8 import blocks as int8_blocks
from .algorithms import Definition
from .algorithms._spec import FRESH_AT_FIRST_STEP
from .engine import Prepared, run_once
from .schedules import Schedule
from .segments import segment_table


def _schedule(lr, schedule) -> Schedule:
    if schedule is not None and lr is not None:
        raise ValueError("give either lr or schedule, not both")
    return check_lr(schedule if schedule is not None else lr)


def _master_buffer(name: str, n: int, params, master, remainder, master_weights):
    """The master buffer of ``name`` params (the kernel's ``master``: a float32 master, int16
    remainders, or None for none), checked against ``master_weights`` (None: from which of
    ``master`` and ``remainder`` is given)."""
    if master_weights is not None:
        check_master_weights(master_weights, name)
    if master is not None and remainder is not None:
        raise ValueError("give master_param (master_weights='fp32') or remainder "
                         "(master_weights='remainder'), not both")
    if name == "float32":
        if remainder is not None:
            raise ValueError("remainder= is for bfloat16 params (the master's low 16 bits); "
                             "float32 params need no master")
        if master is not None:  # (it was ignored: a caller would keep a stale master)
            raise ValueError("master_param= is for 16-bit params (their float32 copy); "
                             "float32 params need no master, and the kernel would not "
                             "update it")
        return None
    mode = master_weights or ("fp32" if master is not None else
                              "remainder" if remainder is not None else None)
    if mode is None:
        raise ValueError(f"{name} params need master_param (their float32 copy), remainder "
                         "(bfloat16 params: the master's low 16 bits, int16), or "
                         "master_weights='none' (no master: stochastic rounding)")
    check_master_weights(mode, name)
    takes = {"fp32": master, "remainder": remainder, "none": None}[mode]
    if (mode != "none" and takes is None) or (master is not None and mode != "fp32") \
            or (remainder is not None and mode != "remainder"):
        raise ValueError(f"master_weights={mode!r} takes " + {
            "fp32": "master_param (and no remainder)", "remainder": "remainder (and no "
            "master_param)", "none": "neither master_param nor remainder"}[mode])
    if mode == "fp32":
        check_buffer("master", master, n, like=params, dtype=np.float32)
    elif mode == "remainder":
        check_buffer("remainder", remainder, n, like=params, dtype=np.int16)
    return takes


def _buffers(params, grads, master, dtype=None, sizes=None, remainder=None,
             master_weights=None, **state):
    """Check params, grads, the master and the state buffers together; return (size, dtype
    name, the kernel's master buffer).

    16-bit params need ``master``, their float32 copy, which the kernel reads and writes, or
    for bfloat16 params ``remainder``, the master's low 16 bits (int16), or
    ``master_weights='none'`` (no master: the kernel rounds the params stochastically); they
    may be given as uint16 bits with ``dtype`` ('float16' or 'bfloat16') naming the format
    (how cupy, which has no bfloat16, carries them). Grads have the params' array dtype.
    State buffers are float32, uint16 holding bfloat16 bits (stochastically rounded), or
    ``Int8State`` (codes and block scales, stochastically rounded: ``fastopt._int8``);
    ``sizes``: a function of (name, n) giving a buffer's length (factored state), else n.
    """
    allowed = None if dtype is None else ("uint16", dtype_arg(dtype))
    n = check_buffer("params", params, dtype=allowed).shape[0]
    check_buffer("grads", grads, n, writable=False, like=params, dtype=params.dtype)
    name = dtype_name(params.dtype) if dtype is None else param_dtype(params, dtype)
    master = _master_buffer(name, n, params, master, remainder, master_weights)
    given = [array for array in state.values() if array is not None]
    state_dtypes = {"int8" if isinstance(array, Int8State) else array.dtype for array in given}
    if len(state_dtypes) > 1:
        raise ArrayArgumentError("the state buffers must share one format (float32, uint16 "
                                 "bfloat16 bits, or fastopt.Int8State)")
    raw = {}
    for key, array in state.items():
        if isinstance(array, Int8State):  # int8 codes and each block's absmax
            check_buffer(f"{key}.codes", array.codes, n, like=params, dtype="uint8")
            check_buffer(f"{key}.absmax", array.absmax, int8_blocks(n), like=params,
                         dtype=np.float32, size_of=f"(one per {INT8_BLOCK} elements)")
            raw[f"{key}.codes"], raw[f"{key}.absmax"] = array.codes, array.absmax
        elif array is not None:  # float32, or bfloat16 bits (stochastically rounded state)
            check_buffer(key, array, n if sizes is None else sizes(key, n), like=params,
                         dtype=("float32", "uint16"),
                         size_of=None if sizes is None else "(its layout's share of the "
                                                            "tensors' rows, columns or "
                                                            "elements)")
            raw[key] = array
    check_disjoint(params=params, grads=grads, master=master, **raw)
    return n, name, master


def _empty_like(params):
    """A float32 buffer of no elements where the params are (numpy or cupy)."""
    return xp_of(params).zeros(0, dtype=np.float32)


def _check_factored(definition: Definition, buffers: dict) -> None:
    """What a definition with factored moments refuses: bfloat16 state (its factors are a
    value per row and column: bf16 saves almost nothing)."""
    if any(isinstance(b, Int8State) or b.dtype == np.uint16 for b in buffers.values()):
        raise ValueError(factored_refusal(definition))


def factored_refusal(definition: Definition) -> str:
    """Why a definition with factored moments (Adafactor) refuses 16- and 8-bit state."""
    return (f"{definition.classes[0].name} keeps factored state (a value per row and per "
            "column of each matrix), a small fraction of the params: it takes float32 state "
            "only (state_dtype='float32')")


def _parallel(n: int, params, *state) -> bool:
    """Whether to run the parallel loop, for these params and state formats
    (``cpu.parallel_min_size``)."""
    formats = {"int8" if isinstance(s, Int8State) else
               "float32" if s.dtype == np.float32 else "bfloat16" for s in state if s is not None}
    return cpu.use_parallel(n, min(cpu.parallel_min_size(params.dtype == np.float32, f)
                                   for f in formats or {"float32"}))


def take_alias(alias: str, alias_value, name: str, value):
    """A state buffer given under its deprecated spelling (kept for one release)."""
    if alias_value is None:
        return value
    if value is not None:
        raise TypeError(f"give {name} or its deprecated spelling {alias}, not both")
    warnings.warn(f"{alias}= is deprecated, use {name}=", DeprecationWarning, stacklevel=3)
    return alias_value


def run(definition: Definition, fixed: dict, params, grads, states: dict, *, step, lr,
        schedule, master, dtype, hypers: dict, lr_scale, grad_scale, fresh,
        scalars: dict | None = None, segments=None, remainder=None,
        master_weights=None) -> float:
    """Check everything, then one kernel call of ``definition`` for step ``step``; returns
    the lr the kernel used (schedule value times ``lr_scale``)."""
    sched = definition.check_schedule(_schedule(
        definition.lr_default if lr is None and schedule is None else lr, schedule))
    checked = definition.check({**definition.hyper_defaults, **hypers, **fixed})
    step, lr_scale, mult = check_step(step), check_lr_scale(lr_scale), grad_mult(grad_scale)
    active = definition.active_state(checked)
    if definition.segmented and segments is None:
        raise TypeError(f"{definition.classes[0].name} updates each tensor as a whole: "
                        "segments= (a SegmentTable, a FlatBuffer or the tensors' shapes) is "
                        "required")
    table = None
    if segments is not None:
        n_params = check_buffer("params", params).shape[0]
        table = segment_table(segments, n_params)
    states = dict(states)
    for name in definition.state_names:
        if name in active and states[name] is None:
            if definition.factored is not None \
                    and definition.state_size(name, n_params, table) == 0:
                states[name] = _empty_like(params)  # (no tensor of its layout: nothing)
                continue
            when = next(s.when for s in definition.state if s.name == name)
            raise ValueError(f"{name} is required" + (f" when {when}" if when else ""))
        if name not in active and states[name] is not None:  # (it would be left unchanged)
            when = next(s.when for s in definition.state if s.name == name)
            raise ValueError(f"{name} was given but this call does not use it: it is used "
                             f"only when {when}; pass that or leave {name} out")
    buffers = {name: states[name] for name in active}
    if any(isinstance(b, Int8State) for b in buffers.values()) \
            and definition.int8_refusal is not None:
        raise ValueError(definition.int8_refusal)
    sizes = None if definition.factored is None else (
        lambda key, n: definition.state_size(key, n, table))
    n, name, master = _buffers(params, grads, master, dtype, sizes, remainder, master_weights,
                               **buffers)
    if definition.factored is not None:
        _check_factored(definition, buffers)
    scalars = scalars or {}
    # (every array the kernel reads or writes: the kernels assume no two of them overlap)
    seen = [(key, value) for key, value in [("params", params), ("grads", grads),
                                            ("master", master)] if value is not None]
    for key, value in buffers.items():
        seen += [(f"{key}.codes", value.codes), (f"{key}.absmax", value.absmax)] \
            if isinstance(value, Int8State) else [(key, value)]
    for key, value in scalars.items():  # one-element float64 arrays, updated in place
        check_buffer(key, value, 1, like=params, dtype=np.float64)
        if not is_cupy(value) and not np.isfinite(value[0]):  # (on a GPU: no sync to read it)
            raise ValueError(f"{key} holds {value[0]}: a per-step scalar must be finite (it "
                             "starts at its documented value and the kernel updates it)")
        check_apart(key, value, seen)
        seen.append((key, value))
    fresh = FRESH_AT_FIRST_STEP if fresh is None else int(bool(fresh))
    on_gpu = is_cupy(params)
    prepared = Prepared(definition, params if on_gpu else kernel_view(params),
                        master, buffers, checked, name, on_gpu,
                        parallel=not on_gpu and _parallel(n, params, *buffers.values()),
                        scalars=scalars, one_shot=True, segments=table)
    return run_once(prepared, kernel_view(grads) if not on_gpu else grads, sched, step,
                    lr_scale, mult, fresh)


