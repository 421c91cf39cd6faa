"""Learning-rate schedules as data, evaluated inside the kernels.

A schedule is a small float64 *segment table*, one row per piece::

    [kind, start, origin, p0, p1, p2, p3, p4, p5]

The row in force at step ``t`` is the last one with ``start <= t``; it sees its own clock
``t - origin`` (``origin`` is usually ``start``; one-cycle phases begin between steps).
Composition (``warmup``, ``join``, ``multistep``, ``one_cycle``) only adds rows, so every
schedule runs through the same compiled kernel.

``Schedule.at(steps)`` is the float64 numpy reference, vectorised; the kernels carry their own
scalar evaluator (``fastopt/cpu/schedule.py``, ``kernels/schedule.cuh``) that is tested against it.
Step numbering follows torch: the k-th optimizer step (k = 1, 2, ...) uses ``at(k - 1)``.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Iterable, Sequence

import numpy as np

from .cpu.schedule import lr_at

# Segment kinds (the same numbers in every kernel) and their parameters p0..p5:
CONSTANT = 0  # lr                                        p: lr
POLYNOMIAL = 1  # (lr - end) * (1 - min(t, T) / T)^power + end  p: lr, end, T, power
INVERSE_TIME = 2  # lr / (1 + rate * t / steps)             p: lr, rate, steps, staircase
EXPONENTIAL = 3  # lr * rate^(t / steps)                     p: lr, rate, steps, staircase
LADDER = 4  # max(min_lr, lr - drop * floor(t / every))     p: lr, drop, every, min_lr
COSINE = 5  # end + (lr - end) * (1 + cos(pi min(t, T) / T)) / 2   p: lr, end, T
COSINE_RESTARTS = 6  # cosine within periods T0, T0 m, T0 m^2   p: lr, end, T0, m
CYCLIC = 7  # torch CyclicLR closed form                    p: base, max, up, down, mode, gamma

KIND_NAMES = (
    "constant",
    "polynomial",
    "inverse_time",
    "exponential",
    "ladder",
    "cosine",
    "cosine_restarts",
    "cyclic",
)
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")
TABLE_COLUMNS = 9  # kind, start, origin, p0..p5
N_PARAMS = TABLE_COLUMNS - 3
MAX_COUNT = 2**53  # step counts in a table are float64: exact up to here

#: What each kind's parameters p0.. must satisfy: the constructors' rules, checked again on
#: every table that enters (``Schedule(table)``, ``load_state_dict``, ``fastopt.load``), so
#: every table the kernels see gives lrs >= 0 and bounded loops (cosine_restarts walks its
#: periods one by one: integer period_mult >= 1 keeps that walk logarithmic). A growing
#: schedule (an exponential or step decay with a rate above 1, cyclic's exp_range with gamma
#: above 1) overflows to inf after enough steps, as torch's schedulers do.
ROW_RULES = {
    CONSTANT: (("lr", "lr"),),
    POLYNOMIAL: (("lr", "lr"), ("end_lr", "lr"), ("total_steps", "positive"),
                 ("power", "lr")),
    INVERSE_TIME: (("lr", "lr"), ("decay_rate", "lr"), ("decay_steps", "count"),
                   ("staircase", "flag")),
    EXPONENTIAL: (("lr", "lr"), ("decay_rate", "positive"), ("decay_steps", "count"),
                  ("staircase", "flag")),
    LADDER: (("lr", "lr"), ("drop", "lr"), ("every", "count"), ("min_lr", "lr")),
    COSINE: (("lr", "lr"), ("end_lr", "lr"), ("total_steps", "positive")),
    COSINE_RESTARTS: (("lr", "lr"), ("end_lr", "lr"), ("first_period", "count"),
                      ("period_mult", "count")),
    CYCLIC: (("base_lr", "lr"), ("max_lr", "lr"), ("step_size_up", "count"),
             ("step_size_down", "count"), ("mode", "mode"), ("gamma", "positive")),
}
_RULE_CHECKS = {
    "lr": lambda v: v >= 0.0,
    "positive": lambda v: v > 0.0,
    "count": lambda v: v >= 1.0 and v == math.floor(v),
    "flag": lambda v: v in (0.0, 1.0),
    "mode": lambda v: v in (0.0, 1.0, 2.0),
}
_RULE_TEXT = {"lr": ">= 0", "positive": "> 0", "count": "an integer >= 1", "flag": "0 or 1",
              "mode": "0, 1 or 2"}


class Schedule:
    """An immutable learning-rate schedule: a segment table plus a readable description."""

    __slots__ = ("_table", "_description")

    def __init__(self, table: np.ndarray, description: str):
        table = np.array(table, dtype=np.float64, order="C", ndmin=2)
        _check_table(table)
        table.setflags(write=False)
        self._table = table
        self._description = description

    @property
    def table(self) -> np.ndarray:
        """The read-only float64 segment table, shape (segments, 9), handed to the kernels."""
        return self._table

    @property
    def is_constant(self) -> bool:
        """Whether the lr is the same at every step (one constant segment)."""
        return self._table.shape[0] == 1 and self._table[0, 0] == CONSTANT

    def at(self, steps):
        """Learning rate used at 0-based step(s) ``steps`` (scalar or array) as float64."""
        if steps is None or isinstance(steps, (str, bytes)) or (
                isinstance(steps, np.ndarray) and steps.dtype.kind not in "biuf"):
            raise TypeError(f"steps must be a number or an array of numbers, got {steps!r}")
        t = np.asarray(steps, dtype=np.float64)
        if not np.all(t >= 0):
            raise ValueError("steps must be >= 0")
        lr = _evaluate_table(self._table, np.atleast_1d(t))
        return float(lr[0]) if t.ndim == 0 else lr.reshape(t.shape)

    def __call__(self, steps):
        return self.at(steps)

    def __repr__(self) -> str:
        return self._description

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and np.array_equal(self._table, other._table)

    def __hash__(self) -> int:
        return hash((self._table + 0.0).tobytes())  # (+ 0.0: -0.0 and 0.0 hash alike, as ==)

    def __reduce__(self):
        # (a copy or an unpickled one made through the constructor: its table checked and
        # read-only again; a writable table is another type to Numba, another compile. The
        # table as nested lists of floats, exactly: torch.load(weights_only=True), torch's
        # default, refuses numpy arrays, and fastopt.torch allows this class)
        return Schedule, (self._table.tolist(), self._description)


# --------------------------------------------------------------------------- validation helpers


def _number(name: str, value, *, min_value=None, max_value=None, strict_min=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be finite, got an integer of {len(str(value))} "
                         "digits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value < min_value or (strict_min and value == min_value)):
        relation = ">" if strict_min else ">="
        raise ValueError(f"{name} must be {relation} {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value}")
    return value


def _flag(name: str, value) -> bool:
    """A bool (or the integer 0 or 1); anything else is refused, not read by its truth
    (the string "False" is true)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral)
                                                and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _ints(name: str, values) -> list:
    """A sequence of step counts, as a list (each checked by the caller)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}")
    return list(values)


def _count(name: str, value, *, min_value: int = 1) -> int:
    """An integer (an integral float such as 1e4 is accepted) >= min_value."""
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    if value > MAX_COUNT:
        raise ValueError(f"{name} must be <= 2**53, got {value}")
    return value


def _lr(name: str, value) -> float:
    return _number(name, value, min_value=0.0)


def _row(kind: int, *params: float) -> list[float]:
    params = list(params) + [0.0] * (N_PARAMS - len(params))
    return [float(kind), 0.0, 0.0, *params]


def _compact(rows: list) -> np.ndarray:
    """Drop rows that a later row starts no later than; the first row starts at step 0."""
    kept = [r for i, r in enumerate(rows) if i == len(rows) - 1 or rows[i + 1][1] > r[1]]
    table = np.array(kept, dtype=np.float64)
    table[0, 1] = 0.0
    return table


_ADVANCED = re.compile(r"advanced\((.*), (\d+)\)", flags=re.DOTALL)


def advanced(schedule: Schedule, n: int) -> Schedule:
    """``schedule`` n steps on: lr(t) = schedule(t + n) (the rows' starts and clocks moved
    back n steps; those that end before step 0 dropped). Built without the table checks,
    which a shift of a checked table keeps passing (a few µs: fastopt.torch advances a
    group's schedule at each step its params get no gradient). ``n``: an int in [0, 2**53)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"advanced() takes a Schedule, got {type(schedule).__name__}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n < 2**53:
        raise ValueError(f"advanced() moves a schedule on by a step count, an int in "
                         f"[0, 2**53), got {n!r}")
    n = int(n)
    if n == 0 or schedule.is_constant:
        return schedule
    m = _ADVANCED.fullmatch(schedule._description)
    name, total = (m.group(1), int(m.group(2)) + n) if m else (schedule._description, n)
    table = schedule._table.copy()
    table[:, 1:3] -= float(n)
    table = table[int(np.count_nonzero(table[1:, 1] <= 0.0)):]  # (starts increase)
    table[0, 1] = 0.0  # (the row in force at the new step 0; its clock keeps its origin)
    table.setflags(write=False)
    shifted = object.__new__(Schedule)
    shifted._table, shifted._description = table, f"advanced({name}, {total})"
    return shifted


def _check_table(table: np.ndarray) -> None:
    if table.ndim != 2 or table.shape[1] != TABLE_COLUMNS or table.shape[0] < 1:
        raise ValueError(
            f"schedule table must have shape (n >= 1, {TABLE_COLUMNS}), got {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError("schedule table must be finite")
    kinds = table[:, 0]
    if not np.all((kinds == np.round(kinds)) & (kinds >= 0) & (kinds < len(KIND_NAMES))):
        raise ValueError(f"schedule table has an unknown kind in {kinds}")
    if table[0, 1] != 0.0 or np.any(np.diff(table[:, 1]) <= 0):
        raise ValueError("schedule table starts must begin at 0 and strictly increase")
    if np.any(table[:, 2] > table[:, 1]):
        raise ValueError("schedule table origins must not lie after their row's start")
    for index, row in enumerate(table):
        kind = int(row[0])
        for column, (name, rule) in enumerate(ROW_RULES[kind]):
            value = row[3 + column]
            if not _RULE_CHECKS[rule](value):
                raise ValueError(f"schedule table row {index} ({KIND_NAMES[kind]}): {name} "
                                 f"must be {_RULE_TEXT[rule]}, got {value}")


# --------------------------------------------------------------------------- constructors


def constant(lr: float) -> Schedule:
    """lr(t) = lr."""
    lr = _lr("lr", lr)
    return Schedule([_row(CONSTANT, lr)], f"constant(lr={lr})")


def linear(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """lr(t) = lr + (end_lr - lr) * min(t, T) / T."""
    lr, end_lr = _lr("lr", lr), _lr("end_lr", end_lr)
    total_steps = _count("total_steps", total_steps)
    return Schedule(
        [_row(POLYNOMIAL, lr, end_lr, total_steps, 1.0)],
        f"linear(lr={lr}, total_steps={total_steps}, end_lr={end_lr})",
    )


def linear_lr(lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
              total_iters: int = 5) -> Schedule:
    """torch ``LinearLR``: lr * (start_factor + (end_factor - start_factor) * min(t, T) / T)."""
    start_factor = _number("start_factor", start_factor, min_value=0.0, max_value=1.0,
                           strict_min=True)
    end_factor = _number("end_factor", end_factor, min_value=0.0, max_value=1.0)
    lr = _lr("lr", lr)
    total_iters = _count("total_iters", total_iters)
    return Schedule(
        [_row(POLYNOMIAL, lr * start_factor, lr * end_factor, total_iters, 1.0)],
        f"linear_lr(lr={lr}, start_factor={start_factor}, end_factor={end_factor}, "
        f"total_iters={total_iters})",
    )


def polynomial(lr: float, total_steps: int, power: float = 1.0, end_lr: float = 0.0) -> Schedule:
    """lr(t) = (lr - end_lr) * (1 - min(t, T) / T) ** power + end_lr."""
    lr, end_lr = _lr("lr", lr), _lr("end_lr", end_lr)
    total_steps = _count("total_steps", total_steps)
    power = _number("power", power, min_value=0.0)
    return Schedule(
        [_row(POLYNOMIAL, lr, end_lr, total_steps, power)],
        f"polynomial(lr={lr}, total_steps={total_steps}, power={power}, end_lr={end_lr})",
    )


def inverse_time(lr: float, decay_steps: int, decay_rate: float,
                 staircase: bool = False) -> Schedule:
    """lr(t) = lr / (1 + decay_rate * t / decay_steps); t / decay_steps floored if staircase."""
    lr = _lr("lr", lr)
    decay_steps = _count("decay_steps", decay_steps)
    decay_rate = _number("decay_rate", decay_rate, min_value=0.0)
    staircase = _flag("staircase", staircase)
    return Schedule(
        [_row(INVERSE_TIME, lr, decay_rate, decay_steps, float(staircase))],
        f"inverse_time(lr={lr}, decay_steps={decay_steps}, decay_rate={decay_rate}, "
        f"staircase={bool(staircase)})",
    )


def exponential(lr: float, decay_rate: float, decay_steps: int = 1,
                staircase: bool = False) -> Schedule:
    """lr(t) = lr * decay_rate ** (t / decay_steps); the exponent floored if staircase."""
    lr = _lr("lr", lr)
    decay_rate = _number("decay_rate", decay_rate, min_value=0.0, strict_min=True)
    decay_steps = _count("decay_steps", decay_steps)
    staircase = _flag("staircase", staircase)
    return Schedule(
        [_row(EXPONENTIAL, lr, decay_rate, decay_steps, float(staircase))],
        f"exponential(lr={lr}, decay_rate={decay_rate}, decay_steps={decay_steps}, "
        f"staircase={bool(staircase)})",
    )


def step(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """lr(t) = lr * gamma ** floor(t / step_size)  (torch ``StepLR``)."""
    lr = _lr("lr", lr)
    step_size = _count("step_size", step_size)
    gamma = _number("gamma", gamma, min_value=0.0) + 0.0  # (-0.0 as 0.0)
    if gamma == 0.0:  # (torch's StepLR takes it: lr, then 0 from step_size on; an
        # exponential row's rate must be > 0, so as multistep's constant rows)
        return Schedule(multistep(lr, [step_size], 0.0).table,
                        f"step(lr={lr}, step_size={step_size}, gamma={gamma})")
    return Schedule(
        [_row(EXPONENTIAL, lr, gamma, step_size, 1.0)],
        f"step(lr={lr}, step_size={step_size}, gamma={gamma})",
    )


def multistep(lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """lr(t) = lr * gamma ** (number of milestones <= t)  (torch ``MultiStepLR``)."""
    lr = _lr("lr", lr)
    gamma = _number("gamma", gamma, min_value=0.0) + 0.0  # (0: as torch, the lr drops to 0;
    # + 0.0 makes -0.0 a 0.0, so the lr after a milestone is 0.0, not -0.0)
    milestones = sorted(_count("milestones", m, min_value=0)
                        for m in _ints("milestones", milestones))
    rows, value = [_row(CONSTANT, lr)], lr
    for m in milestones:
        value *= gamma  # repeated milestones multiply repeatedly, like torch
        if m == 0 or (len(rows) > 1 and rows[-1][1] == m):
            rows[-1][3] = value
        else:
            rows.append(_row(CONSTANT, value))
            rows[-1][1] = rows[-1][2] = m
    return Schedule(rows, f"multistep(lr={lr}, milestones={milestones}, gamma={gamma})")


def ladder(lr: float, drop: float, every: int, min_lr: float = 0.0) -> Schedule:
    """lr(t) = max(min_lr, lr - drop * floor(t / every))  (subtractive steps)."""
    lr, min_lr = _lr("lr", lr), _lr("min_lr", min_lr)
    drop = _number("drop", drop, min_value=0.0)
    every = _count("every", every)
    return Schedule(
        [_row(LADDER, lr, drop, every, min_lr)],
        f"ladder(lr={lr}, drop={drop}, every={every}, min_lr={min_lr})",
    )


def cosine(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """lr(t) = end_lr + (lr - end_lr) * (1 + cos(pi * min(t, T) / T)) / 2; clamps after T."""
    lr, end_lr = _lr("lr", lr), _lr("end_lr", end_lr)
    total_steps = _count("total_steps", total_steps)
    return Schedule(
        [_row(COSINE, lr, end_lr, total_steps)],
        f"cosine(lr={lr}, total_steps={total_steps}, end_lr={end_lr})",
    )


def cosine_restarts(lr: float, first_period: int, period_mult: int = 1,
                    end_lr: float = 0.0) -> Schedule:
    """Cosine from lr to end_lr within each period; periods T0, T0*m, T0*m^2, ...

    torch ``CosineAnnealingWarmRestarts(T_0=first_period, T_mult=period_mult, eta_min=end_lr)``.
    """
    lr, end_lr = _lr("lr", lr), _lr("end_lr", end_lr)
    first_period = _count("first_period", first_period)
    period_mult = _count("period_mult", period_mult)
    return Schedule(
        [_row(COSINE_RESTARTS, lr, end_lr, first_period, period_mult)],
        f"cosine_restarts(lr={lr}, first_period={first_period}, period_mult={period_mult}, "
        f"end_lr={end_lr})",
    )


def cyclic(base_lr: float, max_lr: float, step_size_up: int = 2000,
           step_size_down: int | None = None, mode: str = "triangular",
           gamma: float = 1.0) -> Schedule:
    """torch ``CyclicLR`` (cycle_momentum=False): triangular, triangular2 or exp_range."""
    base_lr, max_lr = _lr("base_lr", base_lr), _lr("max_lr", max_lr)
    step_size_up = _count("step_size_up", step_size_up)
    step_size_down = step_size_up if step_size_down is None else _count(
        "step_size_down", step_size_down)
    if mode not in CYCLIC_MODES:
        raise ValueError(f"mode must be one of {CYCLIC_MODES}, got {mode!r}")
    gamma = _number("gamma", gamma, min_value=0.0, strict_min=True)
    return Schedule(
        [_row(CYCLIC, base_lr, max_lr, step_size_up, step_size_down,
              CYCLIC_MODES.index(mode), gamma)],
        f"cyclic(base_lr={base_lr}, max_lr={max_lr}, step_size_up={step_size_up}, "
        f"step_size_down={step_size_down}, mode={mode!r}, gamma={gamma})",
    )


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3, anneal: str = "cos",
              div_factor: float = 25.0, final_div_factor: float = 1e4,
              three_phase: bool = False) -> Schedule:
    """torch ``OneCycleLR`` (cycle_momentum=False); holds the lr of step total_steps - 1 after it.

    Phases (torch's end steps): warm-up from max_lr / div_factor to max_lr until step
    pct_start * total_steps - 1, then annealing to max_lr / (div_factor * final_div_factor) at
    total_steps - 1; with ``three_phase`` the annealing goes back to max_lr / div_factor at
    2 * pct_start * total_steps - 2 before the last phase. A phase that would start at or after
    the last step (pct_start near 1, or above 0.5 with three_phase) is never reached, as in
    torch, and a phase running past the last step is cut there.
    """
    max_lr = _lr("max_lr", max_lr)
    total_steps = _count("total_steps", total_steps)
    pct_start = _number("pct_start", pct_start, min_value=0.0, max_value=1.0)
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
    three_phase = _flag("three_phase", three_phase)
    div_factor = _number("div_factor", div_factor, min_value=0.0, strict_min=True)
    final_div_factor = _number("final_div_factor", final_div_factor, min_value=0.0,
                               strict_min=True)
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    first = pct_start * total_steps - 1.0
    if three_phase:
        second = 2 * pct_start * total_steps - 2.0
        phases = [(first, initial_lr, max_lr), (second, max_lr, initial_lr),
                  (total_steps - 1.0, initial_lr, min_lr)]
    else:
        phases = [(first, initial_lr, max_lr), (total_steps - 1.0, max_lr, min_lr)]
    # torch's steps 0..total_steps-1 lie in the phases up to the first one ending at or past
    # the last step: with a large pct_start the final phase is empty (or ends before the one
    # ahead of it) and torch never reaches it
    last = total_steps - 1.0
    while len(phases) > 1 and phases[-2][0] >= last:
        phases.pop()
    if len(phases) == 1 and phases[0][0] <= 0.0:  # total_steps=1, pct_start=1: torch divides by 0
        raise ValueError(f"total_steps={total_steps} with pct_start={pct_start} leaves the "
                         "warm-up no step to run over")
    rows, start = [], 0.0
    for end, lr_from, lr_to in phases:
        kind_params = (COSINE, lr_from, lr_to, end - start) if anneal == "cos" else \
            (POLYNOMIAL, lr_from, lr_to, end - start, 1.0)
        row = _row(*kind_params)
        row[1] = row[2] = start  # torch: a phase holds the steps <= its end_step
        rows.append(row)
        start = end
    table = _compact(rows)
    if phases[-1][0] > last:  # cut short by total_steps: hold the lr of the last step
        table = _compact([*table.tolist(), [float(CONSTANT), last, last,
                                            float(_evaluate_table(table, np.array([last]))[0]),
                                            *[0.0] * (N_PARAMS - 1)]])
    return Schedule(
        table,
        f"one_cycle(max_lr={max_lr}, total_steps={total_steps}, pct_start={pct_start}, "
        f"anneal={anneal!r}, div_factor={div_factor}, final_div_factor={final_div_factor}, "
        f"three_phase={bool(three_phase)})",
    )


def _schedule_or_lr(name: str, value) -> Schedule:
    """``value`` if a Schedule, else a constant one of lr ``value`` (a real number)."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Schedule or an lr (a real number), got {value!r}")
    return constant(value)


def join(schedules: Sequence[Schedule | float], boundaries: Sequence[int]) -> Schedule:
    """Piece i runs from boundaries[i-1] (0 for the first) on its own clock (t - boundaries[i-1]).

    optax ``join_schedules``; torch ``SequentialLR(schedulers, milestones=boundaries)``.
    """
    if isinstance(schedules, (Schedule, str, bytes)) or not isinstance(schedules, Iterable):
        raise TypeError("join takes a list of schedules (or lrs) and a list of boundaries, "
                        f"got {type(schedules).__name__} for schedules")
    schedules = [_schedule_or_lr(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
    if not schedules:
        raise ValueError("schedules must not be empty")
    boundaries = [_count("boundaries", b, min_value=1) for b in _ints("boundaries", boundaries)]
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must have len(schedules) - 1 = {len(schedules) - 1} entries, "
            f"got {len(boundaries)}")
    if any(b1 <= b0 for b0, b1 in zip(boundaries, boundaries[1:], strict=False)):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries}")
    offsets = [0, *boundaries]
    ends = [*boundaries, math.inf]
    rows = []
    for sched, offset, end in zip(schedules, offsets, ends, strict=True):
        for row in sched.table:
            if offset + row[1] >= end:
                break
            row = row.copy()
            row[1] += offset
            row[2] += offset
            rows.append(row)
    return Schedule(_compact(rows), f"join({schedules!r}, boundaries={boundaries})")


def warmup(schedule: Schedule | float, warmup_steps: int, start_lr: float = 0.0) -> Schedule:
    """Linear from start_lr at step 0 towards schedule.at(0), then schedule on its own clock."""
    schedule = _schedule_or_lr("schedule", schedule)
    warmup_steps = _count("warmup_steps", warmup_steps, min_value=0)
    start_lr = _lr("start_lr", start_lr)
    if warmup_steps == 0:
        return schedule
    ramp = linear(start_lr, warmup_steps, end_lr=schedule.at(0))
    joined = join([ramp, schedule], [warmup_steps])
    return Schedule(joined.table, f"warmup({schedule!r}, warmup_steps={warmup_steps}, "
                                  f"start_lr={start_lr})")


def host_lr(schedule: Schedule, step) -> float:
    """``schedule``'s lr at 0-based ``step`` from the kernels' own scalar evaluator, called from
    Python: the value a kernel uses, in ~0.3 µs instead of the ~20 µs of ``Schedule.at`` (the
    numpy reference). For per-step bookkeeping (``current_lr``, ``group['lr']``, the GPU
    path's returned lr)."""
    return float(lr_at(schedule.table, float(step)))


def as_schedule(lr) -> Schedule:
    """A Schedule from a Schedule or a plain learning rate (constant schedules are memoised:
    a float lr passed on every step builds its table once)."""
    if isinstance(lr, Schedule):
        return lr
    return _constant(_number("lr", lr, min_value=0.0))


@functools.lru_cache(maxsize=256)
def _constant(lr: float) -> Schedule:
    return constant(lr)


# --------------------------------------------------------------------------- numpy reference


def _evaluate_table(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Vectorised float64 reference: lr at every 0-based step in ``t``."""
    segment = np.searchsorted(table[:, 1], t, side="right") - 1
    out = np.empty_like(t)
    with np.errstate(over="ignore"):  # e.g. 2 ** cycle at huge t: the factor is then 0
        for s, row in enumerate(table):
            mask = segment == s
            if np.any(mask):
                out[mask] = _evaluate_kind(int(row[0]), row[3:], t[mask] - row[2])
    return out


def _evaluate_kind(kind: int, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    if kind == CONSTANT:
        return np.full_like(t, p[0])
    if kind == POLYNOMIAL:
        lr, end, total, power = p[:4]
        frac = 1.0 - np.clip(t, 0.0, total) / total
        return (lr - end) * frac**power + end
    if kind == INVERSE_TIME:
        lr, rate, steps, stair = p[:4]
        x = np.floor(t / steps) if stair else t / steps
        return lr / (1.0 + rate * x)
    if kind == EXPONENTIAL:
        lr, rate, steps, stair = p[:4]
        x = np.floor(t / steps) if stair else t / steps
        return lr * rate**x
    if kind == LADDER:
        lr, drop, every, min_lr = p[:4]
        return np.maximum(min_lr, lr - drop * np.floor(t / every))
    if kind == COSINE:
        lr, end, total = p[:3]
        return end + (lr - end) * (1.0 + np.cos(np.pi * np.clip(t, 0.0, total) / total)) / 2.0
    if kind == COSINE_RESTARTS:
        lr, end, first, mult = p[:4]
        t_cur, period = _restart_position(t, first, mult)
        return end + (lr - end) * (1.0 + np.cos(np.pi * t_cur / period)) / 2.0
    if kind == CYCLIC:
        base, peak, up, down, mode, gamma = p[:6]
        total = up + down
        cycle = np.floor(1.0 + t / total)
        x = 1.0 + t / total - cycle
        ratio = up / total
        scale = np.where(x <= ratio, x / ratio, (x - 1.0) / (ratio - 1.0))
        if mode == 0:
            factor = np.ones_like(t)
        elif mode == 1:
            factor = 1.0 / 2.0 ** (cycle - 1.0)
        else:
            factor = gamma**t
        return base + (peak - base) * scale * factor
    raise ValueError(f"unknown schedule kind {kind}")


def _restart_position(t: np.ndarray, first: float, mult: float):
    """(t within its period, period length) for periods first, first*mult, ..."""
    if mult == 1.0:
        return np.mod(t, first), np.full_like(t, first)
    # index of the period holding t, from the geometric sum first*(mult^n - 1)/(mult - 1) <= t
    n = np.floor(np.log(t / first * (mult - 1.0) + 1.0) / np.log(mult))
    begin = first * (mult**n - 1.0) / (mult - 1.0)
    # guard the float log at period boundaries
    n = np.where(begin > t, n - 1, n)
    n = np.where(first * (mult ** (n + 1) - 1.0) / (mult - 1.0) <= t, n + 1, n)
    begin = first * (mult**n - 1.0) / (mult - 1.0)
    return t - begin, first * mult**n


# --------------------------------------------------------------------------- plateau controller


class ReduceOnPlateau:
    """torch ``ReduceLROnPlateau`` for fastopt optimizers: scales the in-kernel lr.

    ``step(metric)`` after each evaluation; when the metric has not improved for ``patience``
    evaluations the optimizer's ``lr_scale`` is multiplied by ``factor`` (not below the scale that
    gives ``min_lr`` at the current step), then ``cooldown`` evaluations are ignored.
    Nothing is recompiled: the scale is a kernel argument.
    """

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, eps: float = 1e-8):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.factor = _number("factor", factor, min_value=0.0, strict_min=True)
        if self.factor >= 1.0:
            raise ValueError(f"factor must be < 1.0, got {factor}")
        if not all(hasattr(optimizer, a) for a in ("schedule", "lr_scale", "step_count")):
            raise TypeError(
                f"ReduceOnPlateau scales the lr of a fastopt.<Name> optimizer (its lr_scale); "
                f"{type(optimizer).__module__}.{type(optimizer).__name__} is not one: for a "
                "fastopt.torch optimizer use torch.optim.lr_scheduler.ReduceLROnPlateau, "
                "which sets group['lr'] as for any torch optimizer (a value it sets overrides "
                "an in-kernel schedule from then on: give the optimizer a float lr, or use "
                "ReduceOnPlateau with fastopt.<Name>)")
        self.optimizer = optimizer
        self.mode, self.threshold_mode = mode, threshold_mode
        self.patience = _count("patience", patience, min_value=0)
        self.threshold = _number("threshold", threshold, min_value=0.0)
        self.cooldown = _count("cooldown", cooldown, min_value=0)
        self.min_lr = _lr("min_lr", min_lr)
        self.eps = _number("eps", eps, min_value=0.0)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0

    def _is_better(self, metric: float) -> bool:
        if self.mode == "min":
            bound = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" \
                else self.best - self.threshold
            return metric < bound
        bound = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" \
            else self.best + self.threshold
        return metric > bound

    def step(self, metric: float) -> None:
        """Record one evaluation of the monitored metric."""
        if isinstance(metric, (str, bytes)) or not isinstance(metric, numbers.Real) \
                and not hasattr(metric, "__float__"):
            raise TypeError(f"step() takes the metric as a number, got "
                            f"{type(metric).__name__}")
        metric = float(metric)
        self.last_epoch += 1
        if self._is_better(metric):
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def _reduce(self) -> None:
        opt = self.optimizer
        scheduled = opt.schedule.at(opt.step_count)
        old_lr = scheduled * opt.lr_scale
        new_lr = max(old_lr * self.factor, self.min_lr)
        if old_lr - new_lr > self.eps and scheduled > 0:
            opt.lr_scale = new_lr / scheduled

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    _SETTINGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
                 "min_lr", "eps")
    _COUNTERS = ("num_bad_epochs", "cooldown_counter", "last_epoch")

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``: the settings checked as the constructor checks them,
        the counters as counts and ``best`` as a number, all before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (what state_dict() returns), got "
                            f"{type(state).__name__}")
        unknown = set(state) - {*self._SETTINGS, *self._COUNTERS, "best", "optimizer"}
        if unknown:
            raise ValueError(f"ReduceOnPlateau state has unknown keys {sorted(unknown)}")
        checked = type(self)(self.optimizer, **{k: state.get(k, getattr(self, k))
                                                for k in self._SETTINGS})
        counters = {k: _count(k, state.get(k, getattr(self, k)), min_value=0)
                    for k in self._COUNTERS}
        best = state.get("best", self.best)
        if isinstance(best, bool) or not isinstance(best, numbers.Real) or math.isnan(best):
            raise ValueError(f"ReduceOnPlateau state 'best' must be a number, got {best!r}")
        self.__dict__.update({k: getattr(checked, k) for k in self._SETTINGS})
        self.__dict__.update(counters, best=float(best))
