"""Every optimizer in the registry, generically: the core class against the float64
reference (every option combination of its entry in tests/optimizer_cases.py, several
schedules, serial and parallel loops, float32 and 16-bit params), and against its torch twin
over 200 steps with the four schedules the criterion names."""

from __future__ import annotations

import inspect
import math

import ml_dtypes
import numpy as np
import pytest
from optimizer_cases import (
    CASES,
    all_options,
    full_hypers,
    initial_state,
    layout,
    make,
    random_grads,
    reference_run,
    rel_error,
    schedule_for,
    shapes_for,
)

import fastopt
from fastopt import schedules as S
from fastopt.algorithms import CLASSES, REGISTRY

SCHEDULES = {
    "constant": lambda lr: S.constant(lr),
    "step": lambda lr: S.step(lr, 30, 0.5),
    "warmup_cosine": lambda lr: S.warmup(S.cosine(lr, 150, end_lr=lr / 20), 20),
    "cyclic": lambda lr: S.cyclic(lr / 10, lr, 25),
}
OPTIONS = all_options()
IDS = [f"{cls}-{i}" for i, (_, cls, _) in enumerate(OPTIONS)]


_grads, _rel = random_grads, rel_error


@pytest.mark.parametrize("n", [257, 20_011])  # the serial and the parallel loop
@pytest.mark.parametrize("option", range(len(OPTIONS)), ids=IDS)
def test_core_class_matches_the_float64_reference(option, n):
    name, cls, hypers = OPTIONS[option]
    rng = np.random.default_rng(option)
    lr = 10 * CLASSES[cls][0].lr_default if name == "sgd" else CLASSES[cls][0].lr_default
    schedule = schedule_for(name, SCHEDULES[list(SCHEDULES)[option % 4]](lr))
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = _grads(rng, n, 40)
    p = p0.copy()
    opt = make(cls, p, lr=schedule, **hypers)
    for g in grads:
        opt.step(g)
    want_p, want_state = reference_run(cls, hypers, p0, grads, schedule)
    assert _rel(p, want_p) < 2e-5
    d = opt.state_dict()
    for key, value in want_state.items():
        if value is not None:
            assert _rel(d[key], value) < 2e-5, key
    assert set(opt.state) == {k for k, v in want_state.items()
                              if v is not None and k not in REGISTRY[name].scalar_names}


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_16bit_params_follow_the_float32_run_exactly(name, dtype):
    """The 16-bit run in the serial loop (made with one Numba thread), the float32 one in the
    parallel loop where this host has two threads: the same float32 values, bit for bit."""
    import numba

    cls, hypers = CASES[name].options[-1]
    rng = np.random.default_rng(3)
    n = 20_011
    p16 = rng.standard_normal(n).astype(dtype)
    p32 = p16.astype(np.float32)
    a = make(cls, p32, **hypers)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        b = make(cls, p16, **hypers)
    finally:
        numba.set_num_threads(threads)
    assert not b._parallel
    for g in _grads(rng, n, 10):
        a.step(g)
        b.step(g)
    np.testing.assert_array_equal(b.state["master_param"], p32)
    np.testing.assert_array_equal(p16.view(np.uint16), p32.astype(dtype).view(np.uint16))


# ----------------------------------------------------------------------------- torch twins

torch = pytest.importorskip("torch")


def _torch_schedule(kind, opt, lr, ours):
    sched = torch.optim.lr_scheduler
    if kind == "constant":
        return None
    if kind == "step":
        return sched.StepLR(opt, step_size=30, gamma=0.5)
    if kind == "warmup_cosine":  # torch applies the factor; fastopt evaluates it in-kernel
        return sched.LambdaLR(opt, lambda t: ours.at(t) / lr)
    return sched.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=25,
                          cycle_momentum=False)


#: (Muon's twin, a matrix-stage definition, is compared in tests/test_muon.py: on matrices,
#: and with the core's float32 Newton-Schulz set against torch's bfloat16 one)
TWINS = [(i, kind) for i, (name, cls, _) in enumerate(OPTIONS)
         if cls in REGISTRY[name].torch_twin and REGISTRY[name].matrix is None
         for kind in SCHEDULES if REGISTRY[name].schedulable or kind == "constant"]


