"""Stateful optimizers over one flat float32 buffer: Adam, AdamW, Adagrad, Adadelta.

Each checks its hyperparameters once (``torch.optim``'s messages), allocates its state once,
and runs one fused kernel per ``step(grads)``; the schedule is evaluated inside the kernel.
"""

from __future__ import annotations

import math
import numbers
import threading

import numpy as np

from . import _bf16, cpu
from ._checks import (
    FORMATS,
    ArrayArgumentError,
    array_module,
    check_apart,
    check_betas,
    check_buffer,
    check_eps,
    check_lr,
    check_lr_scale,
    check_max_grad_norm,
    check_real,
    check_weight_decay,
    dtypes,
    grad_mult,
    is_cupy,
    kernel_view,
    param_dtype,
    xp_of,
)
from .cpu.threads import kernel_guard, parallel_ok
from .flat import FlatBuffer
from .schedules import Schedule

__all__ = ["Adam", "AdamW", "Adagrad", "Adadelta"]



class _FlatOptimizer:
    """Shared machinery: params, schedule, step counter, state buffers, state_dict."""

    #: state buffer names (torch's) in kernel argument order
    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr, defaults: dict, dtype=None, state_dtype="float32"):
        if isinstance(params, FlatBuffer):
            params = params.buffer
        allowed = None if dtype is None else ("uint16", getattr(dtype, "name", str(dtype)))
        self.params = check_buffer("params", params, dtype=allowed)
        #: what the params hold: float32, or float16 / bfloat16 (then with a float32 master)
        self.dtype = param_dtype(self.params, dtype)
        self._fmt = FORMATS.get(self.dtype, 0)
        self._xp = xp_of(self.params)
        self._on_gpu = array_module(self.params) == "cupy"
        # On the CPU 16-bit params take gradients in their own format (or its raw bits) or in
        # float32; the CUDA kernels read grads as the params' element type, so only that.
        self._grad_dtypes = dtypes(
            ("float32",) if self.dtype == "float32"
            else (self.params.dtype,) if self._on_gpu
            else tuple({self.params.dtype.name, "uint16", "float32"}
                       | ({"float16"} if self.dtype == "float16" else set())))
        if state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype must be 'float32' or 'bfloat16', got {state_dtype!r}")
        #: the optimizer state's storage: float32, or bfloat16 (stochastically rounded)
        self.state_dtype = state_dtype
        self.defaults = defaults
        self.lr_scale = 1.0
        self.max_grad_norm: float | None = None  # clip to this global norm in every step
        self.last_grad_norm: float | None = None  # the (unscaled) norm the last step measured
        self._last_lr: float | None = None
        self._step = 0
        self._lock = threading.Lock()
        self._parallel = cpu.use_parallel(
            self.params.shape[0], serial_simd=self.dtype == state_dtype == "float32")
        self.state = {name: self._new_state(name) for name in self._state_keys(defaults)}
        if self._on_gpu:  # the step counter and the lr used live on the device
            self._step_state = self._xp.zeros(2, dtype=np.uint64)
            self._lr_out = self._xp.zeros(1, dtype=np.float64)
        self.schedule = lr

    @property
    def _owned_buffers(self) -> list[tuple[str, np.ndarray]]:
        return [("params", self.params), *self.state.items()]

    def _state_keys(self, defaults: dict) -> tuple[str, ...]:
        """Every float32 state buffer: the optimizer's, plus the master copy of 16-bit params."""
        master = ("master_params",) if self.dtype != "float32" else ()
        return self.active_state_names(defaults) + master

    def _kernel_params(self, grads) -> tuple:
        """params, grads, master as the kernels take them (16-bit as uint16 bits on the CPU)."""
        master = self.state.get("master_params", self.params)
        if self._on_gpu:
            return self.params, grads, master
        return kernel_view(self.params), kernel_view(grads), master

    # ------------------------------------------------------------------ subclass hooks
    def active_state_names(self, defaults: dict | None = None) -> tuple[str, ...]:
        """The state buffers these hyperparameters need (all of state_names by default)."""
        return self.state_names

    def _new_state(self, name: str, value: float = 0.0):
        if name == "master_params":  # the float32 values of the 16-bit params
            if self.dtype == "bfloat16":
                return _bf16.decode(self.params.view(np.uint16))
            return self.params.view(np.float16).astype(np.float32)
        if self.state_dtype == "bfloat16":
            return self._xp.full(self.params.shape, _bf16.encode(value), dtype=np.uint16)
        return self._xp.full(self.params.shape, value, dtype=np.float32)

    def _state_as_float(self, name: str):
        """A float32 numpy copy of a state buffer (bfloat16 state decoded)."""
        array = self._host_copy(self.state[name])
        return _bf16.decode(array) if array.dtype == np.uint16 else array

    def _launch(self, grads: np.ndarray, step: int, grad_mult: float) -> float:
        """Run the CPU kernel for step ``step``; return the lr it used."""
        raise NotImplementedError

    def _device_args(self) -> dict:
        """The GPU kernel's named arguments besides params, grads and the step/schedule ones."""
        raise NotImplementedError

    def _launch_gpu(self, grads, grad_mult: float) -> None:
        from .gpu import launch

        params, grads, master = self._kernel_params(grads)
        launch.launch(self.kernel, self.dtype, {
            **self._device_args(), "params": params, "grads": grads, "master": master,
            "table": self._device_table, "table_rows": self._device_table.shape[0],
            "step_state": self._step_state, "lr_out": self._lr_out,
            "lr_scale": self.lr_scale, "grad_mult": grad_mult, "n": self.params.shape[0]})

    # ------------------------------------------------------------------ public API
    @property
    def step_count(self) -> int:
        """Number of steps taken."""
        return self._step

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, lr) -> None:
        self._schedule = check_lr(lr)
        if self._on_gpu:
            self._device_table = self._xp.asarray(self._schedule.table)

    @property
    def last_lr(self) -> float | None:
        """The lr the kernel used in the last step (on a GPU: read back, which syncs)."""
        if self._on_gpu and self._step:
            return float(self._lr_out.get()[0])
        return self._last_lr

    def sync_step_count(self) -> int:
        """GPU: take step_count from the device counter (after replaying a captured graph)."""
        if self._on_gpu:
            self._step = int(self._step_state.get()[0])
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
        """The learning rate the next step will use: schedule.at(step_count) * lr_scale."""
        return self._schedule.at(self._step) * self.lr_scale

    def step(self, grads, *, grad_scale: float | None = None, skip_if_nonfinite: bool = False,
             max_grad_norm: float | None = None) -> bool:
        """One fused update with these gradients (same length as params).

        grad_scale: the gradients are ``grad_scale`` times the true ones (a loss scale); the
        kernel divides by it in its pass. max_grad_norm (default ``self.max_grad_norm``): clip
        the unscaled gradients to this global 2-norm (``torch.nn.utils.clip_grad_norm_``'s
        coefficient, applied inside the update: one extra read pass). skip_if_nonfinite: if
        any gradient is inf/NaN, change nothing (params, state, step count) and return False.
        Returns True when the step was applied. (On the GPU backend these two read the norm
        back to the host: that step is not graph-capturable.)
        """
        check_buffer("grads", grads, self.params.shape[0], writable=False, like=self.params,
                     dtype=self._grad_dtypes)
        check_apart("grads", grads, self._owned_buffers)
        mult = 1.0 if grad_scale is None else grad_mult(grad_scale)
        max_norm = check_max_grad_norm(self.max_grad_norm if max_grad_norm is None
                                       else max_grad_norm)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.step() is already running in another "
                               "thread; one optimizer must not be stepped concurrently")
        try:
            if max_norm is not None or skip_if_nonfinite:
                if self._on_gpu:  # a cupy reduction; reading the norm back syncs the stream
                    values = grads
                    if grads.dtype == np.uint16:  # raw 16-bit bits: decode before widening
                        values = (_bf16.decode(grads) if self.dtype == "bfloat16"
                                  else grads.view(np.float16))
                    wide = values.astype(np.float64)
                    sq = float(self._xp.dot(wide, wide))
                else:
                    with kernel_guard(self._parallel):
                        sq = cpu.grad_sq_norm(kernel_view(grads), self._fmt,
                                              parallel_ok(self._parallel))
                norm = math.sqrt(sq) * mult
                self.last_grad_norm = norm
                if skip_if_nonfinite and not math.isfinite(norm):
                    return False
                if max_norm is not None:
                    coef = max_norm / (norm + 1e-6)  # torch's clip coefficient, clamped at 1
                    if not coef >= 1.0:
                        mult *= coef
            k = self._step + 1
            if self._on_gpu:
                self._launch_gpu(grads, mult)
            else:
                with kernel_guard(self._parallel):
                    self._last_lr = self._launch(grads, k, mult)
            self._step = k
        finally:
            self._lock.release()
        return True

    def state_dict(self) -> dict:
        """Copies of the state buffers plus step, schedule table, lr_scale and hyperparameters."""
        d = {"optimizer": type(self).__name__, "step": self._step}
        d.update({name: self._state_as_float(name) for name in self.state})
        d.update(self.defaults)
        d["schedule"] = self._schedule.table.copy()
        d["lr_scale"] = self.lr_scale
        return d

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()``; checks everything first, so a bad dict changes nothing."""
        d = dict(state_dict)
        name = d.get("optimizer", type(self).__name__)
        if name != type(self).__name__:
            raise ValueError(f"state_dict is for {name}, not {type(self).__name__}")
        step = d.get("step")
        if isinstance(step, np.ndarray) and step.size == 1:
            step = step.item()
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state_dict['step'] must be an integer >= 0, got {step!r}")
        defaults = dict(self.defaults)
        defaults.update({k: d[k] for k in self.defaults if k in d})
        defaults = self._check_defaults(defaults)
        schedule = Schedule(self._host_copy(d["schedule"]), "loaded schedule") \
            if "schedule" in d else self._schedule
        lr_scale = check_lr_scale(d.get("lr_scale", self.lr_scale))
        arrays = {}
        for key in self._state_keys(defaults):
            if key == "master_params" and key not in d:
                continue  # e.g. from a float32 run: the master is taken from the params
            if key not in d:
                raise KeyError(f"state_dict has no {key!r}")
            value = self._host_copy(d[key])
            if value.shape != self.params.shape or not np.issubdtype(value.dtype, np.floating):
                raise ArrayArgumentError(
                    f"state_dict[{key!r}] must be a float array of shape {self.params.shape}, "
                    f"got {value.dtype} {value.shape}")
            arrays[key] = value
        # everything checked: now change state
        self.defaults = defaults
        self._apply_defaults()
        self.schedule, self.lr_scale, self._step = schedule, lr_scale, int(step)
        if self._on_gpu:
            self._step_state[...] = self._xp.asarray([self._step, 0], dtype=np.uint64)
        for key, value in arrays.items():
            if key not in self.state:
                self.state[key] = self._new_state(key)
            if self.state[key].dtype == np.uint16:
                self.state[key][...] = self._xp.asarray(_bf16.encode(value))
            else:
                self.state[key][...] = self._xp.asarray(value, dtype=np.float32)
        for key in list(self.state):
            if key not in self._state_keys(defaults):
                del self.state[key]

    @staticmethod
    def _host_copy(array) -> np.ndarray:
        """A numpy copy of a numpy or cupy array (or anything array-like)."""
        if is_cupy(array):
            return array.get()
        return np.array(array)

    def _check_defaults(self, defaults: dict) -> dict:
        return defaults

    def _apply_defaults(self) -> None:
        """Copy self.defaults into the attributes the kernel launch reads."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return (f"{type(self).__name__}(n={self.params.shape[0]}, lr={self._schedule!r}, "
                f"{options}, step_count={self._step})")


