"""Bad inputs and documented behaviours of the optimizers added for breadth (RAdam, Rprop,
ASGD, Lion, AdEMAMix, AdamWScheduleFree): clear errors that change nothing, and what the
docstrings promise (Rprop's constant lr, ASGD's one-step-late lr, Schedule-Free's modes in
checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import functional as F
from fastopt import schedules as S

torch = pytest.importorskip("torch")
import fastopt.torch as fot  # noqa: E402

BAD = [
    ("RAdam", {"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
    ("RAdam", {"eps": -1.0}, "Invalid epsilon value"),
    ("Rprop", {"etas": (1.2, 0.5)}, "Invalid eta values"),
    ("Rprop", {"etas": 0.5}, "etas must be a pair"),
    ("Rprop", {"step_sizes": (1.0, 0.1)}, "Invalid step sizes"),
    ("Rprop", {"step_sizes": (-1.0, 0.1)}, "Invalid step size"),
    ("ASGD", {"weight_decay": -0.1}, "Invalid weight_decay value"),
    ("ASGD", {"lambd": float("nan")}, "Invalid lambd value"),
    ("Lion", {"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1"),
    ("Lion", {"weight_decay": -1.0}, "Invalid weight_decay value"),
    ("AdEMAMix", {"betas": (0.9, 0.999)}, "betas must be a triple"),
    ("AdEMAMix", {"betas": (0.9, 0.999, 1.0)}, "Invalid beta parameter at index 2"),
    ("AdEMAMix", {"t_alpha_beta3": 0}, "Invalid t_alpha_beta3 value"),
    ("AdEMAMix", {"t_alpha_beta3": -5}, "Invalid t_alpha_beta3 value"),
    ("AdEMAMix", {"betas": (0.0, 0.999, 0.9999), "t_alpha_beta3": 10}, "needs beta1 > 0"),
    ("AdEMAMix", {"alpha": -1.0}, "Invalid alpha value"),
    ("AdamWScheduleFree", {"betas": (0.0, 0.999)}, "eval\\(\\) divides by beta1"),
    ("AdamWScheduleFree", {"warmup_steps": 2.5}, "Invalid warmup_steps value"),
    ("AdamWScheduleFree", {"warmup_steps": -1}, "Invalid warmup_steps value"),
    ("AdamWScheduleFree", {"weight_lr_power": float("inf")}, "Invalid weight_lr_power"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c}-{i}" for i, (c, *_) in
                                                          enumerate(BAD)])
def test_bad_hyperparameters_raise_in_every_layer(cls, kwargs, message):
    p = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match=message):
        getattr(fastopt, cls)(p, **kwargs)
    with pytest.raises(ValueError, match=message):
        getattr(fot, cls)([torch.nn.Parameter(torch.zeros(8))], **kwargs)
    assert not p.any()


def test_rprop_refuses_a_schedule_everywhere():
    """torch's Rprop reads lr only to start step_size: a schedule would change nothing."""
    sched = S.cosine(0.01, 100)
    p = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="Rprop takes a constant lr"):
        fastopt.Rprop(p, lr=sched)
    with pytest.raises(ValueError, match="Rprop takes a constant lr"):
        F.rprop(p, np.ones(8, np.float32), np.zeros(8, np.float32), np.full(8, 0.01, np.float32),
                step=1, schedule=sched)
    with pytest.raises(ValueError, match="Rprop takes a constant lr"):
        fot.Rprop([torch.nn.Parameter(torch.zeros(8))], lr=sched)
    assert not p.any()
    fastopt.Rprop(p, lr=S.constant(0.01))  # a constant schedule is a plain lr