@pytest.mark.parametrize("option,kind", TWINS,
                         ids=[f"{IDS[i]}-{kind}" for i, kind in TWINS])
def test_core_class_equals_its_torch_twin_over_200_steps(option, kind):
    """The issue's criterion: max|a - b| / max|b| <= 1e-5 against torch's for-loop path."""
    name, cls, hypers = OPTIONS[option]
    rng = np.random.default_rng(100 + option)
    lr = 0.01 if name != "adadelta" else 1.0
    ours = SCHEDULES[kind](lr)
    p0 = rng.standard_normal(301).astype(np.float32)
    p = p0.copy()
    opt = make(cls, p, lr=ours, **hypers)
    # (a tensor-aware optimizer: torch's over the same tensors as fastopt's segment table)
    shapes = shapes_for(name, 301) if REGISTRY[name].segmented else [(301,)]
    bounds = np.cumsum([0, *(math.prod(s) for s in shapes)])
    ts = [torch.tensor(p0[a:b].reshape(s), requires_grad=True)
          for a, b, s in zip(bounds[:-1], bounds[1:], shapes, strict=True)]
    twin_cls = getattr(torch.optim, REGISTRY[name].torch_twin[cls].name)
    twin = twin_cls(ts, lr=lr, foreach=False, **hypers)
    sched = _torch_schedule(kind, twin, lr, ours)
    for g in _grads(rng, 301, 200):
        opt.step(g)
        for t, a, b in zip(ts, bounds[:-1], bounds[1:], strict=True):
            t.grad = torch.from_numpy(g[a:b].reshape(t.shape).copy())
        twin.step()
        if sched is not None:
            sched.step()
    assert _rel(p, np.concatenate([t.detach().numpy().ravel() for t in ts])) <= 1e-5
    assert full_hypers(cls, hypers)  # the options are valid for the class


@pytest.mark.parametrize("option,kind", [(i, k) for i, k in TWINS
                                         if k in ("constant", "warmup_cosine")],
                         ids=[f"{IDS[i]}-{k}" for i, k in TWINS
                              if k in ("constant", "warmup_cosine")])