class Adam(_FlatOptimizer):
    """Adam (Kingma & Ba): L2 weight decay added to the gradient; torch.optim.Adam's defaults."""

    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    kernel = "adam"
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, *, dtype=None, state_dtype="float32"):
        defaults = self._check_defaults(dict(betas=betas, eps=eps, weight_decay=weight_decay,
                                             amsgrad=amsgrad, maximize=maximize))
        super().__init__(params, lr, defaults, dtype, state_dtype)
        self._apply_defaults()

    def _check_defaults(self, d: dict) -> dict:
        return dict(betas=check_betas(d["betas"]), eps=check_eps(d["eps"]),
                    weight_decay=check_weight_decay(d["weight_decay"]),
                    amsgrad=bool(d["amsgrad"]), maximize=bool(d["maximize"]))

    def active_state_names(self, defaults: dict | None = None) -> tuple[str, ...]:
        amsgrad = (defaults or self.defaults)["amsgrad"]
        return self.state_names if amsgrad else self.state_names[:2]

    def _apply_defaults(self) -> None:
        d = self.defaults
        (self._beta1, self._beta2), self._eps = d["betas"], d["eps"]
        self._weight_decay, self._amsgrad, self._maximize = (
            d["weight_decay"], d["amsgrad"], d["maximize"])

    def _launch(self, grads, step, grad_mult):
        s = self.state
        exp_avg = s["exp_avg"]
        return cpu.adam(*self._kernel_params(grads), exp_avg, s["exp_avg_sq"],
                        s.get("max_exp_avg_sq", exp_avg), self._schedule.table, step,
                        self.lr_scale, grad_mult, self._beta1, self._beta2, self._eps,
                        self._weight_decay, self._decoupled, self._amsgrad, self._maximize,
                        self._fmt, parallel_ok(self._parallel))

    def _device_args(self):
        s = self.state
        return dict(exp_avg=s["exp_avg"], exp_avg_sq=s["exp_avg_sq"],
                    max_exp_avg_sq=s.get("max_exp_avg_sq", s["exp_avg"]), beta1=self._beta1,
                    beta2=self._beta2, eps=self._eps, weight_decay=self._weight_decay,
                    decoupled=self._decoupled, amsgrad=self._amsgrad, maximize=self._maximize)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): decoupled decay p <- p * (1 - lr * wd); torch's defaults."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, *, dtype=None, state_dtype="float32"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, dtype=dtype, state_dtype=state_dtype)


