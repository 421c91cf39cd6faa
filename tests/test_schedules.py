"""Every schedule's .at against torch.optim.lr_scheduler, the kernel's lr, and bad parameters."""

import math

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

import fastopt
from fastopt import schedules as S


def torch_lrs(base_lr, make_scheduler, steps):
    """The lr torch's scheduler gives the optimizer for steps 0..steps-1 (opt.step(); s.step())."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = make_scheduler(opt)
    lrs = []
    for step in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if step < steps - 1:  # (OneCycleLR with pct_start=1 divides by zero after the last)
            sched.step()
    return np.array(lrs, dtype=np.float64)


CASES = {
    "constant": (S.constant(0.05), 0.05, lambda o: L.LambdaLR(o, lambda t: 1.0), 500),
    "linear": (S.linear(0.1, 700, end_lr=0.02), 0.1,
               lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=700), 2000),
    "linear_lr": (S.linear_lr(0.3, start_factor=0.25, end_factor=0.9, total_iters=333), 0.3,
                  lambda o: L.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=333),
                  1500),
    "linear_lr_defaults": (S.linear_lr(0.3), 0.3, lambda o: L.LinearLR(o), 50),
    "polynomial": (S.polynomial(0.1, 1000, power=2.0), 0.1,
                   lambda o: L.PolynomialLR(o, total_iters=1000, power=2.0), 3000),
    "polynomial_sqrt": (S.polynomial(0.1, 1000, power=0.5), 0.1,
                        lambda o: L.PolynomialLR(o, total_iters=1000, power=0.5), 1500),
    "exponential": (S.exponential(0.1, 0.999), 0.1, lambda o: L.ExponentialLR(o, 0.999), 3000),
    "exponential_stair": (S.exponential(0.1, 0.5, decay_steps=300, staircase=True), 0.1,
                          lambda o: L.LambdaLR(o, lambda t: 0.5 ** (t // 300)), 3000),
    "exponential_smooth": (S.exponential(0.1, 0.5, decay_steps=300), 0.1,
                           lambda o: L.LambdaLR(o, lambda t: 0.5 ** (t / 300)), 3000),
    "step": (S.step(0.1, 250, gamma=0.3), 0.1, lambda o: L.StepLR(o, 250, gamma=0.3), 3000),
    "multistep": (S.multistep(0.1, [100, 1000, 1000, 2500], gamma=0.5), 0.1,
                  lambda o: L.MultiStepLR(o, [100, 1000, 1000, 2500], gamma=0.5), 3000),
    # gamma 0, which torch takes: the lr drops to 0 and stays there
    "step_gamma0": (S.step(0.1, 5, gamma=0.0), 0.1, lambda o: L.StepLR(o, 5, gamma=0.0), 20),
    "multistep_gamma0": (S.multistep(0.1, [3, 8], gamma=0.0), 0.1,
                         lambda o: L.MultiStepLR(o, [3, 8], gamma=0.0), 20),
    "inverse_time": (S.inverse_time(0.1, 100, 0.5), 0.1,
                     lambda o: L.LambdaLR(o, lambda t: 1 / (1 + 0.5 * t / 100)), 3000),
    "inverse_time_stair": (S.inverse_time(0.1, 100, 0.5, staircase=True), 0.1,
                           lambda o: L.LambdaLR(o, lambda t: 1 / (1 + 0.5 * (t // 100))), 3000),
    "ladder": (S.ladder(0.1, 0.015, 400, min_lr=0.01), 0.1,
               lambda o: L.LambdaLR(o, lambda t: max(0.01, 0.1 - 0.015 * (t // 400)) / 0.1),
               4000),
    "cosine": (S.cosine(0.1, 2000, end_lr=0.001), 0.1,
               lambda o: L.CosineAnnealingLR(o, T_max=2000, eta_min=0.001), 2001),
    "cosine_restarts": (S.cosine_restarts(0.1, 50, end_lr=0.002), 0.1,
                        lambda o: L.CosineAnnealingWarmRestarts(o, 50, eta_min=0.002), 3000),
    "cosine_restarts_mult": (S.cosine_restarts(0.1, 7, period_mult=2, end_lr=0.002), 0.1,
                             lambda o: L.CosineAnnealingWarmRestarts(o, 7, 2, 0.002), 5000),
    "cosine_restarts_mult3": (S.cosine_restarts(0.1, 1, period_mult=3), 0.1,
                              lambda o: L.CosineAnnealingWarmRestarts(o, 1, 3), 5000),
    "cyclic": (S.cyclic(0.001, 0.1, 200), 0.001,
               lambda o: L.CyclicLR(o, 0.001, 0.1, 200, cycle_momentum=False), 3000),
    "cyclic2": (S.cyclic(0.001, 0.1, 150, 350, mode="triangular2"), 0.001,
                lambda o: L.CyclicLR(o, 0.001, 0.1, 150, 350, mode="triangular2",
                                     cycle_momentum=False), 3000),
    "cyclic_exp": (S.cyclic(0.001, 0.1, 100, mode="exp_range", gamma=0.999), 0.001,
                   lambda o: L.CyclicLR(o, 0.001, 0.1, 100, mode="exp_range", gamma=0.999,
                                        cycle_momentum=False), 3000),
    "one_cycle": (S.one_cycle(0.1, 1000), 0.1,
                  lambda o: L.OneCycleLR(o, 0.1, total_steps=1000, cycle_momentum=False), 1000),
    "one_cycle_linear3": (
        S.one_cycle(0.1, 997, pct_start=0.25, anneal="linear", three_phase=True,
                    div_factor=10, final_div_factor=100), 0.1,
        lambda o: L.OneCycleLR(o, 0.1, total_steps=997, pct_start=0.25, anneal_strategy="linear",
                               three_phase=True, div_factor=10, final_div_factor=100,
                               cycle_momentum=False), 997),
    "one_cycle_tiny_first_phase": (
        S.one_cycle(0.1, 10, pct_start=0.05), 0.1,
        lambda o: L.OneCycleLR(o, 0.1, total_steps=10, pct_start=0.05, cycle_momentum=False),
        10),
    "one_cycle_three_phase_late": (  # pct_start > 0.5: torch never reaches the third phase
        S.one_cycle(0.1, 300, pct_start=0.8, three_phase=True), 0.1,
        lambda o: L.OneCycleLR(o, 0.1, total_steps=300, pct_start=0.8, three_phase=True,
                               cycle_momentum=False), 300),
    "join": (S.join([S.exponential(0.1, 0.99), S.cosine(0.1, 500), S.constant(0.01)],
                    [300, 700]), 0.1,
             lambda o: L.SequentialLR(o, [L.ExponentialLR(o, 0.99),
                                          L.CosineAnnealingLR(o, 500),
                                          L.LambdaLR(o, lambda t: 0.1)], milestones=[300, 700]),
             1500),
    "warmup_cosine": (S.warmup(S.cosine(0.1, 1000, end_lr=0.0), 100, start_lr=0.001), 0.1,
                      lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.01, 1.0, 100),
                                                   L.CosineAnnealingLR(o, 1000)], [100]), 1101),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_at_matches_torch(name):
    schedule, base_lr, make, steps = CASES[name]
    expected = torch_lrs(base_lr, make, steps)
    got = schedule.at(np.arange(steps))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_uses_at(name):
    """The lr each optimizer's kernel reports using at step k equals schedule.at(k - 1)."""
    schedule, _, _, steps = CASES[name]
    steps = min(steps, 1200)
    rng = np.random.default_rng(0)
    g = rng.standard_normal(37).astype(np.float32)
    expected = schedule.at(np.arange(steps))
    for cls in (fastopt.Adam, fastopt.AdamW, fastopt.Adagrad, fastopt.Adadelta):
        opt = cls(rng.standard_normal(37).astype(np.float32), lr=schedule)
        used = []
        for _ in range(steps):
            opt.step(g)
            used.append(opt.last_lr)
        np.testing.assert_allclose(used, expected, rtol=1e-12, atol=1e-18, err_msg=cls.__name__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_host_lr_equals_at(name):
    """host_lr (the kernels' scalar evaluator called from Python, for per-step bookkeeping such
    as fastopt.torch's group['lr']) equals the numpy reference at every step."""
    from fastopt.schedules import host_lr

    schedule, _, _, steps = CASES[name]
    got = [host_lr(schedule, k) for k in range(steps)]
    np.testing.assert_allclose(got, schedule.at(np.arange(steps)), rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_every_pct_start_matches_torch(anneal, three_phase):
    """Every pct_start torch takes gives torch's lrs over its total_steps steps, the large ones
    included (torch never reaches a phase that starts at or after the last step; fastopt used
    to refuse them), and holds the last step's lr after them."""
    for total in (2, 3, 10, 101):
        for pct in (0.0, 0.05, 0.3, 0.5, 0.51, 0.75, 0.9, 0.99, 1.0):
            if total == 2 and pct == 0.5:
                continue  # torch's constructor divides by zero (a first phase of 0 steps)
            expected = torch_lrs(0.1, lambda o, total=total, pct=pct: L.OneCycleLR(
                o, 0.1, total_steps=total, pct_start=pct, anneal_strategy=anneal,
                three_phase=three_phase, cycle_momentum=False), total)
            schedule = S.one_cycle(0.1, total, pct, anneal, three_phase=three_phase)
            got = schedule.at(np.arange(total + 5))
            np.testing.assert_allclose(got[:total], expected, rtol=1e-9, atol=1e-13,
                                       err_msg=f"total_steps={total}, pct_start={pct}")
            assert np.all(got[total:] == got[total - 1])


def test_at_scalar_and_shape():
    s = S.cosine(1.0, 10)
    assert isinstance(s.at(3), float)
    assert s.at(np.arange(6).reshape(2, 3)).shape == (2, 3)
    assert s.at(0) == 1.0 and s.at(10) == 0.0 and s.at(10_000) == 0.0  # clamps after T
    assert s(5) == s.at(5)


def test_at_huge_steps_stay_finite():
    big = np.array([2.0**31, 2.0**40, 2.0**52])
    for s in (S.cosine_restarts(0.1, 7, 2), S.cosine_restarts(0.1, 7), S.exponential(0.1, 0.9),
              S.cyclic(0.01, 0.1, 10, mode="triangular2"), S.inverse_time(0.1, 3, 0.1)):
        assert np.all(np.isfinite(s.at(big)))


def test_restarts_period_boundaries_exact():
    s = S.cosine_restarts(1.0, 3, period_mult=2)
    starts = [0, 3, 9, 21, 45, 93, 189, 381, 765]
    np.testing.assert_array_equal(s.at(np.array(starts, float)), np.ones(len(starts)))


def test_warmup_semantics():
    inner = S.exponential(0.2, 0.9)
    w = S.warmup(inner, 10, start_lr=0.05)
    assert math.isclose(w.at(0), 0.05, rel_tol=1e-15)
    np.testing.assert_allclose(w.at(5), 0.05 + (0.2 - 0.05) * 0.5)
    np.testing.assert_allclose(w.at(np.arange(10, 50)), inner.at(np.arange(40)))
    assert S.warmup(inner, 0) == inner


def test_join_of_joins_keeps_each_clock():
    inner = S.join([S.constant(1.0), S.linear(1.0, 10)], [5])
    outer = S.join([S.constant(3.0), inner, S.constant(7.0)], [4, 12])
    t = np.arange(20)
    expected = np.where(t < 4, 3.0, np.where(t >= 12, 7.0, inner.at(np.clip(t - 4, 0, None))))
    np.testing.assert_allclose(outer.at(t), expected)


def test_schedule_change_does_not_recompile():
    from fastopt.engine import cpu_kernel

    adam = cpu_kernel("adam", parallel=False)  # (50 elements: the serial loop)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(50).astype(np.float32)
    g = rng.standard_normal(50).astype(np.float32)
    fastopt.AdamW(p, lr=0.1).step(g)
    compiled = len(adam.signatures)
    for sched in (S.constant(0.1), S.cosine(0.1, 5), S.warmup(S.cyclic(0.01, 0.1, 3), 2),
                  S.one_cycle(0.1, 20, three_phase=True), S.multistep(0.1, [1, 2, 3])):
        opt = fastopt.AdamW(p, lr=sched)
        opt.step(g)
    assert len(adam.signatures) == compiled  # one specialisation per params dtype, no more


BAD = [
    (lambda: S.constant(-0.1), "lr"),
    (lambda: S.constant(float("nan")), "lr"),
    (lambda: S.linear(0.1, 0), "total_steps"),
    (lambda: S.linear(0.1, 10, end_lr=-1), "end_lr"),
    (lambda: S.polynomial(0.1, 10, power=-1), "power"),
    (lambda: S.exponential(0.1, 0.0), "decay_rate"),
    (lambda: S.exponential(0.1, 0.9, decay_steps=0), "decay_steps"),
    (lambda: S.inverse_time(0.1, 0, 0.5), "decay_steps"),
    (lambda: S.step(0.1, 0), "step_size"),
    (lambda: S.multistep(0.1, [3, -1]), "milestones"),
    (lambda: S.ladder(0.1, 0.01, 0), "every"),
    (lambda: S.cosine(0.1, 0), "total_steps"),
    (lambda: S.cosine_restarts(0.1, 0), "first_period"),
    (lambda: S.cosine_restarts(0.1, 5, period_mult=0), "period_mult"),
    (lambda: S.cyclic(0.1, 0.2, 0), "step_size_up"),
    (lambda: S.cyclic(0.1, 0.2, 5, mode="sawtooth"), "mode"),
    (lambda: S.one_cycle(0.1, 0), "total_steps"),
    (lambda: S.one_cycle(0.1, 100, pct_start=1.5), "pct_start"),
    (lambda: S.one_cycle(0.1, 1, pct_start=1.0), "pct_start=1.0"),
    (lambda: S.one_cycle(0.1, 100, anneal="exp"), "anneal"),
    (lambda: S.join([S.constant(1), S.constant(2), S.constant(3)], [5, 5]), "boundaries"),
    (lambda: S.join([S.constant(1), S.constant(2), S.constant(3)], [9, 5]), "boundaries"),
    (lambda: S.join([S.constant(1), S.constant(2)], [0]), "boundaries"),
    (lambda: S.join([S.constant(1), S.constant(2)], []), "boundaries"),
    (lambda: S.warmup(S.constant(1), -3), "warmup_steps"),
    (lambda: S.warmup(S.constant(1), 3, start_lr=-1), "start_lr"),
    # flags are bools, not read by their truth ("False" is true); lists are lists
    (lambda: S.inverse_time(0.1, 10, 0.5, staircase="False"), "staircase"),
    (lambda: S.exponential(0.1, 0.9, staircase=float("nan")), "staircase"),
    (lambda: S.one_cycle(0.1, 100, three_phase="no"), "three_phase"),
    (lambda: S.multistep(0.1, 5), "milestones"),
    (lambda: S.join([0.1, 0.2], 5), "boundaries"),
]


@pytest.mark.parametrize("make,name", BAD)
def test_invalid_parameters_name_the_parameter(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_a_negative_zero_gamma_is_gamma_zero():
    """-0.0 passes the >= 0 check: the schedule is gamma 0's, its lr 0.0 (not -0.0) and its
    hash that of an equal schedule."""
    for make in (lambda g: S.multistep(0.1, [2], g), lambda g: S.step(0.1, 2, g)):
        a, b = make(-0.0), make(0.0)
        assert a == b and hash(a) == hash(b) and len({a, b}) == 1
        assert np.signbit(a.at(3)) == np.signbit(0.0)


def test_invalid_parameter_types():
    with pytest.raises(ValueError, match="total_steps"):
        S.cosine(0.1, 10.5)
    with pytest.raises(ValueError, match="lr"):
        S.cosine("0.1", 10)
    assert S.cosine(0.1, 1e4) == S.cosine(0.1, 10_000)
    with pytest.raises(ValueError, match="steps"):
        S.constant(0.1).at(-1)
    # what is neither a schedule nor a number is named as what it is
    for bad in (None, "5", np.array(["5"])):
        with pytest.raises(TypeError, match="steps must be a number"):
            S.constant(0.1).at(bad)
    with pytest.raises(TypeError, match=r"schedule must be a Schedule or an lr .* None"):
        S.warmup(None, 3)
    with pytest.raises(TypeError, match=r"schedules\[1\] must be a Schedule or an lr"):
        S.join([S.cosine(0.1, 10), None], [3])
    with pytest.raises(TypeError, match="join takes a list of schedules"):
        S.join(S.cosine(0.1, 10), [])
    assert S.join(np.array([0.1, 0.2]), [5]).at(5) == 0.2  # (lrs in an array: as before)


def test_reduce_on_plateau_matches_torch():
    rng = np.random.default_rng(3)
    metrics = np.concatenate([np.linspace(1, 0.5, 10), np.full(40, 0.6),
                              rng.uniform(0.4, 0.7, 60)])
    for kwargs in (dict(), dict(mode="max", factor=0.5, patience=2, cooldown=3),
                   dict(threshold_mode="abs", threshold=0.01, patience=3, min_lr=0.004)):
        p = torch.nn.Parameter(torch.zeros(1))
        topt = torch.optim.SGD([p], lr=0.1)
        tsched = L.ReduceLROnPlateau(topt, **kwargs)
        opt = fastopt.Adam(np.ones(4, np.float32), lr=0.1)
        ours = fastopt.ReduceOnPlateau(opt, **kwargs)
        g = np.ones(4, np.float32)
        for m in metrics:
            opt.step(g)
            tsched.step(float(m))
            ours.step(float(m))
            assert math.isclose(opt.current_lr, topt.param_groups[0]["lr"], rel_tol=1e-12)
        opt.step(g)
        assert math.isclose(opt.last_lr, topt.param_groups[0]["lr"], rel_tol=1e-12)
    assert opt.lr_scale < 1.0  # it did reduce


@pytest.mark.parametrize("name", sorted(CASES))
def test_advanced_is_the_schedule_later(name):
    """advanced(s, n) (the schedule of a param n steps behind its group) at t is s at t + n."""
    from fastopt.schedules import advanced

    schedule = CASES[name][0]
    t = np.arange(600)
    for n in (1, 7, 300, 5000):
        shifted = advanced(schedule, n)
        np.testing.assert_allclose(shifted.at(t), schedule.at(t + n),
                                   rtol=1e-12, atol=1e-18, err_msg=f"n={n}")
        S._check_table(shifted.table)  # (built without the checks: it passes them)
        np.testing.assert_array_equal(advanced(advanced(schedule, n), 2).at(t),
                                      advanced(schedule, n + 2).at(t))


def test_reduce_on_plateau_checks_what_it_loads_and_steps_on():
    """A loaded state with junk ('best' None) was taken, and the next step() failed after
    moving last_epoch; now the load refuses it and changes nothing."""
    opt = fastopt.AdamW(np.ones(8, np.float32), lr=0.1)
    plateau = S.ReduceOnPlateau(opt, patience=1)
    plateau.step(1.0)
    saved = plateau.state_dict()
    for bad, error in (({"best": None}, ValueError), ({"best": float("nan")}, ValueError),
                       ({"num_bad_epochs": -1}, ValueError), ({"factor": 2.0}, ValueError),
                       ({"mode": "up"}, ValueError), ({"surprise": 1}, ValueError)):
        with pytest.raises(error):
            plateau.load_state_dict({**saved, **bad})
        assert plateau.state_dict() == saved
    with pytest.raises(TypeError, match="state must be a dict"):
        plateau.load_state_dict([1])
    with pytest.raises(TypeError, match="metric as a number, got NoneType"):
        plateau.step(None)
    again = S.ReduceOnPlateau(opt, patience=5)
    again.load_state_dict(saved)
    assert again.state_dict() == saved
    again.step(np.float32(2.0))


def test_advanced_checks_its_arguments():
    from fastopt.schedules import advanced

    schedule = S.cosine(0.1, 100)
    for n in (-5, 1.5, True, 2**70, "3", None):
        with pytest.raises(ValueError, match="step count, an int in"):
            advanced(schedule, n)
    with pytest.raises(TypeError, match="takes a Schedule, got float"):
        advanced(0.1, 3)
    assert advanced(schedule, np.int64(3)).at(0) == schedule.at(3)


def test_copies_and_unpickled_schedules_keep_a_read_only_table():
    """A copied or unpickled schedule (a deepcopied optimizer, ZeRO's consolidated state
    through torch.save) is made through the constructor: its table checked and read-only,
    the one type the kernels were compiled for (a writable table compiled each kernel
    again)."""
    import copy
    import pickle

    s = S.warmup(S.cosine(1e-2, 20), 4)
    for c in (copy.copy(s), copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert c == s and repr(c) == repr(s)
        assert not c.table.flags.writeable
