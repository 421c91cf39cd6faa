"""Fused gradient unscaling, non-finite skip, global-norm clipping, extreme values, threads."""

import threading

import numpy as np
import pytest
import torch

import fastopt
from fastopt import functional as F
from fastopt import schedules as S

N = 2053
MAKERS = {
    "Adam": lambda p: fastopt.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "AdamW": lambda p: fastopt.AdamW(p, lr=1e-2),
    "Adagrad": lambda p: fastopt.Adagrad(p, lr=0.05, lr_decay=0.01),
    "Adadelta": lambda p: fastopt.Adadelta(p, lr=0.5, weight_decay=0.01),
}
TORCH = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.01),
    "Adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5, weight_decay=0.01),
}


def grads(steps, seed=0, n=N):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * np.exp(rng.uniform(-2, 2))).astype(np.float32)
            for _ in range(steps)]


def p0(n=N):
    return np.random.default_rng(42).standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_grad_scale_unscales_inside_the_kernel(name):
    plain, scaled = p0(), p0()
    a, b = MAKERS[name](plain), MAKERS[name](scaled)
    for i, g in enumerate(grads(30)):
        scale = 2.0 ** (i % 7 + 3)  # powers of two: scaling is exact
        a.step(g)
        assert b.step(g * np.float32(scale), grad_scale=scale) is True
    np.testing.assert_allclose(scaled, plain, rtol=1e-6, atol=1e-7)


def test_functional_grad_scale():
    plain, scaled = p0(), p0()
    st = [np.zeros(N, np.float32) for _ in range(4)]
    for k, g in enumerate(grads(10), start=1):
        F.adam(plain, g, st[0], st[1], step=k, lr=1e-2)
        F.adam(scaled, g * np.float32(1024), st[2], st[3], step=k, lr=1e-2, grad_scale=1024)
    np.testing.assert_allclose(scaled, plain, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="grad_scale"):
        F.adam(plain, grads(1)[0], st[0], st[1], step=11, grad_scale=0.0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_skip_if_nonfinite_changes_nothing(name, bad):
    p = p0()
    opt = MAKERS[name](p)
    for g in grads(3):
        assert opt.step(g, skip_if_nonfinite=True)
    before = (p.copy(), {k: v.copy() for k, v in opt.state.items()}, opt.step_count,
              opt.last_lr)
    g = grads(1, seed=9)[0]
    g[N // 2] = bad
    assert opt.step(g, skip_if_nonfinite=True, grad_scale=8.0) is False
    np.testing.assert_array_equal(p, before[0])
    for k, v in opt.state.items():
        np.testing.assert_array_equal(v, before[1][k])
    assert opt.step_count == before[2] and opt.last_lr == before[3]
    assert not np.isfinite(opt.last_grad_norm)
    g[N // 2] = 1.0
    assert opt.step(g, skip_if_nonfinite=True) is True and opt.step_count == before[2] + 1


@pytest.mark.parametrize("max_norm", [0.5, 5.0, 1e6])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_clipping_matches_torch_clip_grad_norm(name, max_norm):
    p = p0()
    opt = MAKERS[name](p)
    tp = torch.nn.Parameter(torch.from_numpy(p0()))
    topt = TORCH[name]([tp])
    for i, g in enumerate(grads(40, seed=3)):
        scale = 2.0 ** (i % 5)
        opt.step(g * np.float32(scale), grad_scale=scale, max_grad_norm=max_norm)
        tp.grad = torch.from_numpy(g.copy())
        total = torch.nn.utils.clip_grad_norm_([tp], max_norm)
        topt.step()
        assert opt.last_grad_norm == pytest.approx(float(total), rel=1e-5)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clipping_as_an_optimizer_attribute():
    a, b = p0(), p0()
    opt_a, opt_b = fastopt.AdamW(a), fastopt.AdamW(b)
    opt_a.max_grad_norm = 1.0
    for g in grads(5):
        opt_a.step(g)
        opt_b.step(g, max_grad_norm=1.0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt_a.step(g, max_grad_norm=-1.0)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_extreme_gradients_equal_torch(name):
    g = np.concatenate([np.full(4, 1e30), np.full(4, -1e30), np.full(4, 1e-30),
                        np.full(4, 3e38), np.zeros(4), np.full(4, 1e-45)]).astype(np.float32)
    p = np.linspace(-1, 1, g.size).astype(np.float32)
    opt = MAKERS[name](p)
    tp = torch.nn.Parameter(torch.linspace(-1, 1, g.size))
    topt = TORCH[name]([tp])
    for _ in range(3):
        opt.step(g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    theirs = tp.detach().numpy()
    np.testing.assert_array_equal(np.isfinite(p), np.isfinite(theirs))
    np.testing.assert_allclose(p[np.isfinite(p)], theirs[np.isfinite(theirs)], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_steps_beyond_2_pow_31_and_lr_zero(name):
    p = p0()
    opt = MAKERS[name](p)
    d = opt.state_dict()
    d["step"] = 2**31 + 7
    d["schedule"] = S.cosine_restarts(1e-2, 1000, 2).table
    opt.load_state_dict(d)
    for g in grads(3):
        opt.step(g)
    assert np.all(np.isfinite(p)) and opt.step_count == 2**31 + 10
    np.testing.assert_allclose(opt.last_lr, S.cosine_restarts(1e-2, 1000, 2).at(2**31 + 9))
    q = p0()
    frozen = MAKERS[name](q)
    frozen.schedule = 0.0
    for g in grads(3):
        frozen.step(g)
    np.testing.assert_array_equal(q, p0())  # lr = 0: nothing moves (decay is lr-scaled too)


def test_two_optimizers_in_two_threads_equal_sequential():
    data = grads(40, n=300_000)
    seq = [p0(300_000), p0(300_000)]
    opts = [fastopt.AdamW(seq[0]), fastopt.Adagrad(seq[1])]
    for g in data:
        for o in opts:
            o.step(g)
    par = [p0(300_000), p0(300_000)]
    popts = [fastopt.AdamW(par[0]), fastopt.Adagrad(par[1])]
    threads = [threading.Thread(target=lambda o=o: [o.step(g) for g in data]) for o in popts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(seq, par, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("eps", [0.0, 1e-38, 1.0, 1e10])
@pytest.mark.parametrize("name", ["Adam", "Adagrad", "Adadelta"])
def test_eps_at_its_limits_equals_torch(name, eps):
    """eps = 0 with nonzero gradients, subnormal, and huge eps: the same numbers as torch."""
    g = grads(4, seed=11, n=64)
    p = np.linspace(-1, 1, 64).astype(np.float32)
    ours = {"Adam": fastopt.Adam, "Adagrad": fastopt.Adagrad, "Adadelta": fastopt.Adadelta}
    opt = ours[name](p, eps=eps)
    tp = torch.nn.Parameter(torch.linspace(-1, 1, 64))
    topt = getattr(torch.optim, name)([tp], eps=eps)
    for x in g:
        opt.step(x)
        tp.grad = torch.from_numpy(x.copy())
        topt.step()
    theirs = tp.detach().numpy()
    assert np.all(np.isfinite(p)) == np.all(np.isfinite(theirs))
    np.testing.assert_allclose(p, theirs, rtol=1e-5, atol=1e-6)
