"""Functional layer: one fused update over buffers the caller owns.

Every function checks its arguments, picks the backend from the array type (numpy: the Numba
CPU kernels; cupy: the CUDA kernels, on the current stream) and runs one kernel call that
evaluates the schedule for this step, then updates params and state in place. ``step`` is the
1-based number of the step being taken: the k-th step uses ``schedule.at(k - 1)`` and bias
corrections with k, exactly like ``torch.optim``. Each returns the learning rate the kernel
used (schedule value times ``lr_scale``). 16-bit params (float16, bfloat16) come with
``master=``, their float32 copy; as raw uint16 bits they also need ``dtype=`` naming the format.
"""

from __future__ import annotations

import functools

import numpy as np

from . import cpu
from ._checks import (
    FORMATS,
    ArrayArgumentError,
    check_betas,
    check_buffer,
    check_disjoint,
    check_eps,
    check_lr,
    check_lr_scale,
    check_real,
    check_step,
    check_weight_decay,
    dtype_name,
    grad_mult,
    is_cupy,
    kernel_view,
    param_dtype,
    xp_of,
)
from .cpu.schedule import host_lr
from .cpu.threads import kernel_guard, parallel_ok
from .schedules import Schedule

__all__ = ["adam", "adamw", "adagrad", "adadelta"]


def _schedule(lr, schedule) -> Schedule:
    if schedule is not None and lr is not None:
        raise ValueError("give either lr or schedule, not both")
    return check_lr(schedule if schedule is not None else lr)


def _buffers(params, grads, master, dtype=None, **state):
    """Check params, grads, master and the state buffers together; return (size, dtype name).

    16-bit params need ``master``, their float32 copy, which the kernel reads and writes; they
    may be given as uint16 bits with ``dtype`` ('float16' or 'bfloat16') naming the format
    (how cupy, which has no bfloat16, carries them). Grads have the params' array dtype.
    State buffers are float32, or uint16 holding bfloat16 bits (stochastically rounded).
    """
    allowed = None if dtype is None else ("uint16", getattr(dtype, "name", str(dtype)))
    n = check_buffer("params", params, dtype=allowed).shape[0]
    check_buffer("grads", grads, n, writable=False, like=params, dtype=params.dtype)
    name = dtype_name(params.dtype) if dtype is None else param_dtype(params, dtype)
    if name != "float32" and master is None:
        raise ValueError(f"master (a float32 copy of the params) is required for {name} params")
    if name == "float32":
        master = None  # unused for float32 params
    if master is not None:
        check_buffer("master", master, n, like=params, dtype=np.float32)
    state_dtypes = {array.dtype for array in state.values() if array is not None}
    if len(state_dtypes) > 1:
        raise ArrayArgumentError("the state buffers must share one dtype (float32, or uint16 "
                                 "bfloat16 bits)")
    for key, array in state.items():
        if array is not None:  # float32, or bfloat16 bits (stochastically rounded state)
            check_buffer(key, array, n, like=params, dtype=("float32", "uint16"))
    check_disjoint(params=params, grads=grads, master=master, **state)
    return n, name


def _parallel(n: int, params, *state) -> bool:
    """The serial loop vectorises only for float32 params and state."""
    simd = params.dtype == np.float32 and all(s.dtype == np.float32 for s in state
                                              if s is not None)
    return parallel_ok(cpu.use_parallel(n, serial_simd=simd))


def _cpu_args(params, grads, master) -> tuple:
    """params, grads and master as the CPU kernels take them (16-bit as uint16 bits)."""
    return kernel_view(params), kernel_view(grads), params if master is None else master


def _launch_gpu(op: str, name: str, sched: Schedule, step: int, lr_scale: float,
                **args) -> float:
    """One GPU kernel launch (params of format ``name``) for step ``step`` on the current
    stream; returns the lr (computed on the host). No host-to-device copy once the schedule's
    table is on the device: the step is written by a fill on the stream."""
    from .gpu import launch

    params = args["params"]
    xp = xp_of(params)
    step_state = xp.zeros(2, dtype=np.uint64)
    step_state[0] = step - 1
    launch.launch(op, name, dict(args, table=_device_table(sched, params.device.id),
                                 table_rows=sched.table.shape[0], step_state=step_state,
                                 lr_out=xp.empty(1, dtype=np.float64), lr_scale=lr_scale,
                                 n=params.shape[0]))
    return host_lr(sched, step - 1) * lr_scale


