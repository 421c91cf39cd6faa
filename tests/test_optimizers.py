"""Every optimizer x every option x several schedules, 200+ steps: vs torch.optim and float64."""

import itertools

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

import fastopt
from fastopt import reference
from fastopt import schedules as S

STEPS = 220
N = 1031  # prime: no size is special

# (fastopt schedule from base lr, torch scheduler factory)
SCHEDULES = {
    "constant": (lambda lr: lr, None),
    # torch's CosineAnnealingLR is periodic past T_max, ours clamps: keep 30 + 190 <= STEPS
    "warmup_cosine": (lambda lr: S.warmup(S.cosine(lr, 190, end_lr=lr / 20), 30, lr / 100),
                      None),
    "step": (lambda lr: S.step(lr, 40, gamma=0.5), lambda o: L.StepLR(o, 40, gamma=0.5)),
    "one_cycle": (lambda lr: S.one_cycle(lr, STEPS, anneal="linear"),
                  lambda o: L.OneCycleLR(o, o.param_groups[0]["lr"], total_steps=STEPS,
                                         anneal_strategy="linear", cycle_momentum=False)),
}


def make_torch_scheduler(name, opt, lr):
    if name == "warmup_cosine":  # eta_min depends on the base lr
        return L.SequentialLR(opt, [L.LinearLR(opt, 0.01, 1.0, 30),
                                    L.CosineAnnealingLR(opt, 190, eta_min=lr / 20)], [30])
    factory = SCHEDULES[name][1]
    return None if factory is None else factory(opt)


def random_grads(rng, steps, n=N):
    scales = np.exp(rng.uniform(-4, 2, size=steps))
    return [(rng.standard_normal(n) * s).astype(np.float32) for s in scales]


def run_torch(cls, p0, grads, sched_name, **kw):
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = cls([tp], **kw)
    sched = make_torch_scheduler(sched_name, opt, kw["lr"])
    for g in grads:
        tp.grad = torch.from_numpy(g)
        opt.step()
        if sched is not None:
            sched.step()
    return tp.detach().numpy()


def run_fastopt(cls, p0, grads, sched_name, lr, **kw):
    p = p0.copy()
    opt = cls(p, lr=SCHEDULES[sched_name][0](lr), **kw)
    for g in grads:
        opt.step(g)
    return p, opt


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def run_reference(fn, p0, grads, state, schedule, **kw):
    p = p0.astype(np.float64)
    state = [s.astype(np.float64) if s is not None else None for s in state]
    for k, g in enumerate(grads, start=1):
        p, *state = fn(p, g, *state, step=k, lr=schedule.at(k - 1), **kw)
    return p


ADAM_OPTIONS = list(itertools.product([False, True], [False, True], [0.0, 0.1]))


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("amsgrad,maximize,weight_decay", ADAM_OPTIONS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_family(name, amsgrad, maximize, weight_decay, sched_name):
    rng = np.random.default_rng(abs(hash((name, amsgrad, maximize, weight_decay))) % 2**32)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = random_grads(rng, STEPS)
    lr, betas, eps = 3e-3, (0.85, 0.995), 1e-7
    kw = dict(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize)
    ours, opt = run_fastopt(getattr(fastopt, name), p0, grads, sched_name, lr, **kw)
    theirs = run_torch(getattr(torch.optim, name), p0, grads, sched_name, lr=lr, **kw)
    assert rel_err(ours, theirs) <= 1e-5
    ref = run_reference(reference.adam, p0, grads,
                        [np.zeros(N), np.zeros(N), np.zeros(N) if amsgrad else None],
                        opt.schedule, beta1=betas[0], beta2=betas[1], eps=eps,
                        weight_decay=weight_decay, decoupled=name == "AdamW", amsgrad=amsgrad,
                        maximize=maximize)
    assert rel_err(ours, ref) <= 1e-5
    assert opt.step_count == STEPS
    assert not np.allclose(ours, p0)  # it moved


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("lr_decay,weight_decay,init,maximize",
                         list(itertools.product([0.0, 0.01], [0.0, 0.1], [0.0, 0.3],
                                                [False, True])))
def test_adagrad(lr_decay, weight_decay, init, maximize, sched_name):
    rng = np.random.default_rng(int(1000 * lr_decay + 10 * weight_decay + init * 7 + maximize))
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = random_grads(rng, STEPS)
    lr, eps = 0.05, 1e-9
    kw = dict(lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=init,
              eps=eps, maximize=maximize)
    ours, opt = run_fastopt(fastopt.Adagrad, p0, grads, sched_name, lr, **kw)
    theirs = run_torch(torch.optim.Adagrad, p0, grads, sched_name, lr=lr, **kw)
    assert rel_err(ours, theirs) <= 1e-5
    ref = run_reference(reference.adagrad, p0, grads, [np.full(N, init)], opt.schedule,
                        lr_decay=lr_decay, eps=eps, weight_decay=weight_decay, maximize=maximize)
    assert rel_err(ours, ref) <= 1e-5
    assert not np.allclose(ours, p0)


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("rho,weight_decay,maximize",
                         list(itertools.product([0.9, 0.5], [0.0, 0.1], [False, True])))
def test_adadelta(rho, weight_decay, maximize, sched_name):
    rng = np.random.default_rng(int(100 * rho + 10 * weight_decay + maximize))
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = random_grads(rng, STEPS)
    lr, eps = 0.5, 1e-5
    kw = dict(rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    ours, opt = run_fastopt(fastopt.Adadelta, p0, grads, sched_name, lr, **kw)
    theirs = run_torch(torch.optim.Adadelta, p0, grads, sched_name, lr=lr, **kw)
    assert rel_err(ours, theirs) <= 1e-5
    ref = run_reference(reference.adadelta, p0, grads, [np.zeros(N), np.zeros(N)], opt.schedule,
                        rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    assert rel_err(ours, ref) <= 1e-5
    assert not np.allclose(ours, p0)


@pytest.mark.parametrize("n", [1, 7, 16_383, 16_384, 100_003])
def test_serial_and_parallel_paths_agree_with_reference(n):
    """Sizes around the serial/parallel switch and vector tails."""
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = random_grads(rng, 5, n)
    sched = S.cosine(1e-2, 10)
    ours, _ = run_fastopt(fastopt.AdamW, p0, grads, "constant", sched, amsgrad=True)
    ref = run_reference(reference.adam, p0, grads, [np.zeros(n)] * 3, sched, decoupled=True,
                        weight_decay=1e-2, amsgrad=True)
    assert rel_err(ours, ref) <= 1e-6


def test_defaults_equal_torch():
    import inspect

    for name in ("Adam", "AdamW", "Adagrad", "Adadelta"):
        ours = inspect.signature(getattr(fastopt, name)).parameters
        theirs = inspect.signature(getattr(torch.optim, name)).parameters
        for key, param in ours.items():
            if key in ("params", "dtype", "state_dtype", "master_weights"):  # (storage)
                continue
            assert key in theirs, (name, key)
            assert param.default == theirs[key].default, (name, key)


def test_nonfinite_gradients_propagate_like_torch():
    p = np.ones(64, np.float32)
    g = np.ones(64, np.float32)
    g[3] = np.nan
    g[5] = np.inf
    opt = fastopt.Adam(p)
    opt.step(g)
    tp = torch.nn.Parameter(torch.ones(64))
    topt = torch.optim.Adam([tp])
    tp.grad = torch.from_numpy(g)
    topt.step()
    np.testing.assert_array_equal(np.isnan(p), np.isnan(tp.detach().numpy()))
    assert np.isnan(p[3]) and np.isnan(p[5]) and np.isfinite(p[0])
