"""One test entry per optimizer definition: its option combinations and the adapter to its
hand-written float64 reference (fastopt/reference.py). Tests parametrise over this table, so
an optimizer added to the registry is tested by adding its entry here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastopt import reference
from fastopt.algorithms import CLASSES, FIRST_GRAD, REGISTRY


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


CASES: dict[str, Case] = {
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
    "sgd": Case(
        options=(("SGD", {}), ("SGD", dict(momentum=0.9)),
                 ("SGD", dict(momentum=0.8, dampening=0.3, weight_decay=0.1, maximize=True)),
                 ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.05))),
        reference=_sgd),
}

assert set(CASES) == set(REGISTRY), "every definition needs its test entry"


def all_options():
    """(definition name, class name, hyperparameters) for every entry's options."""
    return [(name, cls, h) for name, case in CASES.items() for cls, h in case.options]


def full_hypers(cls: str, hypers: dict) -> dict:
    """Every hyperparameter of class ``cls`` given ``hypers``: defaults, the class's own
    defaults and fixed values, checked."""
    d, spec = CLASSES[cls]
    return d.check({**{h.name: h.default for h in d.hypers}, **spec.defaults, **hypers,
                    **spec.fixed})


def reference_run(cls: str, hypers: dict, p0, grads, schedule):
    """The float64 reference over these gradients (step k uses schedule.at(k - 1)): the final
    params and state (None for a state the options do not use)."""
    d, _ = CLASSES[cls]
    full = full_hypers(cls, hypers)
    active = d.active_state(full)
    state = {s.name: np.full(np.shape(p0), d.initial_value(s.name, full))
             if s.name in active and s.init != FIRST_GRAD else None for s in d.state}
    state.update({s.name: s.init for s in d.scalars})  # per-step scalars (NAdam's)
    p = np.asarray(p0, np.float64)
    for k, g in enumerate(grads, start=1):
        p, state = CASES[d.name].reference(p, g, state, k, schedule.at(k - 1), full)
    return p, state
