"""The optimizers without a torch.optim twin against the implementation their users know
(fastopt/oracles.py): Lion vs lion-pytorch, AdEMAMix vs pytorch-optimizer, AdamWScheduleFree
vs schedulefree; core classes and fastopt.torch, 200 steps, with schedules. Each oracle's
tests skip, with the reason, where its package is missing."""

from __future__ import annotations

import numpy as np
import pytest
from optimizer_cases import random_grads, rel_error

import fastopt
from fastopt import schedules as S
from fastopt.algorithms import CLASSES
from fastopt.oracles import ORACLES, counterpart

torch = pytest.importorskip("torch")
import fastopt.torch as fot  # noqa: E402


def _need(cls: str):
    oracle = ORACLES[cls]
    if not oracle.available():
        pytest.skip(f"{oracle.requirement} is not installed (pip install -e '.[test]')")


SCHEDULES = {
    "constant": lambda lr: S.constant(lr),
    "warmup_cosine": lambda lr: S.warmup(S.cosine(lr, 150, end_lr=lr / 20), 20),
    "step": lambda lr: S.step(lr, 30, 0.5),
}


_grads, _rel = random_grads, rel_error


def _run_pair(cls, hypers, schedule, lr, n=20_011, steps=200, seed=0):
    """fastopt.<cls> with ``schedule`` in the kernel and the oracle driven by a torch
    LambdaLR with the same values: (ours, theirs, the sum of the lrs used)."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(np.float32)
    p = p0.copy()
    ours = fastopt.__dict__[cls](p, lr=schedule, **hypers)
    t = torch.tensor(p0.copy(), requires_grad=True)
    theirs = counterpart(cls, [t], lr, **hypers)
    sched = torch.optim.lr_scheduler.LambdaLR(theirs, lambda k: schedule.at(k) / lr)
    if hasattr(ours, "train"):
        ours.train()
        theirs.train()
    lr_sum = 0.0
    for g in _grads(rng, n, steps):
        ours.step(g)
        lr_sum += ours.last_lr
        t.grad = torch.from_numpy(g.copy())
        theirs.step()
        sched.step()
    return p, t.detach().numpy(), lr_sum, ours, theirs


# ----------------------------------------------------------------------------- Lion

LION_OPTIONS = [{}, {"betas": (0.8, 0.95), "weight_decay": 0.5}, {"weight_decay": 0.1}]


def _lion_criterion(ours, theirs, lr_sum):
    """The issue's criterion: at most 1 element in 10^4 differs (a sign tie), by at most
    2 lr per step taken; all others within 1e-5 relative."""
    diff = np.abs(ours.astype(np.float64) - theirs)
    off = diff > 1e-5 * np.max(np.abs(theirs))
    assert off.sum() <= max(1, off.size // 10_000), int(off.sum())
    if off.any():
        assert diff[off].max() <= 2 * lr_sum


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@pytest.mark.parametrize("option", range(len(LION_OPTIONS)))
def test_lion_equals_lion_pytorch(option, kind):
    _need("Lion")
    lr = 1e-3
    ours, theirs, lr_sum, *_ = _run_pair("Lion", LION_OPTIONS[option], SCHEDULES[kind](lr), lr)
    _lion_criterion(ours, theirs, lr_sum)


# ----------------------------------------------------------------------------- AdEMAMix

ADEMAMIX_OPTIONS = [{}, {"t_alpha_beta3": 50, "weight_decay": 0.1},
                    {"betas": (0.8, 0.99, 0.999), "alpha": 3.0, "t_alpha_beta3": 500,
                     "eps": 1e-6}]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@pytest.mark.parametrize("option", range(len(ADEMAMIX_OPTIONS)))
def test_ademamix_equals_pytorch_optimizer(option, kind):
    _need("AdEMAMix")
    lr = 1e-2
    ours, theirs, *_ = _run_pair("AdEMAMix", ADEMAMIX_OPTIONS[option], SCHEDULES[kind](lr), lr,
                                 n=3001)
    assert _rel(ours, theirs) <= 1e-5


# ----------------------------------------------------------------------------- Schedule-Free

SF_OPTIONS = [{}, {"warmup_steps": 20, "weight_decay": 0.1},
              {"betas": (0.8, 0.99), "r": 0.5, "weight_lr_power": 1.0, "warmup_steps": 5}]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@pytest.mark.parametrize("option", range(len(SF_OPTIONS)))
def test_schedulefree_equals_schedulefree(option, kind):
    """Train mode throughout, then both switched to eval: y and x equal the oracle's; the
    scalars equal its group's."""
    _need("AdamWScheduleFree")
    lr = 1e-2
    ours, theirs, _, opt, oracle = _run_pair("AdamWScheduleFree", SF_OPTIONS[option],
                                             SCHEDULES[kind](lr), lr, n=3001)
    assert _rel(ours, theirs) <= 1e-5
    d, group = opt.state_dict(), oracle.param_groups[0]
    assert d["weight_sum"] == pytest.approx(group["weight_sum"], rel=1e-12)
    assert d["lr_max"] == pytest.approx(group["lr_max"], rel=1e-12)
    assert opt.step_count == group["k"] == 200
    opt.eval()
    oracle.eval()
    assert _rel(ours, theirs) <= 1e-5


