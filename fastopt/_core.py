"""The machinery every stateful optimizer shares (``fastopt.<Name>``, generated per definition
in ``fastopt/optimizers.py``): one flat buffer of params (float32, or 16-bit with a float32
master), the schedule, the step counter, the state buffers and ``state_dict``.

Hyperparameters are checked once, at construction (and on ``load_state_dict``), with the
definition's checks (torch's messages); each step then goes to ``fastopt.engine`` with the
call prepared then. ``step``, ``state_dict`` and ``load_state_dict`` are atomic with respect to
one another: a snapshot taken from another thread while training holds the state between two
steps.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from collections.abc import Mapping

import numpy as np

from . import _bf16, _int8, cpu
from ._checks import (
    FORMATS,
    ArrayArgumentError,
    array_module,
    check_apart,
    check_buffer,
    check_lr,
    check_lr_scale,
    check_master_weights,
    check_max_grad_norm,
    dtype_arg,
    dtypes,
    grad_mult,
    is_cupy,
    kernel_view,
    param_dtype,
    xp_of,
)
from ._int8 import Int8State, check_state_dtype
from .algorithms import Definition
from .algorithms._spec import (
    FRESH_AT_FIRST_STEP,
    INIT_LR,
    INIT_PARAMS,
    MASTER,
    MASTER_ALIASES,
    REMAINDER,
    lerp,
)
from .cpu.threads import kernel_guard, parallel_ok
from .engine import Prepared
from .flat import FlatBuffer
from .schedules import Schedule, host_lr
from .segments import SegmentTable, segment_table

#: step counts are at most this (exclusive): the kernels take the step as a signed 64-bit int
MAX_STEP = 2**63


def _is_float(dtype) -> bool:
    """A floating dtype, numpy's or ml_dtypes' (bfloat16): what a saved state may hold."""
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def _NOTHING():  # noqa: N802  (a dead weak reference: nothing checked yet)
    return None


_FIXED_HYPERS = ("{cls}'s hyperparameters are fixed at construction (the kernel call is "
                 "prepared with them): change the lr through opt.schedule or opt.lr_scale; "
                 "for the others, d = opt.state_dict(); d[name] = value; "
                 "opt.load_state_dict(d) (a loaded dict's values win)")


class Hyperparameters(dict):
    """``opt.defaults``: the checked hyperparameters, read-only (edits were ignored by the
    steps but saved by ``state_dict``, so a resumed run differed from the one that never
    stopped)."""

    __slots__ = ("owner",)

    def __init__(self, values: dict, owner: str):
        super().__init__(values)
        self.owner = owner

    def _refuse(self, *args, **kwargs):
        raise TypeError(_FIXED_HYPERS.format(cls=self.owner))

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse

    def copy(self) -> dict:
        return dict(self)

    def __reduce__(self):
        return type(self), (dict(self), self.owner)


class _State(dict):
    """``opt.state``: the live buffers by name; the master's former name still reads."""

    def __missing__(self, key):
        if key in MASTER_ALIASES and MASTER in self:
            warnings.warn(f"opt.state[{key!r}] is deprecated, use opt.state[{MASTER!r}]",
                          DeprecationWarning, stacklevel=2)
            return self[MASTER]
        raise KeyError(key)

    def get(self, key, default=None):
        return self[key] if key in self or (key in MASTER_ALIASES and MASTER in self) \
            else default