class Adagrad(_FlatOptimizer):
    """Adagrad (Duchi et al.) with torch's lr_decay and initial_accumulator_value."""

    state_names = ("sum",)
    kernel = "adagrad"

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False, *, dtype=None,
                 state_dtype="float32"):
        defaults = self._check_defaults(dict(
            lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize))
        super().__init__(params, lr, defaults, dtype, state_dtype)
        self._apply_defaults()

    def _check_defaults(self, d: dict) -> dict:
        return dict(lr_decay=check_real("lr_decay", d["lr_decay"]),
                    weight_decay=check_weight_decay(d["weight_decay"]),
                    initial_accumulator_value=check_real(
                        "initial_accumulator_value", d["initial_accumulator_value"]),
                    eps=check_eps(d["eps"]), maximize=bool(d["maximize"]))

    def _new_state(self, name, value=0.0):
        if name == "sum":
            value = self.defaults["initial_accumulator_value"]
        return super()._new_state(name, value)

    def _apply_defaults(self) -> None:
        d = self.defaults
        self._lr_decay, self._weight_decay = d["lr_decay"], d["weight_decay"]
        self._eps, self._maximize = d["eps"], d["maximize"]

    def _launch(self, grads, step, grad_mult):
        return cpu.adagrad(*self._kernel_params(grads), self.state["sum"], self._schedule.table,
                           step, self.lr_scale, grad_mult, self._lr_decay, self._eps,
                           self._weight_decay, self._maximize, self._fmt,
                           parallel_ok(self._parallel))

    def _device_args(self):
        return dict(state_sum=self.state["sum"], lr_decay=self._lr_decay, eps=self._eps,
                    weight_decay=self._weight_decay, maximize=self._maximize)


