"""Stateful optimizers over one flat float32 buffer: Adam, AdamW, Adagrad, Adadelta.

Each checks its hyperparameters once (``torch.optim``'s messages), allocates its state once,
and runs one fused kernel per ``step(grads)``; the schedule is evaluated inside the kernel.
"""

from __future__ import annotations

import numbers
import threading

import numpy as np

from . import cpu
from ._checks import (
    ArrayArgumentError,
    check_apart,
    check_betas,
    check_buffer,
    check_eps,
    check_lr,
    check_lr_scale,
    check_real,
    check_weight_decay,
)
from .flat import FlatBuffer
from .schedules import Schedule

__all__ = ["Adam", "AdamW", "Adagrad", "Adadelta"]


class _FlatOptimizer:
    """Shared machinery: params, schedule, step counter, state buffers, state_dict."""

    #: state buffer names (torch's) in kernel argument order
    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr, defaults: dict):
        if isinstance(params, FlatBuffer):
            params = params.buffer
        self.params = check_buffer("params", params)
        self._schedule = check_lr(lr)
        self.defaults = defaults
        self.lr_scale = 1.0
        self.last_lr: float | None = None
        self._step = 0
        self._lock = threading.Lock()
        self._parallel = cpu.use_parallel(self.params.shape[0])
        self.state = {name: self._new_state(name) for name in self.active_state_names()}

    @property
    def _owned_buffers(self) -> list[tuple[str, np.ndarray]]:
        return [("params", self.params), *self.state.items()]

    # ------------------------------------------------------------------ subclass hooks
    def active_state_names(self, defaults: dict | None = None) -> tuple[str, ...]:
        """The state buffers these hyperparameters need (all of state_names by default)."""
        return self.state_names

    def _new_state(self, name: str) -> np.ndarray:
        return np.zeros_like(self.params)

    def _launch(self, grads: np.ndarray, step: int) -> float:
        raise NotImplementedError

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

    @property
    def current_lr(self) -> float:
        """The learning rate the next step will use: schedule.at(step_count) * lr_scale."""
        return self._schedule.at(self._step) * self.lr_scale

    def step(self, grads) -> bool:
        """One fused update with these gradients (same length as params); returns True."""
        check_buffer("grads", grads, self.params.shape[0], writable=False)
        check_apart("grads", grads, self._owned_buffers)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.step() is already running in another "
                               "thread; one optimizer must not be stepped concurrently")
        try:
            k = self._step + 1
            self.last_lr = self._launch(grads, k)
            self._step = k
        finally:
            self._lock.release()
        return True

    def state_dict(self) -> dict:
        """Copies of the state buffers plus step, schedule table, lr_scale and hyperparameters."""
        d = {"optimizer": type(self).__name__, "step": self._step}
        d.update({name: array.copy() for name, array in self.state.items()})
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
        schedule = Schedule(d["schedule"], "loaded schedule") if "schedule" in d \
            else self._schedule
        lr_scale = check_lr_scale(d.get("lr_scale", self.lr_scale))
        arrays = {}
        for key in self.active_state_names(defaults):
            if key not in d:
                raise KeyError(f"state_dict has no {key!r}")
            value = np.asarray(d[key])
            if value.shape != self.params.shape or not np.issubdtype(value.dtype, np.floating):
                raise ArrayArgumentError(
                    f"state_dict[{key!r}] must be a float array of shape {self.params.shape}, "
                    f"got {value.dtype} {value.shape}")
            arrays[key] = value
        # everything checked: now change state
        self.defaults = defaults
        self._apply_defaults()
        self._schedule, self.lr_scale, self._step = schedule, lr_scale, int(step)
        for key, value in arrays.items():
            if key not in self.state:
                self.state[key] = np.empty_like(self.params)
            self.state[key][...] = value
        for key in list(self.state):
            if key not in arrays:
                del self.state[key]

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
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False):
        defaults = self._check_defaults(dict(betas=betas, eps=eps, weight_decay=weight_decay,
                                             amsgrad=amsgrad, maximize=maximize))
        super().__init__(params, lr, defaults)
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

    def _launch(self, grads, step):
        s = self.state
        exp_avg = s["exp_avg"]
        return cpu.adam(self.params, grads, exp_avg, s["exp_avg_sq"],
                        s.get("max_exp_avg_sq", exp_avg), self._schedule.table, step,
                        self.lr_scale, self._beta1, self._beta2, self._eps, self._weight_decay,
                        self._decoupled, self._amsgrad, self._maximize, self._parallel)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): decoupled decay p <- p * (1 - lr * wd); torch's defaults."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)


class Adagrad(_FlatOptimizer):
    """Adagrad (Duchi et al.) with torch's lr_decay and initial_accumulator_value."""

    state_names = ("sum",)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False):
        defaults = self._check_defaults(dict(
            lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize))
        super().__init__(params, lr, defaults)
        self._apply_defaults()

    def _check_defaults(self, d: dict) -> dict:
        return dict(lr_decay=check_real("lr_decay", d["lr_decay"]),
                    weight_decay=check_weight_decay(d["weight_decay"]),
                    initial_accumulator_value=check_real(
                        "initial_accumulator_value", d["initial_accumulator_value"]),
                    eps=check_eps(d["eps"]), maximize=bool(d["maximize"]))

    def _new_state(self, name):
        return np.full_like(self.params, self.defaults["initial_accumulator_value"])

    def _apply_defaults(self) -> None:
        d = self.defaults
        self._lr_decay, self._weight_decay = d["lr_decay"], d["weight_decay"]
        self._eps, self._maximize = d["eps"], d["maximize"]

    def _launch(self, grads, step):
        return cpu.adagrad(self.params, grads, self.state["sum"], self._schedule.table, step,
                           self.lr_scale, self._lr_decay, self._eps, self._weight_decay,
                           self._maximize, self._parallel)


class Adadelta(_FlatOptimizer):
    """Adadelta (Zeiler 2012) with torch's lr factor on the update."""

    state_names = ("square_avg", "acc_delta")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
        defaults = self._check_defaults(dict(rho=rho, eps=eps, weight_decay=weight_decay,
                                             maximize=maximize))
        super().__init__(params, lr, defaults)
        self._apply_defaults()

    def _check_defaults(self, d: dict) -> dict:
        return dict(rho=check_real("rho", d["rho"], 0.0, 1.0), eps=check_eps(d["eps"]),
                    weight_decay=check_weight_decay(d["weight_decay"]),
                    maximize=bool(d["maximize"]))

    def _apply_defaults(self) -> None:
        d = self.defaults
        self._rho, self._eps = d["rho"], d["eps"]
        self._weight_decay, self._maximize = d["weight_decay"], d["maximize"]

    def _launch(self, grads, step):
        return cpu.adadelta(self.params, grads, self.state["square_avg"], self.state["acc_delta"],
                            self._schedule.table, step, self.lr_scale, self._rho, self._eps,
                            self._weight_decay, self._maximize, self._parallel)