def test_torch_layer_equals_its_twin(option, kind):
    """fastopt.torch.<Name> (param groups of two tensors, in-kernel schedule) against torch's
    for-loop twin stepped by a torch scheduler: the same criterion over 200 steps."""
    import fastopt.torch as fot

    name, cls, hypers = OPTIONS[option]
    lr = 0.01 if name != "adadelta" else 1.0
    ours_sched = SCHEDULES[kind](lr)
    torch.manual_seed(option)
    shapes = [(7, 5), (5,)]
    init = [torch.randn(s) for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ours = getattr(fot, cls)(a, lr=ours_sched, **hypers)
    twin = getattr(torch.optim, REGISTRY[name].torch_twin[cls].name)(b, lr=lr, foreach=False,
                                                                      **hypers)
    sched = _torch_schedule(kind, twin, lr, ours_sched)
    for _ in range(200):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        twin.step()
        if sched is not None:
            sched.step()
    for p, q in zip(a, b, strict=True):
        assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-5


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_state_dicts_cross_between_torch_and_fastopt(nesterov):
    """torch's SGD keeps no step: its state dict resumes fastopt's schedule at step 0, and a
    fastopt dict (with its own 'step') loads into torch, which ignores it."""
    import fastopt.torch as fot

    torch.manual_seed(0)
    init = torch.randn(40)
    grads = [torch.randn(40) for _ in range(12)]
    hypers = dict(momentum=0.9, nesterov=nesterov, weight_decay=0.01)

    def run(opt, param, gs):
        for g in gs:
            param.grad = g.clone()
            opt.step()

    p_t = torch.nn.Parameter(init.clone())
    t = torch.optim.SGD([p_t], lr=0.05, foreach=False, **hypers)
    run(t, p_t, grads[:6])
    p_f = torch.nn.Parameter(p_t.detach().clone())
    f = fot.SGD([p_f], lr=0.05, **hypers)
    f.load_state_dict(t.state_dict())  # the momentum buffer crosses over, no step in it
    run(t, p_t, grads[6:])
    run(f, p_f, grads[6:])
    assert _rel(p_f.detach().numpy(), p_t.detach().numpy()) <= 1e-6
    back = torch.nn.Parameter(p_f.detach().clone())
    t2 = torch.optim.SGD([back], lr=0.05, foreach=False, **hypers)
    t2.load_state_dict(f.state_dict())
    run(t2, back, grads[:3])
    run(f, p_f, grads[:3])
    assert _rel(back.detach().numpy(), p_f.detach().numpy()) <= 1e-6
    assert "momentum_buffer" in f.state_dict()["state"][0]


def test_sgd_without_momentum_keeps_no_state_and_first_step_sets_the_buffer():
    p = np.ones(64, np.float32)
    opt = fastopt.SGD(p, lr=0.1)
    assert opt.state == {}
    opt.step(np.full(64, 2.0, np.float32))
    np.testing.assert_array_equal(p, np.float32(1 - 0.1 * 2))
    q = np.ones(64, np.float32)
    mom = fastopt.SGD(q, lr=0.1, momentum=0.9, dampening=0.5)
    mom.step(np.full(64, 2.0, np.float32))  # buffer = g (no dampening on the first step)
    np.testing.assert_array_equal(mom.state["momentum_buffer"], np.float32(2.0))
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero "
                                         "dampening"):
        fastopt.SGD(q, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Invalid momentum value"):
        fastopt.SGD(q, momentum=-0.1)


# ----------------------------------------------------------------------------- features


def _last(name):
    return CASES[name].options[-1]  # the entry's last option uses every state buffer


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_checkpoint_and_state_dict_resume_bit_identically(name, state_dtype, tmp_path):
    if state_dtype == "bfloat16" and REGISTRY[name].factored is not None:
        pytest.skip("factored state (Adafactor) is float32 only (tests/test_adafactor.py)")
    cls, hypers = _last(name)
    rng = np.random.default_rng(11)
    grads = _grads(rng, 2000, 12)
    schedule = schedule_for(name, SCHEDULES["warmup_cosine"](0.01))
    p = rng.standard_normal(2000).astype(np.float32)
    straight = p.copy()
    a = make(cls, straight, lr=schedule, state_dtype=state_dtype, **hypers)
    for g in grads:
        a.step(g)
    b = make(cls, p, lr=schedule, state_dtype=state_dtype, **hypers)
    for g in grads[:5]:
        b.step(g)
    fastopt.save(b, tmp_path / "c.npz")
    d = b.state_dict()
    q = np.zeros_like(p)
    c = fastopt.load(tmp_path / "c.npz", q, optimizer=cls)
    e = make(cls, p.copy(), lr=0.5, state_dtype=state_dtype, **hypers)
    e.load_state_dict(d)
    pe = e.params
    pe[...] = p
    for g in grads[5:]:
        c.step(g)
        e.step(g)
    np.testing.assert_array_equal(q, straight)
    np.testing.assert_array_equal(pe, straight)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_scaling_skipping_and_clipping(name):
    cls, hypers = _last(name)
    rng = np.random.default_rng(12)
    p0 = rng.standard_normal(3000).astype(np.float32)
    grads = _grads(rng, 3000, 6)
    plain, scaled, clipped, manual = (p0.copy() for _ in range(4))
    a = make(cls, plain, **hypers)
    b = make(cls, scaled, **hypers)
    c = make(cls, clipped, **hypers)
    m = make(cls, manual, **hypers)
    for g in grads:
        a.step(g)
        assert b.step(g * np.float32(1024), grad_scale=1024)  # exact powers of two
        c.step(g, max_grad_norm=1.0)
        norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        m.step((g * min(1.0, 1.0 / (norm + 1e-6))).astype(np.float32))
    np.testing.assert_array_equal(scaled, plain)
    assert _rel(clipped, manual) < 1e-6
    before = {k: v.copy() for k, v in b.state.items()}
    bad = grads[0].copy()
    bad[7] = np.inf
    assert not b.step(bad, skip_if_nonfinite=True)
    np.testing.assert_array_equal(scaled, plain)
    for k, v in b.state.items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_functional_equals_the_class(name):
    """fastopt.functional.<name> on buffers the caller owns, step by step."""
    cls, hypers = _last(name)
    d = REGISTRY[name]
    rng = np.random.default_rng(13)
    p0 = rng.standard_normal(500).astype(np.float32)
    schedule = schedule_for(name, SCHEDULES["cyclic"](0.01))
    mine = p0.copy()
    opt = make(cls, mine, lr=schedule, **hypers)
    theirs = p0.copy()
    full = full_hypers(cls, hypers)
    start = initial_state(d, full, p0, schedule)
    state = {k: np.zeros(500, np.float32) if start[k] is None else start[k].astype(np.float32)
             for k in d.active_state(full)}  # (SGD's momentum_buffer: set by the kernel)
    state.update({s.name: np.full(1, s.init) for s in d.scalars})  # one-element float64
    fn = getattr(fastopt.functional, cls.lower())
    # the class's hyperparameters that reach the kernel (the state's initial value is the
    # caller's business here)
    kernel_hypers = {k: v for k, v in hypers.items()
                     if k in inspect.signature(fn).parameters}
    for k, g in enumerate(_grads(rng, 500, 8), start=1):
        opt.step(g)
        lr = fn(theirs, g, **state, step=k, schedule=schedule, **kernel_hypers,
                **layout(name, 500))
        assert lr == opt.last_lr
    np.testing.assert_array_equal(theirs, mine)
    for key, value in state.items():
        if key in d.scalar_names:
            assert value[0] == opt.state_dict()[key]
        else:
            np.testing.assert_array_equal(value, opt.state[key])


def test_former_spellings_still_work_with_a_deprecation_warning():
    rng = np.random.default_rng(14)
    p = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal(64).astype(np.float32)
    a, b = p.copy(), p.copy()
    s1, s2 = np.zeros(64, np.float32), np.zeros(64, np.float32)
    fastopt.functional.adagrad(a, g, s1, step=1)
    with pytest.warns(DeprecationWarning, match="state_sum"):
        fastopt.functional.adagrad(b, g, state_sum=s2, step=1)
    np.testing.assert_array_equal(a, b)
    h16 = p.astype(np.float16)
    master = p.copy()
    m, v = np.zeros(64, np.float32), np.zeros(64, np.float32)
    with pytest.warns(DeprecationWarning, match="master"):
        fastopt.functional.adam(h16, g.astype(np.float16), m, v, step=1, master=master)
    opt = fastopt.AdamW(p.astype(np.float16))
    with pytest.warns(DeprecationWarning, match="master_param"):
        assert opt.state["master_params"] is opt.state["master_param"]
    d = opt.state_dict()
    d["master_params"] = d.pop("master_param")  # a dict saved before the rename
    with pytest.warns(DeprecationWarning, match="master_params"):
        opt.load_state_dict(d)


# ----------------------------------------------------------------------------- review findings


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_torch_sgd_momentum_turned_on_later_like_torch(dampening):
    import fastopt.torch as fot

    torch.manual_seed(0)
    init = torch.randn(6)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = fot.SGD([p], lr=0.1, momentum=0.0, dampening=dampening)
    twin = torch.optim.SGD([q], lr=0.1, momentum=0.0, dampening=dampening, foreach=False)
    for k in range(5):
        g = torch.randn(6)
        p.grad, q.grad = g.clone(), g.clone()
        if k == 2:  # the buffer starts as the next gradient, in torch and here
            ours.param_groups[0]["momentum"] = twin.param_groups[0]["momentum"] = 0.9
        ours.step()
        twin.step()
    assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-6
    assert "momentum_buffer" in ours.state_dict()["state"][0]


def test_torch_sgd_loads_a_none_momentum_buffer_like_torch():
    import fastopt.torch as fot

    torch.manual_seed(1)
    p0 = torch.randn(5)
    saved = {"state": {0: {"momentum_buffer": None}},
             "param_groups": [dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                                   nesterov=False, maximize=False, foreach=None,
                                   differentiable=False, fused=None, params=[0])]}
    p, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours, twin = fot.SGD([p], lr=0.5, momentum=0.9), torch.optim.SGD([q], lr=0.5, momentum=0.9)
    ours.load_state_dict(saved)
    twin.load_state_dict(saved)
    for _ in range(3):
        g = torch.randn(5)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        twin.step()
    assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-6