class FlatOptimizer:
    """Shared machinery: params, schedule, step counter, state buffers, state_dict.

    A subclass sets ``definition`` (its entry in ``fastopt.algorithms.REGISTRY``) and
    ``fixed`` (the hyperparameters the class fixes, e.g. AdamW's decoupled decay).

    Every class's ``master_weights`` (16-bit params): 'fp32' (a float32 master, 4 B/param),
    'remainder' (bfloat16 params: the master's low 16 bits beside them, 2 B/param, the same
    master bit for bit; the params round it to nearest, ties away from zero) or 'none' (no
    master: the params are rounded stochastically).
    """

    definition: Definition
    fixed: dict = {}
    # (defaults for instances unpickled from before these existed)
    _grad_norm = None
    _step_unsynced = False
    _control_buffers = None

    def __init__(self, params, lr, hypers: dict, dtype=None, state_dtype="float32",
                 segments=None, master_weights="fp32"):
        if self.definition.segmented and segments is None:
            if not isinstance(params, FlatBuffer):
                raise TypeError(f"{type(self).__name__} updates each tensor as a whole (a "
                                "trust ratio, a matrix, factored moments): give params as a "
                                "FlatBuffer, or segments= (a SegmentTable or the tensors' "
                                "shapes)")
            segments = params
        elif segments is not None and not self.definition.segmented:
            raise TypeError(f"{type(self).__name__} is elementwise: it takes no segments")
        if isinstance(params, FlatBuffer):
            own = SegmentTable.of(params).layout() if segments is not None else None
            if segments not in (None, params) and \
                    segment_table(segments, params.buffer.shape[0]).layout() != own:
                # (a table over the padding or across the arrays would merge their norms,
                # factors or matrices)
                raise ValueError("segments= describes other tensors than the FlatBuffer's "
                                 f"arrays (shapes {own['shapes']} at offsets "
                                 f"{own['offsets']}); give the FlatBuffer alone, it carries "
                                 "its layout")
            params = params.buffer
        dtype = dtype_arg(dtype)
        allowed = None if dtype is None else ("uint16", dtype)
        self.params = check_buffer("params", params, dtype=allowed)
        #: what the params hold: float32, or float16 / bfloat16 (then with a float32 master,
        #: a remainder or none: ``master_weights``)
        self.dtype = param_dtype(self.params, dtype)
        #: how 16-bit params keep their float32 values: "fp32" (a float32 master,
        #: ``state['master_param']``), "remainder" (bfloat16 params: the master's low 16 bits,
        #: ``state['master_remainder']``, int16) or "none" (stochastic rounding of the params)
        self.master_weights = check_master_weights(master_weights, self.dtype)
        self._fmt = FORMATS[self.dtype]
        self._xp = xp_of(self.params)
        self._on_gpu = array_module(self.params) == "cupy"
        # On the CPU 16-bit params take gradients in their own format (or its raw bits) or in
        # float32; the CUDA kernels read grads as the params' element type, so only that.
        self._grad_dtypes = dtypes(
            ("float32",) if self.dtype == "float32"
            else (self.params.dtype,) if self._on_gpu
            else tuple({self.params.dtype.name, "uint16", "float32", self.dtype}))
        #: the tensors' layout in params (tensor-aware optimizers; None for elementwise ones)
        self.segments = None if segments is None else segment_table(segments,
                                                                     self.params.shape[0])
        check_state_dtype(self.definition, state_dtype)
        #: the optimizer state's storage: float32, bfloat16 (stochastically rounded) or int8
        #: (blockwise 8-bit codes with a float32 absmax per block: ``fastopt._int8``)
        self.state_dtype = state_dtype
        #: the public hyperparameters (checked; read-only); the class's fixed ones are not
        #: among them
        self.defaults = Hyperparameters(self._check_defaults(hypers), type(self).__name__)
        self.lr_scale = 1.0
        self._max_grad_norm: float | None = None  # clip to this global norm in every step
        #: the (unscaled) norm the last clipped/skippable step measured: a float, or a device
        #: scalar on a GPU (``last_grad_norm`` reads it)
        self._grad_norm = None
        self._step_unsynced = False  # GPU: a skippable step ran; the device has the count
        self._last_lr: float | None = None
        self._step = 0
        #: train/eval modes (Schedule-Free): an optimizer with modes starts in eval mode
        self._train_mode = False
        self._make_locks()
        self._parallel = cpu.use_parallel(
            self.params.shape[0], cpu.parallel_min_size(self.dtype == "float32", state_dtype))
        if self._on_gpu:  # the step counter and the lr used live on the device
            self._step_state = self._xp.zeros(2, dtype=np.uint64)
            self._lr_out = self._xp.zeros(1, dtype=np.float64)
            # the gradient norm's buffers and the kernel's control (clip factor, skip flag),
            # made here: allocations and copies to the device cannot be in a captured graph
            from .gpu import launch

            self._control_buffers = launch.control_buffers(self.params.device.id)
        self.schedule = lr  # (before the state: a buffer may start at the first step's lr)
        self.state = _State((name, self._new_state(name))
                            for name in self._state_keys(self.defaults))
        #: state that starts at the first step (Rprop's step_size at its lr, Schedule-Free's z
        #: at the params), as in torch: filled again then, from the params and lr of that time
        self._first_step_state = self._starting_state()
        #: the definition's per-step scalars (NAdam's mu_product, ...): one-element float64
        #: arrays where the params live, updated by the kernel
        self._scalars = {s.name: self._xp.full(1, s.init, dtype=np.float64)
                         for s in self.definition.scalars}
        self._prepare()
        self._sync_construction()

    def _starting_state(self) -> set[str]:
        return {s.name for s in self.definition.state
                if s.init in (INIT_LR, INIT_PARAMS) and s.name in self.state}

    def _fill_first_step_state(self) -> None:
        for name in self._first_step_state:
            fill = self._new_state(name)
            if isinstance(fill, Int8State):
                self.state[name].codes[...] = fill.codes
                self.state[name].absmax[...] = fill.absmax
            else:
                self.state[name][...] = fill
        self._first_step_state = set()

    def _make_locks(self) -> None:
        #: held by step() alone: a second concurrent step() is refused, not queued
        self._step_lock = threading.Lock()
        #: held while the state changes or is read whole (step, state_dict, load_state_dict,
        #: refresh_master): each of them sees or replaces the state between two steps
        self._state_lock = threading.Lock()

    def __setattr__(self, name: str, value) -> None:
        if name == "lr" or name in self.definition.hyper_defaults:  # (it would change nothing)
            raise AttributeError(_FIXED_HYPERS.format(cls=type(self).__name__))
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` copy the buffers (params included): the copy is an
        independent optimizer bound to its own copy of the params."""
        with self._state_lock:
            state = dict(self.__dict__)
        del state["_step_lock"], state["_state_lock"], state["_xp"], state["_prepared"]
        state["_grads_apart"] = _NOTHING
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if not isinstance(self.defaults, Hyperparameters):  # (pickled before it was read-only)
            self.__dict__["defaults"] = Hyperparameters(self.defaults, type(self).__name__)
        self._xp = xp_of(self.params)
        self._make_locks()
        self._prepare()
        self._sync_construction()

    def _sync_construction(self) -> None:
        """GPU: wait for the current stream's copies and fills of the state (construction,
        loading, unpickling): a step on another stream (a non-blocking one does not wait for
        the null stream) must see them done."""
        if self._on_gpu:
            self._xp.cuda.get_current_stream().synchronize()

    @property
    def _owned_buffers(self) -> list[tuple[str, np.ndarray]]:
        return [("params", self.params), *_int8.arrays(self.state)]

    def _state_keys(self, defaults: dict) -> tuple[str, ...]:
        """Every state buffer: the optimizer's, plus the float32 master copy of 16-bit params
        or their remainders (``master_weights``)."""
        return self.active_state_names(defaults) + self._master_keys()

    def _master_keys(self) -> tuple[str, ...]:
        if self.dtype == "float32":
            return ()
        return {"fp32": (MASTER,), "remainder": (REMAINDER,), "none": ()}[self.master_weights]

    def _master_values(self):
        """The float32 values the math runs on (numpy or cupy): float32 params, the master
        of 16-bit ones (made from the params and remainders with "remainder"), or the
        16-bit params' own values ("none")."""
        if self.dtype == "float32":
            return self.params
        if "state" not in self.__dict__:  # (constructing: the master is the params' values)
            return self._new_state(MASTER)
        if MASTER in self.state:
            return self.state[MASTER]
        if REMAINDER in self.state:
            return _bf16.join_remainder(kernel_view(self.params), self.state[REMAINDER])
        return self._new_state(MASTER)

    def _set_master_values(self, values) -> None:
        """Set the float32 values of 16-bit params: the master and its rounding to nearest
        even ("fp32"), the bfloat16 rounding with ties away from zero and the remainders
        ("remainder"), or the rounding to nearest even alone ("none")."""
        bits = kernel_view(self.params)
        values = self._xp.asarray(values, dtype=np.float32)
        if REMAINDER in self.state:
            bits[...], self.state[REMAINDER][...] = _bf16.split_master(values, self._xp)
            return
        if MASTER in self.state:
            self.state[MASTER][...] = values
        bits[...] = (_bf16.encode(values, self._xp) if self.dtype == "bfloat16"
                     else values.astype(np.float16).view(np.uint16))

    def _hypers(self, defaults: dict | None = None) -> dict:
        """Every hyperparameter the kernel needs: the public ones and the class's fixed ones."""
        return {**(self.defaults if defaults is None else defaults), **self.fixed}

    def _check_defaults(self, defaults: dict) -> dict:
        """The definition's checks (torch's messages) on the public hyperparameters."""
        checked = self.definition.check({**defaults, **self.fixed})
        return {k: v for k, v in checked.items() if k not in self.fixed}

    def active_state_names(self, defaults: dict | None = None) -> tuple[str, ...]:
        """The definition's state buffers these hyperparameters need, in kernel order."""
        return self.definition.active_state(self._hypers(defaults))

    def _prepare(self) -> None:
        """Pack the kernel call for the current buffers and hyperparameters (fastopt.engine)."""
        params = self.params if self._on_gpu else kernel_view(self.params)
        states = {name: self.state[name] for name in self.active_state_names()}
        #: the last grads array checked to share no memory with params and state (an array
        #: keeps its memory, so the check is not repeated while the same one comes back)
        self._grads_apart = _NOTHING
        earlier = getattr(self, "_prepared", None)  # same buffer types: share its cache
        if getattr(self, "_prepared_states", None) != tuple(states):
            earlier = None  # (other state buffers, e.g. momentum loaded as 0: int8 state
            # passes none for an unused buffer, so the compiled entry points differ)
        self._prepared_states = tuple(states)
        master = self.state.get(MASTER, self.state.get(REMAINDER))  # (None: "none")
        self._prepared = Prepared(self.definition, params, master,
                                  states, self._hypers(), self.dtype, self._on_gpu,
                                  self._parallel, self._scalars,
                                  compiled=None if earlier is None else earlier._compiled,
                                  segments=self.segments)

    def _new_state(self, name: str, value: float | None = None):
        if name == MASTER:  # the float32 values of the 16-bit params
            if self.dtype == "bfloat16":
                return _bf16.decode(self.params.view(np.uint16))
            return self.params.view(np.float16).astype(np.float32)
        if name == REMAINDER:  # the params are the master exactly
            return self._xp.zeros(self.params.shape, dtype=np.int16)
        init = next((s.init for s in self.definition.state if s.name == name), None)
        if init == INIT_PARAMS and value is None:  # a copy of the params' float32 values
            values = self._master_values()
            if self.state_dtype == "bfloat16":
                return self._xp.asarray(_bf16.encode(self._host_copy(values)))
            return values.astype(np.float32, copy=True)
        if init == INIT_LR and value is None:  # the lr of the first step
            value = host_lr(self._schedule, 0) * self.lr_scale
        if value is None:
            value = self.definition.initial_value(name, self._hypers())
        shape = (self.definition.state_size(name, self.params.shape[0], self.segments),)
        if self.state_dtype == "bfloat16":
            return self._xp.full(shape, _bf16.encode(value), dtype=np.uint16)
        if self.state_dtype == "int8":
            return _int8.quantize(self._xp.full(shape, value, dtype=np.float32),
                                  self._signed(name))
        return self._xp.full(shape, value, dtype=np.float32)

    def _signed(self, name: str) -> bool:
        return _int8.signed(self.definition, name)

    def _state_as_float(self, name: str):
        """A float32 numpy copy of a state buffer (bfloat16 and int8 state decoded)."""
        value = self.state[name]
        if isinstance(value, Int8State):
            return self._host_copy(value.decode(self._signed(name)))
        array = self._host_copy(value)
        return _bf16.decode(array) if array.dtype == np.uint16 else array


    # ------------------------------------------------------------------ public API
    @property
    def step_count(self) -> int:
        """Number of steps taken (on a GPU after skippable steps: read from the device)."""
        if self._step_unsynced:
            self.sync_step_count()
        return self._step

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, lr) -> None:
        self._schedule = self.definition.check_schedule(check_lr(lr))
        if self._on_gpu:
            self._device_table = self._xp.asarray(self._schedule.table)

    @property
    def last_lr(self) -> float | None:
        """The lr the kernel used in the last step (on a GPU: read back, which syncs)."""
        if self._on_gpu and self.step_count:
            return float(self._lr_out.get()[0])
        return self._last_lr

    def sync_step_count(self) -> int:
        """GPU: take step_count from the device counter (after replaying a captured graph)."""
        if self._on_gpu:
            self._step = int(self._step_state.get()[0])
        self._step_unsynced = False
        return self._step

    @property
    def lr_scale(self) -> float:
        """A multiplier on the scheduled lr (ReduceOnPlateau sets it); >= 0."""
        return self._lr_scale

    @lr_scale.setter
    def lr_scale(self, value) -> None:
        self._lr_scale = check_lr_scale(value)

    @property
    def current_lr(self) -> float:
        """The learning rate the next step will use: schedule.at(step_count) * lr_scale,
        computed by the kernels' own evaluator, so it equals the next ``last_lr`` exactly."""
        return host_lr(self._schedule, self.step_count) * self.lr_scale

    @property
    def max_grad_norm(self) -> float | None:
        """Clip every step's gradients to this global 2-norm (None: no clipping); > 0."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        self._max_grad_norm = check_max_grad_norm(value)

    def refresh_master(self) -> None:
        """Copy the 16-bit params into their float32 master (with "remainder": zero the
        remainders, so the master is the params exactly). Call it after changing 16-bit
        params in place: the kernel updates the master and overwrites the params with it, so
        a stale master would undo the change. Float32 params, and 16-bit ones with
        master_weights="none", have no master (nothing to do)."""
        with self._state_lock:
            for name in self._master_keys():
                self.state[name][...] = self._new_state(name)

    def step(self, grads, *, grad_scale: float | None = None, skip_if_nonfinite: bool = False,
             max_grad_norm: float | None = None) -> bool:
        """One fused update with these gradients (same length as params).

        grad_scale: the gradients are ``grad_scale`` times the true ones (a loss scale); the
        kernel divides by it in its pass. max_grad_norm (default ``self.max_grad_norm``): clip
        the unscaled gradients to this global 2-norm (``torch.nn.utils.clip_grad_norm_``'s
        coefficient, applied inside the update: one extra read pass). skip_if_nonfinite: if
        any gradient is inf/NaN, change nothing (params, state, step count) and return False.
        Returns True when the step was applied. On the GPU backend these two need no host
        sync (the norm, clip coefficient and skip flag stay on the device; the step can be
        captured in a CUDA graph), and a skippable step returns a DeviceFlag that ``bool()``
        reads.
        """
        if self.definition.modes is not None and not self._train_mode:
            raise RuntimeError(f"{type(self).__name__} is in eval mode: call train() before "
                               "step() (and eval() before evaluating or saving the params)")
        if self._step >= MAX_STEP - 1:
            raise ValueError(f"{type(self).__name__} has taken {self._step} steps, the most "
                             "the kernels' signed 64-bit step number allows")
        check_buffer("grads", grads, self.params.shape[0], writable=False, like=self.params,
                     dtype=self._grad_dtypes)
        if self._grads_apart() is not grads:  # the same array as last step: its memory too
            check_apart("grads", grads, self._owned_buffers)
            try:  # a weak reference: the optimizer keeps no user buffer alive
                self._grads_apart = weakref.ref(grads)
            except TypeError:  # an array type without weak references: check every step
                pass
        mult = 1.0 if grad_scale is None else grad_mult(grad_scale)
        max_norm = check_max_grad_norm(self.max_grad_norm if max_grad_norm is None
                                       else max_grad_norm)
        if not self._step_lock.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.step() is already running in another "
                               "thread; one optimizer must not be stepped concurrently")
        try:
            with self._state_lock:  # waits for a state_dict() being taken in another thread
                return self._step_locked(grads, mult, max_norm, skip_if_nonfinite)
        finally:
            self._step_lock.release()

    def _step_locked(self, grads, mult: float, max_norm: float | None,
                     skip_if_nonfinite: bool) -> bool:
        if self._on_gpu and (max_norm is not None or skip_if_nonfinite):
            return self._gpu_step_on_device(grads, mult, max_norm, skip_if_nonfinite)
        if max_norm is not None or skip_if_nonfinite:
            parallel = parallel_ok(self._parallel)
            with kernel_guard(parallel):
                sq = cpu.grad_sq_norm(kernel_view(grads), self._fmt, parallel)
            norm = math.sqrt(sq) * mult
            self._grad_norm = norm
            if skip_if_nonfinite and not math.isfinite(norm):
                return False
            if max_norm is not None:
                coef = max_norm / (norm + 1e-6)  # torch's clip coefficient, clamped at 1
                if not coef >= 1.0:
                    mult *= coef
        if self._first_step_state:
            self._fill_first_step_state()
        k = self._step + 1
        fresh = FRESH_AT_FIRST_STEP  # first-gradient state (SGD's momentum) is set at step 1
        if self._on_gpu:
            self._prepared.gpu(grads, self._device_table, self._device_table.shape[0],
                               self._step_state, self._lr_out, self.lr_scale, mult, fresh)
        else:
            self._last_lr = self._prepared.cpu(kernel_view(grads), self._schedule.table, k,
                                               self.lr_scale, mult, fresh)
        self._step = k
        return True

    def _gpu_step_on_device(self, grads, mult: float, max_norm: float | None,
                            skip: bool):
        """A clipped or skippable GPU step without a host sync (so it can be captured in a
        CUDA graph): kernels/control.cu computes the norm, the clip coefficient and the
        skip flag into buffers made at construction, and the update kernel reads them
        (``control``). Returns True, or with ``skip`` a DeviceFlag: whether the step was
        applied, read on demand."""
        from .gpu import launch

        buffers = self._control_buffers
        if buffers is None:  # (an optimizer unpickled from before these existed)
            buffers = self._control_buffers = launch.control_buffers(self.params.device.id)
        launch.grad_control(grads, self.dtype, mult, max_norm, skip, buffers)
        self._grad_norm = buffers["norm"]  # a device scalar, read by last_grad_norm
        if self._first_step_state:
            self._fill_first_step_state()
        self._prepared.gpu(grads, self._device_table, self._device_table.shape[0],
                           self._step_state, self._lr_out, self.lr_scale, mult,
                           FRESH_AT_FIRST_STEP, buffers["control"])
        self._step += 1
        if not skip:
            return True
        self._step_unsynced = True  # the device knows whether it stepped
        import cupy

        skipped = buffers["control"][1:]
        if not cupy.cuda.get_current_stream().is_capturing():
            skipped = skipped.copy()  # this step's flag (in a graph: the latest replay's)
        return DeviceFlag(skipped)

    @property
    def last_grad_norm(self) -> float | None:
        """The (unscaled) gradient norm the last clipped or skippable step measured (on a
        GPU kept on the device until read here: reading syncs)."""
        norm = self._grad_norm
        if norm is None or isinstance(norm, float):
            return norm
        return float(norm[0])  # (the device's value)

    def state_dict(self) -> dict:
        """Copies of the state buffers plus step, schedule table, lr_scale, max_grad_norm and
        hyperparameters, all of one moment between two steps (a step running in another
        thread is waited for)."""
        with self._state_lock:
            return self._state_dict_locked()

    def _checkpoint(self) -> tuple[dict, np.ndarray]:
        """``state_dict()`` and a numpy copy of the params (16-bit as uint16 bits), taken
        together between two steps: what ``fastopt.save`` writes."""
        with self._state_lock:
            return self._state_dict_locked(), self._host_copy(kernel_view(self.params))

    def _state_dict_locked(self) -> dict:
        d = {"optimizer": type(self).__name__, "step": self.step_count}
        d.update({name: self._state_as_float(name) for name in self.state
                  if name != REMAINDER})
        if REMAINDER in self.state:  # the master it makes, as "fp32" gives it
            d[MASTER] = self._host_copy(self._master_values())
        d.update(_int8.raw_entries(self.state, self._host_copy))
        d.update({name: float(self._host_copy(v)[0]) for name, v in self._scalars.items()})
        d.update(self.defaults)
        d["schedule"] = self._schedule.table.copy()
        d["lr_scale"] = self.lr_scale
        d["max_grad_norm"] = self.max_grad_norm
        if self.definition.modes is not None:
            d["train_mode"] = self._train_mode
        if self.segments is not None:
            d["segments"] = self.segments.layout()
        return d

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()``; checks everything first, so a bad dict changes nothing.

        The schedule table is validated like a constructor's. 16-bit params loading a dict
        without ``master_param`` (``master_params`` before the rename; from a float32 run,
        say) take their master from the params' current values. A step running in another
        thread is waited for.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict (what state_dict() returns), got "
                            f"{type(state_dict).__name__}")
        if "param_groups" in state_dict and "optimizer" not in state_dict:
            raise KeyError(f"this is a torch optimizer's state dict (param_groups), not one of "
                           f"fastopt.{type(self).__name__}: load it into fastopt.torch."
                           f"{type(self).__name__}")
        with self._state_lock:
            self._load_state_dict_locked(state_dict)
        self._sync_construction()

    def _load_state_dict_locked(self, state_dict: dict) -> None:
        d = dict(state_dict)
        for alias in MASTER_ALIASES:  # dicts saved before the rename
            if alias in d:
                if MASTER in d:
                    raise ValueError(f"state_dict has both {MASTER!r} and {alias!r}")
                warnings.warn(f"state_dict[{alias!r}] is deprecated, use {MASTER!r}",
                              DeprecationWarning, stacklevel=3)
                d[MASTER] = d.pop(alias)
        if "optimizer" not in d:  # (every state_dict() has it: without it another class's
            # dict would load, its fixed options lost, e.g. AdamW's decoupled decay as Adam's)
            raise KeyError(f"state_dict has no 'optimizer' (the class it was saved from; "
                           f"{type(self).__name__}.state_dict() writes it)")
        name = d["optimizer"]
        if name != type(self).__name__:
            raise ValueError(f"state_dict is for {name}, not {type(self).__name__}")
        step = d.get("step")
        if isinstance(step, np.ndarray) and step.size == 1:
            step = step.item()
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) \
                or not 0 <= step < MAX_STEP:
            raise ValueError(f"state_dict['step'] must be an integer in [0, 2**63), got "
                             f"{step!r}")
        defaults = dict(self.defaults)
        defaults.update({k: d[k] for k in self.defaults if k in d})
        defaults = self._check_defaults(defaults)
        if "schedule" not in d:
            raise KeyError("state_dict has no 'schedule' (the schedule table)")
        schedule = Schedule(self._host_copy(d["schedule"]), "loaded schedule")
        lr_scale = check_lr_scale(d.get("lr_scale", self.lr_scale))
        max_grad_norm = check_max_grad_norm(d.get("max_grad_norm", self.max_grad_norm))
        layout = d.get("segments")  # (before the state's sizes, which follow the layout)
        if self.segments is not None and layout is not None \
                and layout != self.segments.layout():
            mine = self.segments.layout()
            raise ValueError(f"state_dict is for tensors of shapes {layout.get('shapes')} at "
                             f"offsets {layout.get('offsets')}, not this optimizer's shapes "
                             f"{mine['shapes']} at offsets {mine['offsets']}")
        arrays = {}
        master = None  # the saved float32 master of 16-bit params, if any
        if self.dtype != "float32" and MASTER in d:
            master = self._host_copy(d[MASTER])
            if master.shape != self.params.shape or not _is_float(master.dtype):
                raise ArrayArgumentError(
                    f"state_dict[{MASTER!r}] must be a float array of shape "
                    f"{self.params.shape}, got {master.dtype} {master.shape}")
        for key in self._state_keys(defaults):
            if key in (MASTER, REMAINDER):
                continue  # (the master: below; without one it is taken from the params)
            shape = (self.definition.state_size(key, self.params.shape[0], self.segments),)
            raw = _int8.raw_entry(d, key, shape[0], self._host_copy)
            if raw is not None and key in d and not np.array_equal(
                    raw.decode(self._signed(key)), self._host_copy(d[key]), equal_nan=True):
                raw = None  # (the float values were edited since: they win)
            if raw is not None:  # int8 codes and scales: taken as they are, or decoded
                arrays[key] = raw if self.state_dtype == "int8" else raw.decode(
                    self._signed(key))
                continue
            if key not in d:
                when = next((s.when for s in self.definition.state if s.name == key), None)
                raise KeyError(f"state_dict has no {key!r}" + (
                    f", which {when} needs: an option that adds a state buffer is switched "
                    "on by building a new optimizer, not by a loaded dict" if when else ""))
            value = self._host_view(d[key])  # (copied into the state below: not twice)
            if value.shape != shape or not _is_float(value.dtype):
                raise ArrayArgumentError(
                    f"state_dict[{key!r}] must be a float array of shape {shape}, "
                    f"got {value.dtype} {value.shape}")
            if not self._signed(key) and bool((value < 0).any()):
                raise ValueError(f"state_dict[{key!r}] holds negative values, which it "
                                 "cannot (a second moment or an accumulator: the next step "
                                 "would take their square root)")
            arrays[key] = value
        scalars = {}
        for s in self.definition.scalars:  # a dict without one (older) starts it afresh
            value = d.get(s.name, s.init)
            value = np.asarray(self._host_copy(value) if is_cupy(value) else value)
            if value.size != 1 or not np.issubdtype(value.dtype, np.number) \
                    or not np.isfinite(value.reshape(-1)[0]):
                raise ValueError(f"state_dict[{s.name!r}] must be a finite number, got {value}")
            scalars[s.name] = float(value.reshape(-1)[0])
        train_mode = d.get("train_mode", False)
        if self.definition.modes is not None and not isinstance(train_mode, (bool, np.bool_)):
            raise ValueError(f"state_dict['train_mode'] must be a bool, got {train_mode!r}")
        # everything checked: now change state
        self._train_mode = bool(train_mode)
        self.defaults = Hyperparameters(defaults, type(self).__name__)
        self.schedule, self.lr_scale, self._step = schedule, lr_scale, int(step)
        self.max_grad_norm = max_grad_norm
        self._step_unsynced = False
        if self._on_gpu:
            self._step_state[...] = self._xp.asarray([self._step, 0], dtype=np.uint64)
        for name, value in scalars.items():
            self._scalars[name][...] = value
        for key in self._master_keys():  # from the params, or the saved master below
            if key in self.state:
                self.state[key][...] = self._new_state(key)
            else:
                self.state[key] = self._new_state(key)
        if master is not None and self.master_weights == "fp32":
            self.state[MASTER][...] = self._xp.asarray(master, dtype=np.float32)
        elif master is not None:  # the params carry it (with the remainders), or its rounding
            self._set_master_values(master)
        for key, value in arrays.items():
            if key not in self.state:
                self.state[key] = self._new_state(key)
            target = self.state[key]
            if isinstance(target, Int8State):
                if not isinstance(value, Int8State):
                    value = _int8.quantize(value, self._signed(key))
                target.codes[...] = self._xp.asarray(value.codes)
                target.absmax[...] = self._xp.asarray(value.absmax)
            elif self.state[key].dtype == np.uint16:
                self.state[key][...] = self._xp.asarray(_bf16.encode(value))
            else:
                self.state[key][...] = self._xp.asarray(value, dtype=np.float32)
        for key in list(self.state):
            if key not in self._state_keys(defaults):
                del self.state[key]
        # a dict saved before any step: that state starts at the first step still
        self._first_step_state = self._starting_state() if self._step == 0 else set()
        self._prepare()

    @staticmethod
    def _host_copy(array) -> np.ndarray:
        """A numpy copy of a numpy or cupy array (or anything array-like)."""
        if is_cupy(array):
            return array.get()
        return np.array(array)

    @staticmethod
    def _host_view(array) -> np.ndarray:
        """A numpy array of a numpy or cupy array's values: the array itself where it is one
        (a state being loaded is copied into the optimizer's buffer once, not twice: the
        load of a checkpoint peaked at 2.7x torch's memory)."""
        if is_cupy(array):
            return array.get()
        return np.asarray(array)

    def memory_report(self) -> dict[str, float]:
        """Bytes per parameter this optimizer keeps, by component: ``params``, the float32
        master of 16-bit params (``master_param``), each state buffer under its name (int8
        state: its codes), ``scales`` (int8 state's block absmax values, all buffers) and
        ``total``. (The gradients are the caller's.)"""
        return _int8.memory_report(self.params.shape[0], [
            _int8.parts_of(name, value) for name, value in [("params", self.params),
                                                            *self.state.items()]])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return (f"{type(self).__name__}(n={self.params.shape[0]}, lr={self._schedule!r}, "
                f"{options}, step_count={self.step_count})")


class DeviceFlag:
    """Whether a GPU step with ``skip_if_nonfinite`` was applied, kept on the device so the
    step needs no host sync (as torch's found_inf): ``bool(flag)`` and ``flag == False`` read
    it (a sync). ``flag is False`` is never true: test its truth, not its identity."""

    __slots__ = ("_skipped",)

    def __init__(self, skipped):
        self._skipped = skipped  # a one-element device array: 1.0 if the step was skipped

    def __bool__(self) -> bool:
        return not bool(self._skipped[0])

    def __eq__(self, other) -> bool:
        return bool(self) == other if isinstance(other, bool) else NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return "DeviceFlag(read it with bool())"


class TrainEvalModes:
    """``train()`` and ``eval()`` for an optimizer whose definition has modes (Schedule-Free):
    while training the params hold the point where gradients are taken, for evaluation the
    averaged one. It starts in eval mode; ``step()`` in eval mode raises. Save checkpoints in
    either mode: the mode is saved with the params and restored with them."""

    @property
    def train_mode(self) -> bool:
        """Whether the params hold the training point (after ``train()``)."""
        return self._train_mode

    def train(self) -> None:
        """Move the params to the training point (a no-op in train mode)."""
        self._switch_mode(True)

    def eval(self) -> None:
        """Move the params to the evaluation point (a no-op in eval mode)."""
        self._switch_mode(False)

    def _switch_mode(self, train: bool) -> None:
        modes = self.definition.modes
        with self._state_lock:
            if self._train_mode == train:
                return
            if modes.lerp_to in self._first_step_state:  # no z before the first step: the
                self._train_mode = train                 # params stay (as schedulefree's)
                return
            weight = (modes.to_train if train else modes.to_eval)(self._hypers())
            target = self.state[modes.lerp_to]
            if target.dtype == np.uint16:  # bfloat16 state
                target = _bf16.decode(target)
            if self.dtype == "float32":
                self.params[...] = lerp(self.params, target, weight)
            else:  # the float32 master moves; the 16-bit params are its rounding
                self._set_master_values(lerp(self._master_values(), target, weight))
            self._train_mode = train


def ready_to_step(cls, params, schedule, **options):
    """``cls(params, lr=schedule, **options)`` (``cls`` a core class or its name) as the
    tests, the benchmarks and the start-up probe step it: an optimizer that takes a constant
    lr only (Rprop) gets the schedule's first value, one with train/eval modes
    (Schedule-Free) is put in train mode, and a tensor-aware one (LAMB) over a plain array
    without ``segments`` treats the array as one tensor (Muon: one 1 x n matrix)."""
    if isinstance(cls, str):
        from . import optimizers

        cls = getattr(optimizers, cls)
    d = cls.definition
    if not d.schedulable and isinstance(schedule, Schedule):
        from .schedules import constant

        schedule = constant(float(schedule.at(0)))
    if d.segmented and "segments" not in options and not isinstance(params, FlatBuffer):
        n = params.shape[0]
        options["segments"] = [(1, n) if d.matrix is not None else (n,)]
    opt = cls(params, lr=schedule, **options)
    if d.modes is not None:
        opt.train()
    return opt