@functools.lru_cache(maxsize=64)
def _device_table(sched: Schedule, device_id: int):
    """A schedule's table on a GPU, copied once per (schedule, device); schedules are
    immutable, so the copy stays valid."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.asarray(sched.table)


def adam(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step: int, lr=None,
         master=None, dtype=None,
         schedule=None, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
         lr_scale: float = 1.0, grad_scale: float = 1.0) -> float:
    """Adam step k = ``step`` in place (AdamW when ``decoupled_weight_decay``); lr default 1e-3.

    p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps), m and v the moment EMAs.
    """
    sched = _schedule(1e-3 if lr is None and schedule is None else lr, schedule)
    beta1, beta2 = check_betas(betas)
    eps, weight_decay = check_eps(eps), check_weight_decay(weight_decay)
    step, lr_scale, mult = check_step(step), check_lr_scale(lr_scale), grad_mult(grad_scale)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("max_exp_avg_sq is required when amsgrad=True")
    max_buffer = max_exp_avg_sq if amsgrad else None
    n, name = _buffers(params, grads, master, dtype, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                       max_exp_avg_sq=max_buffer)
    if is_cupy(params):
        return _launch_gpu("adam", name, sched, step, lr_scale, grad_mult=mult, params=params,
                           grads=grads, master=params if master is None else master,
                           exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                           max_exp_avg_sq=exp_avg if max_buffer is None else max_buffer,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                           decoupled=bool(decoupled_weight_decay), amsgrad=bool(amsgrad),
                           maximize=bool(maximize))
    parallel = _parallel(n, params, exp_avg)
    with kernel_guard(parallel):
        return cpu.adam(*_cpu_args(params, grads, master), exp_avg, exp_avg_sq,
                        exp_avg if max_buffer is None else max_buffer, sched.table, step, lr_scale,
                        mult, beta1, beta2, eps, weight_decay, bool(decoupled_weight_decay),
                        bool(amsgrad), bool(maximize), FORMATS.get(name, 0), parallel)


def adamw(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step: int, lr=None,
          master=None, dtype=None,
          schedule=None, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          amsgrad: bool = False, maximize: bool = False, lr_scale: float = 1.0,
          grad_scale: float = 1.0) -> float:
    """AdamW step k in place: Adam with decoupled weight decay p <- p * (1 - lr * wd) first."""
    return adam(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, master=master,
                dtype=dtype, schedule=schedule, betas=betas, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                lr_scale=lr_scale, grad_scale=grad_scale)


def adagrad(params, grads, state_sum, *, step: int, lr=None, schedule=None, master=None,
            dtype=None,
            lr_decay: float = 0.0, eps: float = 1e-10, weight_decay: float = 0.0,
            maximize: bool = False, lr_scale: float = 1.0, grad_scale: float = 1.0) -> float:
    """Adagrad step k in place (lr default 1e-2).

    sum <- sum + g^2;  p <- p - lr / (1 + (k - 1) * lr_decay) * g / (sqrt(sum) + eps).
    """
    sched = _schedule(1e-2 if lr is None and schedule is None else lr, schedule)
    lr_decay = check_real("lr_decay", lr_decay)
    eps, weight_decay = check_eps(eps), check_weight_decay(weight_decay)
    step, lr_scale, mult = check_step(step), check_lr_scale(lr_scale), grad_mult(grad_scale)
    n, name = _buffers(params, grads, master, dtype, state_sum=state_sum)
    if is_cupy(params):
        return _launch_gpu("adagrad", name, sched, step, lr_scale, grad_mult=mult, params=params,
                           grads=grads, master=params if master is None else master,
                           state_sum=state_sum, lr_decay=lr_decay, eps=eps,
                           weight_decay=weight_decay, maximize=bool(maximize))
    parallel = _parallel(n, params, state_sum)
    with kernel_guard(parallel):
        return cpu.adagrad(*_cpu_args(params, grads, master), state_sum, sched.table, step,
                           lr_scale, mult, lr_decay, eps, weight_decay, bool(maximize),
                           FORMATS.get(name, 0), parallel)


def adadelta(params, grads, square_avg, acc_delta, *, step: int, lr=None, schedule=None,
             master=None, dtype=None,
             rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
             maximize: bool = False, lr_scale: float = 1.0, grad_scale: float = 1.0) -> float:
    """Adadelta step k in place (lr default 1.0).

    E[g^2] <- rho E[g^2] + (1 - rho) g^2;  d = sqrt(E[d^2] + eps) / sqrt(E[g^2] + eps) * g;
    E[d^2] <- rho E[d^2] + (1 - rho) d^2;  p <- p - lr * d.
    """
    sched = _schedule(1.0 if lr is None and schedule is None else lr, schedule)
    rho = check_real("rho", rho, 0.0, 1.0)
    eps, weight_decay = check_eps(eps), check_weight_decay(weight_decay)
    step, lr_scale, mult = check_step(step), check_lr_scale(lr_scale), grad_mult(grad_scale)
    n, name = _buffers(params, grads, master, dtype, square_avg=square_avg, acc_delta=acc_delta)
    if is_cupy(params):
        return _launch_gpu("adadelta", name, sched, step, lr_scale, grad_mult=mult, params=params,
                           grads=grads, master=params if master is None else master,
                           square_avg=square_avg, acc_delta=acc_delta, rho=rho, eps=eps,
                           weight_decay=weight_decay, maximize=bool(maximize))
    parallel = _parallel(n, params, square_avg)
    with kernel_guard(parallel):
        return cpu.adadelta(*_cpu_args(params, grads, master), square_avg, acc_delta,
                            sched.table, step, lr_scale, mult, rho, eps, weight_decay,
                            bool(maximize), FORMATS.get(name, 0), parallel)
