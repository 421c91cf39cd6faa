"""One test entry per optimizer definition: its option combinations and the adapter to its
hand-written float64 reference (fastopt/reference.py). Tests parametrise over this table, so
an optimizer added to the registry is tested by adding its entry here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastopt import reference
from fastopt.algorithms import CLASSES, FIRST_GRAD, INIT_LR, INIT_PARAMS, REGISTRY


@dataclass(frozen=True)
class Case:
    #: public class name -> hyperparameters; the first option is a plain default one
    options: tuple[tuple[str, dict], ...]
    #: (params, grads, state: name -> float64 array or None, step, lr, hypers (all, the
    #: class's fixed ones included)) -> (params, state)
    reference: callable


def _adam(p, g, s, step, lr, h):
    out = reference.adam(p, g, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"),
                         step=step, lr=lr, beta1=h["betas"][0], beta2=h["betas"][1],
                         eps=h["eps"], weight_decay=h["weight_decay"],
                         decoupled=h["decoupled_weight_decay"],
                         amsgrad=h["amsgrad"], maximize=h["maximize"])
    return out[0], {"exp_avg": out[1], "exp_avg_sq": out[2], "max_exp_avg_sq": out[3]}


def _adagrad(p, g, s, step, lr, h):
    out = reference.adagrad(p, g, s["sum"], step=step, lr=lr, lr_decay=h["lr_decay"],
                            eps=h["eps"], weight_decay=h["weight_decay"],
                            maximize=h["maximize"])
    return out[0], {"sum": out[1]}


def _adadelta(p, g, s, step, lr, h):
    out = reference.adadelta(p, g, s["square_avg"], s["acc_delta"], step=step, lr=lr,
                             rho=h["rho"], eps=h["eps"], weight_decay=h["weight_decay"],
                             maximize=h["maximize"])
    return out[0], {"square_avg": out[1], "acc_delta": out[2]}


def _sgd(p, g, s, step, lr, h):
    out = reference.sgd(p, g, s.get("momentum_buffer"), step=step, lr=lr, **h)
    return out[0], {"momentum_buffer": out[1]}


def _rmsprop(p, g, s, step, lr, h):
    out = reference.rmsprop(p, g, s["square_avg"], s.get("momentum_buffer"), s.get("grad_avg"),
                            step=step, lr=lr, **h)
    return out[0], dict(zip(("square_avg", "momentum_buffer", "grad_avg"), out[1:],
                            strict=True))


def _adamax(p, g, s, step, lr, h):
    out = reference.adamax(p, g, s["exp_avg"], s["exp_inf"], step=step, lr=lr,
                           beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                           weight_decay=h["weight_decay"], maximize=h["maximize"])
    return out[0], {"exp_avg": out[1], "exp_inf": out[2]}


def _nadam(p, g, s, step, lr, h):
    out = reference.nadam(p, g, s["exp_avg"], s["exp_avg_sq"], s["mu_product"], step=step,
                          lr=lr, beta1=h["betas"][0], beta2=h["betas"][1],
                          **{k: v for k, v in h.items() if k != "betas"})
    return out[0], {"exp_avg": out[1], "exp_avg_sq": out[2], "mu_product": out[3]}


def _radam(p, g, s, step, lr, h):
    out = reference.radam(p, g, s["exp_avg"], s["exp_avg_sq"], step=step, lr=lr,
                          beta1=h["betas"][0], beta2=h["betas"][1],
                          **{k: v for k, v in h.items() if k != "betas"})
    return out[0], {"exp_avg": out[1], "exp_avg_sq": out[2]}


def _rprop(p, g, s, step, lr, h):
    out = reference.rprop(p, g, s["prev"], s["step_size"], step=step, lr=lr, **h)
    return out[0], {"prev": out[1], "step_size": out[2]}


def _asgd(p, g, s, step, lr, h):
    out = reference.asgd(p, g, s["ax"], s["eta"], s["mu"], step=step, lr=lr, **h)
    return out[0], {"ax": out[1], "eta": out[2], "mu": out[3]}


def _lion(p, g, s, step, lr, h):
    out = reference.lion(p, g, s["exp_avg"], step=step, lr=lr, **h)
    return out[0], {"exp_avg": out[1]}


def _ademamix(p, g, s, step, lr, h):
    out = reference.ademamix(p, g, s["exp_avg"], s["exp_avg_slow"], s["exp_avg_sq"],
                             step=step, lr=lr, **h)
    return out[0], dict(zip(("exp_avg", "exp_avg_slow", "exp_avg_sq"), out[1:], strict=True))


def _adamwschedulefree(p, g, s, step, lr, h):
    out = reference.adamwschedulefree(p, g, s["z"], s["exp_avg_sq"], s["weight_sum"],
                                      s["lr_max"], step=step, lr=lr, **h)
    return out[0], dict(zip(("z", "exp_avg_sq", "weight_sum", "lr_max"), out[1:], strict=True))


def segment_shapes(n: int, matrices: bool = False) -> list[tuple[int, ...]]:
    """The tensors a test lays out in a flat buffer of n elements for a tensor-aware
    optimizer (LAMB): a matrix, a vector, a 3-d tensor, a scalar and the rest, packed back to
    back (shorter buffers: one or two vectors). ``matrices`` (Muon, 2-D only): a wide, a
    tall and a square matrix and the rest as a column (shorter buffers: a row, or a column
    and a row)."""
    if matrices:
        if n < 200:
            return [(1, n)] if n < 4 else [(n // 2, 1), (1, n - n // 2)]
        return [(7, 9), (20, 3), (8, 8), (n - 187, 1)]
    if n < 200:
        return [(n,)] if n < 4 else [(n // 2,), (n - n // 2,)]
    return [(7, 9), (20,), (2, 3, 5), (), (n - 114,)]


def shapes_for(name: str, n: int) -> list[tuple[int, ...]]:
    """``segment_shapes`` as definition ``name`` takes them (matrices only for Muon)."""
    return segment_shapes(n, REGISTRY[name].matrix is not None)


def layout(name: str, n: int) -> dict:
    """The ``segments=`` keyword a tensor-aware definition's call takes for a test buffer of
    n elements (``segment_shapes``); nothing for an elementwise one."""
    return {"segments": shapes_for(name, n)} if REGISTRY[name].segmented else {}


def _muon(p, g, s, step, lr, h):
    from fastopt.segments import SegmentTable

    table = SegmentTable.contiguous(segment_shapes(len(p), matrices=True))
    out = reference.muon(p, g, s["momentum_buffer"], step=step, lr=lr,
                         segments=list(zip(table.offsets, table.shapes, strict=True)), **h)
    return out[0], {"momentum_buffer": out[1]}


def _lamb(p, g, s, step, lr, h):
    from fastopt.segments import SegmentTable

    table = SegmentTable.contiguous(segment_shapes(len(p)))
    spans = [(o, table.numel(i)) for i, o in enumerate(table.offsets)]
    out = reference.lamb(p, g, s["exp_avg"], s["exp_avg_sq"], step=step, lr=lr,
                         segments=spans, beta1=h["betas"][0], beta2=h["betas"][1],
                         eps=h["eps"], weight_decay=h["weight_decay"], maximize=h["maximize"])
    return out[0], {"exp_avg": out[1], "exp_avg_sq": out[2]}


def _adafactor(p, g, s, step, lr, h, shapes=None):
    from fastopt.segments import SegmentTable

    table = SegmentTable.contiguous(shapes or segment_shapes(len(p)))
    eps1, eps2 = h["eps"]
    out = reference.adafactor(p, g, s["row_var"], s["col_var"], s["variance"], step=step,
                              lr=lr, segments=list(zip(table.offsets, table.shapes,
                                                       strict=True)),
                              beta2_decay=h["beta2_decay"], eps1=eps1, eps2=eps2, d=h["d"],
                              weight_decay=h["weight_decay"], maximize=h["maximize"])
    return out[0], dict(zip(("row_var", "col_var", "variance"), out[1:], strict=True))


CASES: dict[str, Case] = {
    "adafactor": Case(
        options=(("Adafactor", {}),
                 ("Adafactor", dict(weight_decay=0.1, maximize=True, beta2_decay=-0.5)),
                 ("Adafactor", dict(d=2.0, eps=(1e-30, 1e-2)))),
        reference=_adafactor),
    "adam": Case(
        options=(("Adam", {}), ("AdamW", {}),
                 ("Adam", dict(amsgrad=True, weight_decay=0.1, maximize=True)),
                 ("Adam", dict(decoupled_weight_decay=True, weight_decay=0.05, eps=0.0)),
                 ("AdamW", dict(betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=True)),
                 ("AdamW", dict(maximize=True, weight_decay=0.1))),
        reference=_adam),
    "adagrad": Case(
        options=(("Adagrad", {}),
                 ("Adagrad", dict(lr_decay=0.01, eps=1e-9, weight_decay=0.1, maximize=True,
                                  initial_accumulator_value=0.2))),
        reference=_adagrad),
    "adadelta": Case(
        options=(("Adadelta", {}),
                 ("Adadelta", dict(rho=0.85, eps=1e-5, weight_decay=0.1, maximize=True))),
        reference=_adadelta),
    "rmsprop": Case(
        options=(("RMSprop", {}), ("RMSprop", dict(momentum=0.9, weight_decay=0.1)),
                 ("RMSprop", dict(alpha=0.9, centered=True, maximize=True, eps=1e-6)),
                 ("RMSprop", dict(momentum=0.5, centered=True, weight_decay=0.05))),
        reference=_rmsprop),
    "adamax": Case(
        options=(("Adamax", {}),
                 ("Adamax", dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=True))),
        reference=_adamax),
    "nadam": Case(
        options=(("NAdam", {}), ("NAdam", dict(momentum_decay=0.01, weight_decay=0.1)),
                 ("NAdam", dict(betas=(0.8, 0.99), weight_decay=0.05,
                                decoupled_weight_decay=True, maximize=True))),
        reference=_nadam),
    "radam": Case(
        options=(("RAdam", {}), ("RAdam", dict(betas=(0.8, 0.9), weight_decay=0.1)),
                 ("RAdam", dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                decoupled_weight_decay=True, maximize=True))),
        reference=_radam),
    "rprop": Case(
        options=(("Rprop", {}), ("Rprop", dict(etas=(0.3, 1.5), step_sizes=(1e-4, 0.02),
                                               maximize=True))),
        reference=_rprop),
    "asgd": Case(
        options=(("ASGD", {}), ("ASGD", dict(lambd=1e-2, alpha=0.6, t0=10, weight_decay=0.1)),
                 ("ASGD", dict(t0=0, maximize=True))),
        reference=_asgd),
    "lion": Case(
        options=(("Lion", {}), ("Lion", dict(betas=(0.8, 0.95), weight_decay=0.5,
                                             maximize=True))),
        reference=_lion),
    "ademamix": Case(
        options=(("AdEMAMix", {}),
                 ("AdEMAMix", dict(betas=(0.8, 0.99, 0.999), alpha=3.0, t_alpha_beta3=25,
                                   eps=1e-6, weight_decay=0.1)),
                 ("AdEMAMix", dict(t_alpha_beta3=1000, maximize=True))),
        reference=_ademamix),
    "adamwschedulefree": Case(
        options=(("AdamWScheduleFree", {}),
                 ("AdamWScheduleFree", dict(betas=(0.8, 0.99), warmup_steps=10, r=0.5,
                                            weight_decay=0.1)),
                 ("AdamWScheduleFree", dict(warmup_steps=5, weight_lr_power=1.0, eps=1e-6,
                                            weight_decay=0.05))),
        reference=_adamwschedulefree),
    "lamb": Case(
        options=(("LAMB", {}), ("LAMB", dict(weight_decay=0.1, betas=(0.8, 0.99))),
                 ("LAMB", dict(eps=1e-8, weight_decay=0.01, maximize=True))),
        reference=_lamb),
    "muon": Case(
        options=(("Muon", {}), ("Muon", dict(nesterov=False, momentum=0.9, weight_decay=0.0)),
                 ("Muon", dict(adjust_lr_fn="match_rms_adamw", ns_steps=3, momentum=0.3,
                               ns_coefficients=(2.0, -1.5, 0.5), eps=1e-3))),
        reference=_muon),
    "sgd": Case(
        options=(("SGD", {}), ("SGD", dict(momentum=0.9)),
                 ("SGD", dict(momentum=0.8, dampening=0.3, weight_decay=0.1, maximize=True)),
                 ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.05))),
        reference=_sgd),
}

assert set(CASES) == set(REGISTRY), "every definition needs its test entry"


def random_grads(rng, n: int, steps: int) -> list:
    """``steps`` float32 gradient vectors of length n, each at its own random scale."""
    import math

    return [(rng.standard_normal(n) * math.exp(rng.uniform(-2, 1))).astype(np.float32)
            for _ in range(steps)]


def rel_error(a, b) -> float:
    """max|a - b| / max|b| (the issues' criterion), in float64."""
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def make(cls: str, *args, **kwargs):
    """``fastopt.<cls>(params, lr, **kwargs)`` ready to step (fastopt._core.ready_to_step:
    Schedule-Free in train mode, where it steps), a tensor-aware optimizer over a plain array
    laid out as ``segment_shapes``."""
    import fastopt
    from fastopt._core import ready_to_step

    params, *rest = args
    if CLASSES[cls][0].segmented and "segments" not in kwargs \
            and not isinstance(params, fastopt.FlatBuffer):
        kwargs["segments"] = shapes_for(CLASSES[cls][0].name, params.shape[0])
    if rest:
        kwargs["lr"] = rest[0]
    return ready_to_step(cls, params, kwargs.pop("lr", CLASSES[cls][0].lr_default), **kwargs)


def schedule_for(name: str, schedule):
    """``schedule``, or its largest lr over the first 100 steps held constant for an optimizer
    that takes no schedule (Rprop: the lr only seeds step_size)."""
    if REGISTRY[name].schedulable:
        return schedule
    from fastopt import schedules

    return schedules.constant(float(np.max(schedule.at(np.arange(100)))))


def all_options():
    """(definition name, class name, hyperparameters) for every entry's options."""
    return [(name, cls, h) for name, case in CASES.items() for cls, h in case.options]


def full_hypers(cls: str, hypers: dict) -> dict:
    """Every hyperparameter of class ``cls`` given ``hypers``: defaults, the class's own
    defaults and fixed values, checked."""
    d, spec = CLASSES[cls]
    return d.check({**{h.name: h.default for h in d.hypers}, **spec.defaults, **hypers,
                    **spec.fixed})


def initial_state(d, full: dict, p0, schedule, shapes=None) -> dict:
    """Each state buffer's starting value as float64 (None where these options do not use it,
    or where it is set at the first step: SGD's momentum_buffer), and each per-step scalar's
    (NAdam's mu_product): what a caller of fastopt.functional allocates. ``shapes``: a
    tensor-aware definition's layout other than ``shapes_for``'s."""
    active = d.active_state(full)
    state = {}
    for s in d.state:
        if s.name not in active or s.init == FIRST_GRAD:
            state[s.name] = None
        elif s.init == INIT_LR:  # Rprop's step_size: the first step's lr
            state[s.name] = np.full(np.shape(p0), schedule.at(0))
        elif s.init == INIT_PARAMS:  # Schedule-Free's z: the params
            state[s.name] = np.asarray(p0, np.float64).copy()
        elif s.layout != "elements":  # (factored moments: sized by the layout)
            from fastopt.segments import SegmentTable

            n = int(np.size(p0))
            table = SegmentTable.contiguous(shapes or shapes_for(d.name, n))
            state[s.name] = np.full(d.state_size(s.name, n, table),
                                    d.initial_value(s.name, full))
        else:
            state[s.name] = np.full(np.shape(p0), d.initial_value(s.name, full))
    state.update({s.name: s.init for s in d.scalars})
    return state


def reference_run(cls: str, hypers: dict, p0, grads, schedule, shapes=None):
    """The float64 reference over these gradients (step k uses schedule.at(k - 1)): the final
    params and state (None for a state the options do not use). ``shapes``: a factored
    definition's layout other than ``shapes_for``'s."""
    d, _ = CLASSES[cls]
    full = full_hypers(cls, hypers)
    state = initial_state(d, full, p0, schedule, shapes)
    p = np.asarray(p0, np.float64)
    layout = {"shapes": shapes} if shapes else {}
    for k, g in enumerate(grads, start=1):
        p, state = CASES[d.name].reference(p, g, state, k, schedule.at(k - 1), full, **layout)
    return p, state


def logistic_problem(seed: int = 2):
    """A logistic regression (2000 x 50, labels from a noisy linear model): a function of the
    float32 weights giving (loss, gradient), for convergence checks of the state formats."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2000, 50)).astype(np.float32)
    w_true = rng.standard_normal(50).astype(np.float32)
    y = (x @ w_true + 0.5 * rng.standard_normal(2000) > 0).astype(np.float32)

    def loss_and_grad(w):
        z = x @ w
        p = 1 / (1 + np.exp(-z))
        return (float(np.mean(np.logaddexp(0, z) - y * z)),
                (x.T @ (p - y) / len(y)).astype(np.float32))

    return loss_and_grad