def test_hyperparameters_changed_every_step_keep_one_prepared_call_per_bucket():
    import fastopt.torch as fot

    p = torch.nn.Parameter(torch.randn(10))
    opt = fot.Adam([p], lr=1e-3)
    for k in range(20):
        opt.param_groups[0]["betas"] = (0.9 - 0.01 * k, 0.999)  # a OneCycle-like scheduler
        p.grad = torch.randn(10)
        opt.step()
    assert sum(len(b.prepared) for buckets in opt._buckets for b in buckets) == 1


def test_adamw_is_an_adam_as_in_torch():
    import fastopt.torch as fot

    assert issubclass(fastopt.AdamW, fastopt.Adam) and issubclass(fot.AdamW, fot.Adam)
    assert issubclass(torch.optim.AdamW, torch.optim.Adam)


def test_the_master_s_former_name_reads_and_loads_with_a_warning():
    opt = fastopt.AdamW(np.ones(16, np.float16))
    with pytest.warns(DeprecationWarning):
        assert opt.state.get("master_params") is opt.state["master_param"]
    d = opt.state_dict()
    old = dict(d)
    old["master_params"] = old.pop("master_param")
    with pytest.warns(DeprecationWarning, match="master_params"):
        opt.load_state_dict(old)
    both = dict(d, master_params=d["master_param"])
    with pytest.raises(ValueError, match="both"):
        opt.load_state_dict(both)