class Adadelta(_FlatOptimizer):
    """Adadelta (Zeiler 2012) with torch's lr factor on the update."""

    state_names = ("square_avg", "acc_delta")
    kernel = "adadelta"

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False, *,
                 dtype=None, state_dtype="float32"):
        defaults = self._check_defaults(dict(rho=rho, eps=eps, weight_decay=weight_decay,
                                             maximize=maximize))
        super().__init__(params, lr, defaults, dtype, state_dtype)
        self._apply_defaults()

    def _check_defaults(self, d: dict) -> dict:
        return dict(rho=check_real("rho", d["rho"], 0.0, 1.0), eps=check_eps(d["eps"]),
                    weight_decay=check_weight_decay(d["weight_decay"]),
                    maximize=bool(d["maximize"]))

    def _apply_defaults(self) -> None:
        d = self.defaults
        self._rho, self._eps = d["rho"], d["eps"]
        self._weight_decay, self._maximize = d["weight_decay"], d["maximize"]

    def _launch(self, grads, step, grad_mult):
        return cpu.adadelta(*self._kernel_params(grads), self.state["square_avg"],
                            self.state["acc_delta"], self._schedule.table, step, self.lr_scale,
                            grad_mult, self._rho, self._eps, self._weight_decay, self._maximize,
                            self._fmt, parallel_ok(self._parallel))

    def _device_args(self):
        return dict(square_avg=self.state["square_avg"], acc_delta=self.state["acc_delta"],
                    rho=self._rho, eps=self._eps, weight_decay=self._weight_decay,
                    maximize=self._maximize)