def test_schedulefree_mode_switches_and_state_dict_round_trip():
    """Switches in the middle of training, an evaluation pass in eval mode, and a state-dict
    round trip (saved in eval mode, as schedulefree recommends) into a new optimizer."""
    _need("AdamWScheduleFree")
    rng = np.random.default_rng(5)
    n, lr, hypers = 2001, 1e-2, {"warmup_steps": 10, "weight_decay": 0.05}
    p0 = rng.standard_normal(n).astype(np.float32)
    p = p0.copy()
    ours = fastopt.AdamWScheduleFree(p, lr=lr, **hypers)
    assert not ours.train_mode
    with pytest.raises(RuntimeError, match="eval mode"):
        ours.step(np.ones(n, np.float32))
    assert ours.step_count == 0 and np.array_equal(p, p0)
    t = torch.tensor(p0.copy(), requires_grad=True)
    theirs = counterpart("AdamWScheduleFree", [t], lr, **hypers)
    grads = _grads(rng, n, 120)
    ours.train()
    theirs.train()
    ours.train()  # a no-op, as schedulefree's
    for k, g in enumerate(grads):
        if k in (30, 31, 77):
            ours.eval()
            theirs.eval()
            assert _rel(p, t.detach().numpy()) <= 1e-5
            ours.train()
            theirs.train()
        if k == 60:  # save in eval mode, resume in a new optimizer over a copy
            ours.eval()
            d = ours.state_dict()
            assert d["train_mode"] is False
            p = p.copy()
            ours = fastopt.AdamWScheduleFree(p, lr=0.5, **hypers)
            ours.load_state_dict(d)
            ours.train()
        ours.step(g)
        t.grad = torch.from_numpy(g.copy())
        theirs.step()
    assert _rel(p, t.detach().numpy()) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_schedulefree_torch_layer_equals_schedulefree(dtype):
    """fastopt.torch.AdamWScheduleFree over two tensors (float32, or bf16 params with a
    float32 master) against schedulefree: group keys, switches, and both state dicts
    crossing over."""
    _need("AdamWScheduleFree")
    torch.manual_seed(0)
    shapes = [(7, 5), (5,)]
    init = [torch.randn(s) for s in shapes]
    kind = getattr(torch, dtype)
    a = [torch.nn.Parameter(t.clone().to(kind)) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    hypers = {"lr": 1e-2, "warmup_steps": 5, "weight_decay": 0.1}
    ours = fot.AdamWScheduleFree(a, **hypers)
    theirs = counterpart("AdamWScheduleFree", b, **hypers)
    for key in ("k", "weight_sum", "lr_max", "train_mode"):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
    with pytest.raises(RuntimeError, match="eval mode"):
        ours.step()
    ours.train()
    theirs.train()
    tol = 1e-5 if dtype == "float32" else 1e-2
    for k in range(80):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.to(kind), g.clone()
        ours.step()
        theirs.step()
        if k == 40:  # schedulefree's dict into ours, and ours into schedulefree
            ours.eval()
            theirs.eval()
            ours.load_state_dict(theirs.state_dict())
            state = ours.state_dict()
            assert state["param_groups"][0]["k"] == 41
            theirs.load_state_dict(state)
            ours.train()
            theirs.train()
    g0, t0 = ours.param_groups[0], theirs.param_groups[0]
    assert g0["k"] == t0["k"] == 80
    assert float(g0["weight_sum"]) == pytest.approx(t0["weight_sum"], rel=1e-10)
    assert float(g0["lr_max"]) == pytest.approx(t0["lr_max"], rel=1e-12)
    for p, q in zip(a, b, strict=True):
        assert _rel(p.detach().float().numpy(), q.detach().numpy()) <= tol
    ours.eval()
    theirs.eval()
    for p, q in zip(a, b, strict=True):
        assert _rel(p.detach().float().numpy(), q.detach().numpy()) <= tol
    assert set(ours.state[a[0]]) >= {"z", "exp_avg_sq"}


@pytest.mark.parametrize("multi_tensor", [False, True])
def test_schedulefree_param_without_gradient_follows_the_group_count(multi_tensor):
    """A param with no gradient on some steps (frozen for a while, an unused branch): as in
    schedulefree, the group's k, weight_sum and lr_max go on for it, so its first update
    uses the group's k for the warm-up and the bias correction, not its own count. (With
    its own count it was 4e-4 off schedulefree after 10 steps.)"""
    _need("AdamWScheduleFree")
    torch.manual_seed(2)
    init = [torch.randn(30), torch.randn(6, 5), torch.randn(4)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    hypers = {"lr": 1e-2, "warmup_steps": 6, "weight_decay": 0.1}
    ours = fot.AdamWScheduleFree(a, multi_tensor=multi_tensor, **hypers)
    theirs = counterpart("AdamWScheduleFree", b, **hypers)
    ours.train()
    theirs.train()
    for k in range(14):
        present = [True, k >= 3 and k != 7, k % 4 != 1]
        for p, q, has in zip(a, b, present, strict=True):
            g = torch.randn(p.shape)
            p.grad, q.grad = (g.clone(), g) if has else (None, None)
        ours.step()
        theirs.step()
    g0, t0 = ours.param_groups[0], theirs.param_groups[0]
    assert g0["k"] == t0["k"] == 14
    assert float(g0["weight_sum"]) == pytest.approx(t0["weight_sum"], rel=1e-10)
    assert [int(ours.state[p]["step"]) for p in a] == [14] * 3
    ours.eval()
    theirs.eval()
    for p, q in zip(a, b, strict=True):
        assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-5


@pytest.mark.parametrize("mode", ["flat", "multi_tensor", "step_in_backward"])
def test_schedulefree_group_without_gradients_counts_the_step(mode):
    """A step where no param of a group has a gradient (a group frozen for the first steps,
    and again later): schedulefree's k, weight_sum and lr_max go on for the group, so its
    warm-up and weights continue; the state waits. Before, fastopt counted nothing (the
    group's first update used the warm-up's first lr: 0.036 relative off schedulefree after
    16 steps)."""
    _need("AdamWScheduleFree")
    torch.manual_seed(3)
    init = [torch.randn(7, 3), torch.randn(5), torch.randn(9)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    hypers = {"lr": 1e-2, "warmup_steps": 8, "weight_decay": 0.1}
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-2}]  # noqa: E731
    ours = fot.AdamWScheduleFree(groups(a), multi_tensor=mode == "multi_tensor", **hypers)
    theirs = counterpart("AdamWScheduleFree", groups(b), **hypers)
    ours.train()
    theirs.train()
    if mode == "step_in_backward":
        handle = fot.step_in_backward(a, ours)
    for k in range(16):
        frozen = k < 4 or 9 <= k < 11  # the second group has no gradient
        grads = [torch.randn(p.shape) for p in a]
        for q, g in zip(b, grads, strict=True):
            q.grad = None if frozen and q is b[2] else g.clone()
        theirs.step()
        if mode == "step_in_backward":
            used = a[:2] if frozen else a
            sum((p * g).sum() for p, g in zip(used, grads, strict=False)).backward()
        else:
            for p, g in zip(a, grads, strict=True):
                p.grad = None if frozen and p is a[2] else g.clone()
            ours.step()
    if mode == "step_in_backward":
        handle.remove()
    for g0, t0 in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert g0["k"] == t0["k"] == 16
        assert float(g0["weight_sum"]) == pytest.approx(t0["weight_sum"], rel=1e-10)
        assert float(g0["lr_max"]) == pytest.approx(t0["lr_max"], rel=1e-12)
    ours.eval()
    theirs.eval()
    for p, q in zip(a, b, strict=True):
        assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-5


# ----------------------------------------------------------------------------- torch layer


@pytest.mark.parametrize("cls", ["Lion", "AdEMAMix"])
def test_torch_layer_equals_the_oracle(cls):
    _need(cls)
    torch.manual_seed(1)
    shapes = [(11, 7), (7,)]
    init = [torch.randn(s) for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    hypers = {"lr": 1e-3, "weight_decay": 0.1}
    ours = getattr(fot, cls)(a, **hypers)
    theirs = counterpart(cls, b, **hypers)
    for _ in range(100):
        for p, q in zip(a, b, strict=True):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b, strict=True):
        if cls == "Lion":
            _lion_criterion(p.detach().numpy(), q.detach().numpy(), 100 * 1e-3)
        else:
            assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-5


def test_ademamix_state_dicts_cross_over_with_pytorch_optimizer():
    """pytorch-optimizer keeps AdEMAMix's count in the param group (``step``), fastopt per
    param: each one's dict, loaded into the other mid-training, goes on as if it had not
    changed hands (the count restarted at 0 before: 0.014 off after 5 steps). A group with a
    weight decay fastopt does not apply (``weight_decouple=False``) is refused."""
    _need("AdEMAMix")
    torch.manual_seed(3)
    init = torch.randn(40)
    hypers = {"lr": 1e-2, "t_alpha_beta3": 20, "weight_decay": 0.1}
    runs = [[torch.nn.Parameter(init.clone())] for _ in range(4)]
    ours = fot.AdEMAMix(runs[0], **hypers)
    theirs = counterpart("AdEMAMix", runs[1], **hypers)
    for _ in range(10):
        g = torch.randn(40)
        for ps, opt in ((runs[0], ours), (runs[1], theirs)):
            ps[0].grad = g.clone()
            opt.step()
    ours_from_theirs = fot.AdEMAMix(runs[2], lr=0.5)
    theirs_from_ours = counterpart("AdEMAMix", runs[3], lr=0.5)
    runs[2][0].data.copy_(runs[1][0].data)
    runs[3][0].data.copy_(runs[0][0].data)
    ours_from_theirs.load_state_dict(theirs.state_dict())
    theirs_from_ours.load_state_dict(ours.state_dict())
    assert int(ours_from_theirs.state[runs[2][0]]["step"]) == 10
    assert "step" not in ours_from_theirs.param_groups[0]
    opts = (ours, theirs, ours_from_theirs, theirs_from_ours)
    for _ in range(5):
        g = torch.randn(40)
        for ps, opt in zip(runs, opts, strict=True):
            ps[0].grad = g.clone()
            opt.step()
    for ps in runs[1:]:
        assert _rel(ps[0].detach().numpy(), runs[0][0].detach().numpy()) <= 1e-5
    state = theirs.state_dict()
    state["param_groups"][0]["weight_decouple"] = False
    with pytest.raises(ValueError, match="weight_decouple=False"):
        fot.AdEMAMix([torch.nn.Parameter(init.clone())]).load_state_dict(state)
    state["param_groups"][0]["weight_decay"] = 0.0  # (no decay: nothing to apply)
    fot.AdEMAMix([torch.nn.Parameter(init.clone())]).load_state_dict(state)


def test_every_class_has_a_counterpart():
    for cls, (d, _) in CLASSES.items():
        assert cls in d.torch_twin or cls in ORACLES, cls


# ----------------------------------------------------------------------------- LAMB

LAMB_OPTIONS = [{}, {"weight_decay": 0.1, "betas": (0.8, 0.99)}, {"eps": 1e-8,
                                                                  "weight_decay": 0.01}]
#: a scaled-down model's tensors (a matrix, a vector, a 3-d tensor, a scalar, a long vector
#: of several 32768-element chunks)
LAMB_SHAPES = [(64, 48), (48,), (4, 5, 6), (), (70_000,)]


def _lamb_pair(option, schedule, lr, torch_side: bool, steps=200, seed=0):
    """fastopt.LAMB (core over a FlatBuffer, or fastopt.torch) and optax.lamb on the same
    tensors for ``steps`` steps: (ours, theirs) as flat float64 arrays."""
    rng = np.random.default_rng(seed)
    values = [np.asarray(rng.standard_normal(s), np.float32) for s in LAMB_SHAPES]
    hypers = LAMB_OPTIONS[option]
    theirs_t = [torch.tensor(v.copy(), requires_grad=True) for v in values]
    theirs = counterpart("LAMB", theirs_t, lr, **hypers)
    sched = torch.optim.lr_scheduler.LambdaLR(theirs, lambda k: schedule.at(k) / lr)
    if torch_side:
        ours_t = [torch.tensor(v.copy(), requires_grad=True) for v in values]
        ours = fot.LAMB(ours_t, lr=schedule, **hypers)
    else:
        fb = fastopt.FlatBuffer(values)
        ours = fastopt.LAMB(fb, lr=schedule, **hypers)
        grads = fb.like()
    for _ in range(steps):
        scale = np.exp(rng.uniform(-2, 1))
        gs = [np.asarray(rng.standard_normal(s) * scale, np.float32) for s in LAMB_SHAPES]
        for t, g in zip(theirs_t, gs, strict=True):
            t.grad = torch.from_numpy(g.copy())
        if torch_side:
            for t, g in zip(ours_t, gs, strict=True):
                t.grad = torch.from_numpy(g.copy())
            ours.step()
        else:
            for view, g in zip(grads.views, gs, strict=True):
                view[...] = g
            ours.step(grads.buffer)
        theirs.step()
        sched.step()
    mine = ours_t if torch_side else fb.views
    flat = np.concatenate([np.asarray(m.detach() if torch_side else m, np.float64).ravel()
                           for m in mine])
    return flat, np.concatenate([t.detach().numpy().ravel() for t in theirs_t])


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@pytest.mark.parametrize("option", range(len(LAMB_OPTIONS)))
def test_lamb_equals_optax(option, kind):
    """The issue's oracle on the same tensor list: 200 steps within 1e-5 relative."""
    _need("LAMB")
    lr = 1e-2
    ours, theirs = _lamb_pair(option, SCHEDULES[kind](lr), lr, torch_side=False)
    assert _rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("option", range(len(LAMB_OPTIONS)))
def test_fastopt_torch_lamb_equals_optax(option):
    _need("LAMB")
    lr = 1e-2
    ours, theirs = _lamb_pair(option, SCHEDULES["warmup_cosine"](lr), lr, torch_side=True,
                              steps=100)
    assert _rel(ours, theirs) <= 1e-5