TWIN_CLASSES = sorted({cls for name, cls, _ in OPTIONS if cls in REGISTRY[name].torch_twin})


@pytest.mark.parametrize("cls", TWIN_CLASSES)
def test_state_dicts_cross_between_torch_and_fastopt_torch(cls):
    """A torch twin's state dict, taken mid-training, loads into fastopt.torch.<cls> and the
    two go on equal; fastopt's dict loads back into torch likewise (the entry's last option
    of this class, two tensors, 3 + 4 + 4 steps)."""
    import fastopt.torch as fot

    d, _ = CLASSES[cls]
    hypers = [h for name, c, h in OPTIONS if c == cls][-1]
    lr = 1.0 if d.name == "adadelta" else 0.01
    twin_cls = getattr(torch.optim, d.torch_twin[cls].name)
    torch.manual_seed(7)
    shapes = [(6, 4), (3, 5) if d.matrix is not None else (4,)]  # (Muon: matrices only)
    grads = [[torch.randn(s) for s in shapes] for _ in range(11)]

    def run(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    def clone(params):
        return [torch.nn.Parameter(p.detach().clone()) for p in params]

    if "foreach" in inspect.signature(twin_cls).parameters:  # (its for-loop path; Muon
        hypers = {**hypers, "foreach": False}  # has no other)
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twin = twin_cls(a, lr=lr, **hypers)
    run(twin, a, grads[:3])
    b = clone(a)
    ours = getattr(fot, cls)(b, lr=lr, **{k: v for k, v in hypers.items() if k != "foreach"})
    ours.load_state_dict(twin.state_dict())
    run(twin, a, grads[3:7])
    run(ours, b, grads[3:7])
    for p, q in zip(b, a, strict=True):
        assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-5
    c = clone(b)
    back = twin_cls(c, lr=lr, **hypers)
    back.load_state_dict(ours.state_dict())
    run(back, c, grads[7:])
    run(ours, b, grads[7:])
    for p, q in zip(b, c, strict=True):
        assert _rel(p.detach().numpy(), q.detach().numpy()) <= 1e-5