def test_rprop_ignores_later_lr_changes_like_torch():
    """A torch scheduler changing group['lr'] changes nothing in torch's Rprop, nor here."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = fot.Rprop([a], lr=0.01), torch.optim.Rprop([b], lr=0.01, foreach=False)
    s1 = torch.optim.lr_scheduler.StepLR(ours, 3, 0.1)
    s2 = torch.optim.lr_scheduler.StepLR(theirs, 3, 0.1)
    for _ in range(20):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        s1.step()
        s2.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_asgd_applies_a_changed_lr_one_step_late():
    """torch computes eta at the end of step k from that step's lr and uses it at step k+1;
    so does fastopt: a jump of the lr at step 6 first moves the params at step 7."""
    sched = S.multistep(0.01, [5], gamma=10.0)  # step k uses at(k - 1): 0.1 from step 6
    p, q = np.ones(4, np.float32), np.ones(4, np.float32)
    a = fastopt.ASGD(p, lr=sched, lambd=0.0)
    b = fastopt.ASGD(q, lr=0.01, lambd=0.0)
    g = np.ones(4, np.float32)
    for k in range(1, 8):
        before_a, before_b = p.copy(), q.copy()
        a.step(g)
        b.step(g)
        moved_a, moved_b = before_a - p, before_b - q
        if k <= 6:
            np.testing.assert_allclose(moved_a, moved_b, rtol=1e-6)
        else:
            assert moved_a[0] > 5 * moved_b[0]


def test_schedulefree_checkpoint_keeps_the_mode(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(100).astype(np.float32)
    opt = fastopt.AdamWScheduleFree(p, lr=0.01)
    opt.train()
    for _ in range(3):
        opt.step(rng.standard_normal(100).astype(np.float32))
    for mode in (True, False):
        if not mode:
            opt.eval()
        fastopt.save(opt, tmp_path / "sf.npz")
        q = np.zeros_like(p)
        loaded = fastopt.load(tmp_path / "sf.npz", q)
        assert loaded.train_mode is mode and np.array_equal(q, p)
        loaded.eval()  # back to x: equal whichever mode it was saved in
        opt.eval()
        np.testing.assert_array_equal(q, p)
        if mode:
            opt.train()
    with pytest.raises(ValueError, match="train_mode"):
        fastopt.AdamWScheduleFree(p).load_state_dict({**opt.state_dict(), "train_mode": 1})


def test_schedulefree_16bit_params_switch_through_the_master():
    """bf16 params: eval() and train() move the float32 master and round it into the params,
    so a switch there and back returns the master to within float32 rounding."""
    import ml_dtypes

    rng = np.random.default_rng(1)
    p16 = rng.standard_normal(64).astype(ml_dtypes.bfloat16)
    opt = fastopt.AdamWScheduleFree(p16, lr=0.01)
    opt.train()
    for _ in range(4):
        opt.step(rng.standard_normal(64).astype(np.float32))
    master = opt.state["master_param"].copy()
    opt.eval()
    np.testing.assert_array_equal(p16.view(np.uint16),
                                  opt.state["master_param"].astype(ml_dtypes.bfloat16)
                                  .view(np.uint16))
    opt.train()
    np.testing.assert_allclose(opt.state["master_param"], master, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- review findings


def test_first_step_state_starts_at_the_first_step_in_the_core_classes():
    """Schedule-Free's z and Rprop's step_size start at the first step, as in torch and
    schedulefree: params written, or the lr changed, after construction count."""
    rng = np.random.default_rng(2)
    x, new = (rng.standard_normal(50).astype(np.float32) for _ in range(2))
    opt = fastopt.AdamWScheduleFree(x, lr=1e-2)
    x[...] = new
    opt.train()  # no z yet: the params stay
    np.testing.assert_array_equal(x, new)
    g = rng.standard_normal(50).astype(np.float32)
    opt.step(g)
    fresh = new.copy()
    ref = fastopt.AdamWScheduleFree(fresh, lr=1e-2)
    ref.train()
    ref.step(g)
    np.testing.assert_array_equal(x, fresh)
    r = fastopt.Rprop(np.zeros(4, np.float32), lr=0.01)
    r.lr_scale = 0.5
    r.step(np.ones(4, np.float32))
    np.testing.assert_allclose(r.state["step_size"], 0.005)


def test_torch_single_param_groups_step_for_every_optimizer():
    """A bucket of one param (per-step scalars copied within it) steps like the core class."""
    from fastopt.algorithms import CLASSES

    for cls in CLASSES:
        shape = (2, 3) if CLASSES[cls][0].matrix is not None else (6,)  # (Muon: a matrix)
        p = torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(shape))
        opt = getattr(fot, cls)([p])
        core = np.linspace(-1, 1, 6).astype(np.float32)
        layout = {"segments": [shape]} if CLASSES[cls][0].segmented else {}  # (one tensor)
        ref = getattr(fastopt, cls)(core, **layout)
        for o in (opt, ref):
            if hasattr(o, "train"):
                o.train()
        for k in range(3):
            g = np.full(6, 0.5 + k, np.float32)
            p.grad = torch.from_numpy(g.copy()).reshape(shape)
            opt.step()
            ref.step(g)
        # (Muon: torch's bf16 Newton-Schulz against the core's float32 one; the params move
        # by about 1e-3 here, and the two agree to 1e-4 of that)
        rtol = 5e-4 if CLASSES[cls][0].matrix is not None else 1e-6
        np.testing.assert_allclose(p.detach().numpy().ravel(), core, rtol=rtol, err_msg=cls)
        assert not np.allclose(core, np.linspace(-1, 1, 6), rtol=1e-4), cls  # (they moved)


def test_schedulefree_group_values_follow_the_params_that_step():
    """A first param without gradients does not hide the group's weight_sum and lr_max: a
    state dict taken then resumes exactly."""
    torch.manual_seed(0)
    init = [torch.randn(5) for _ in range(3)]

    def run(opt, ps, steps):
        for g in steps:
            for p, x in zip(ps[1:], g, strict=True):
                p.grad = x.clone()
            opt.step()

    grads = [[torch.randn(5) for _ in range(2)] for _ in range(30)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    straight = fot.AdamWScheduleFree(a, lr=1e-2)
    straight.train()
    run(straight, a, grads)
    b = [torch.nn.Parameter(t.clone()) for t in init]
    first = fot.AdamWScheduleFree(b, lr=1e-2)
    first.train()
    run(first, b, grads[:20])
    sd = first.state_dict()
    assert sd["param_groups"][0]["weight_sum"] > 0 and sd["param_groups"][0]["k"] == 20
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    second = fot.AdamWScheduleFree(c, lr=1e-2)
    second.load_state_dict(sd)
    run(second, c, grads[20:])
    for p, q in zip(c, a, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_torch_load_state_dict_of_a_bad_dict_changes_nothing():
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    opt = fot.RAdam(ps, lr=1e-2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(5)
        opt.step()
    before = opt.state_dict()
    wrong_shape = {**before, "state": {0: {**before["state"][0], "exp_avg": torch.zeros(7)},
                                       1: before["state"][1]}}
    bad_beta = {**before, "param_groups": [{**before["param_groups"][0],
                                            "betas": (1.5, 0.9)}]}
    with pytest.raises(RuntimeError):
        opt.load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0"):
        opt.load_state_dict(bad_beta)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(after["state"][k][key], v, rtol=0, atol=0)
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    assert float(opt.state_dict()["state"][0]["step"]) == 4


def test_schedulefree_state_dict_of_fastopt_steps_in_schedulefree():
    schedulefree = pytest.importorskip("schedulefree")
    p = [torch.nn.Parameter(torch.randn(4))]
    ours = fot.AdamWScheduleFree(p, lr=1e-2)
    ours.train()
    p[0].grad = torch.randn(4)
    ours.step()
    q = [torch.nn.Parameter(p[0].detach().clone())]
    theirs = schedulefree.AdamWScheduleFree(q, lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    q[0].grad = torch.ones(4)
    p[0].grad = torch.ones(4)
    theirs.step()
    ours.step()
    torch.testing.assert_close(q[0], p[0], rtol=1e-6, atol=1e-7)


def test_smaller_validation_findings():
    p = np.zeros(4, np.float32)
    for cls in ("Lion", "AdEMAMix", "RAdam", "AdamWScheduleFree"):
        with pytest.raises(ValueError, match="Invalid weight_decay value: inf"):
            getattr(fastopt, cls)(p, weight_decay=float("inf"))
    with pytest.raises(ValueError, match="Invalid alpha value: inf"):
        fastopt.AdEMAMix(p, alpha=float("inf"))
    fastopt.AdamWScheduleFree(p, warmup_steps=np.int64(3))  # any integer type
    with pytest.raises(ValueError, match="Invalid t0 value: inf"):
        fastopt.ASGD(p, t0=float("inf"))
    eta = np.zeros(1)
    with pytest.raises(ValueError, match="mu"):  # the same array for both scalars
        F.asgd(p, np.ones(4, np.float32), np.zeros(4, np.float32), eta, eta, step=1)
    with pytest.raises(ValueError, match="per-step scalar"):
        F.asgd(p, np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(2), np.ones(1),
               step=1)
    q = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(AssertionError, match="params, mus, etas, and state_steps"):
        opt = fot.ASGD([q], capturable=True)
        q.grad = torch.ones(3)
        opt.step()


def test_asgd_takes_negative_t0_and_lambd_like_torch():
    a = torch.nn.Parameter(torch.linspace(-1, 1, 8))
    b = torch.nn.Parameter(a.detach().clone())
    ours = fot.ASGD([a], lr=0.05, t0=-3, lambd=-1e-3, alpha=-0.5)
    theirs = torch.optim.ASGD([b], lr=0.05, t0=-3, lambd=-1e-3, alpha=-0.5, foreach=False)
    for k in range(10):
        g = torch.sin(torch.arange(8.0) + k)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.state[a]["ax"], theirs.state[b]["ax"], rtol=1e-5,
                               atol=1e-6)
