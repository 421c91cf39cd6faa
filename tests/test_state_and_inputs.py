"""state_dict round trips, bad inputs (clear errors, nothing changed), functional layer."""

import numpy as np
import pytest

import fastopt
from fastopt import functional as F
from fastopt import schedules as S

N = 523

OPTIMIZERS = {
    "Adam": lambda p, lr: fastopt.Adam(p, lr=lr, weight_decay=0.05, amsgrad=True),
    "AdamW": lambda p, lr: fastopt.AdamW(p, lr=lr, maximize=True),
    "Adagrad": lambda p, lr: fastopt.Adagrad(p, lr=lr, lr_decay=0.01,
                                             initial_accumulator_value=0.1),
    "Adadelta": lambda p, lr: fastopt.Adadelta(p, lr=lr, rho=0.8, weight_decay=0.01),
}


def grads_for(seed, steps, n=N):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("k", [1, 37])
def test_state_dict_round_trip_is_bit_identical(name, k):
    make = OPTIMIZERS[name]
    sched = S.warmup(S.cosine_restarts(0.01, 20, 2), 15)
    grads = grads_for(k, 80)
    p0 = np.random.default_rng(5).standard_normal(N).astype(np.float32)

    p_full = p0.copy()
    full = make(p_full, sched)
    for g in grads:
        full.step(g)

    p_a = p0.copy()
    first = make(p_a, sched)
    for g in grads[:k]:
        first.step(g)
    saved = first.state_dict()
    for g in grads_for(99, 3):  # the live optimizer goes on; the snapshot must not change
        first.step(g)

    # a fresh optimizer over the params as they were at step k (a checkpoint holds them too)
    p_b = _params_after(make, p0, sched, grads[:k])
    resumed = make(p_b, 0.123)  # another lr: the schedule comes from the state dict
    resumed.load_state_dict(saved)
    assert resumed.step_count == k
    for g in grads[k:]:
        resumed.step(g)
    np.testing.assert_array_equal(p_b, p_full)
    for key, value in full.state.items():
        np.testing.assert_array_equal(resumed.state[key], value)
    assert resumed.last_lr == full.last_lr


def _params_after(make, p0, sched, grads):
    p = p0.copy()
    opt = make(p, sched)
    for g in grads:
        opt.step(g)
    return p


def test_state_dict_contents_use_torch_names():
    p = np.ones(8, np.float32)
    d = fastopt.Adam(p, amsgrad=True).state_dict()
    assert {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} <= set(d)
    assert set(fastopt.Adagrad(p).state_dict()) >= {"step", "sum"}
    assert set(fastopt.Adadelta(p).state_dict()) >= {"step", "square_avg", "acc_delta"}
    assert fastopt.Adagrad(p, initial_accumulator_value=0.5).state_dict()["sum"][0] == 0.5
    assert d["step"] == 0 and isinstance(d["exp_avg"], np.ndarray)


@pytest.mark.parametrize("bad", [
    {"step": -1}, {"step": 2.5}, {"exp_avg": np.zeros(3)}, {"optimizer": "Adagrad"},
    {"betas": (0.9, 1.5)}, {"schedule": np.zeros((1, 2))}, {"lr_scale": -1.0},
])
def test_bad_state_dict_changes_nothing(bad):
    p = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    opt = fastopt.Adam(p)
    for g in grads_for(1, 3):
        opt.step(g)
    before = opt.state_dict()
    d = {**before, **bad}
    with pytest.raises((ValueError, TypeError, KeyError)):
        opt.load_state_dict(d)
    after = opt.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_missing_state_key_changes_nothing():
    opt = fastopt.Adam(np.ones(N, np.float32))
    d = opt.state_dict()
    del d["exp_avg_sq"]
    with pytest.raises(KeyError, match="exp_avg_sq"):
        opt.load_state_dict(d)


def test_load_enables_amsgrad_buffer():
    p = np.ones(N, np.float32)
    src = fastopt.Adam(p.copy(), amsgrad=True)
    src.step(grads_for(3, 1)[0])
    dst = fastopt.Adam(p.copy())
    dst.load_state_dict(src.state_dict())
    assert dst.defaults["amsgrad"] and "max_exp_avg_sq" in dst.state
    dst.step(grads_for(4, 1)[0])


# ----------------------------------------------------------------------------- bad inputs


def _snapshot(opt):
    return opt.params.copy(), {k: v.copy() for k, v in opt.state.items()}, opt.step_count


def _unchanged(opt, snap):
    params, state, steps = snap
    np.testing.assert_array_equal(opt.params, params)
    for k, v in state.items():
        np.testing.assert_array_equal(opt.state[k], v)
    assert opt.step_count == steps


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


BAD_GRADS = [
    ("short", lambda g: g[:-1], "grads"),
    ("float64", lambda g: g.astype(np.float64), "float32"),
    ("2-D", lambda g: np.ascontiguousarray(np.stack([g, g])), "1-D"),
    ("strided", lambda g: np.repeat(g, 2)[::2], "contiguous"),
    ("list", lambda g: list(g), "numpy"),
]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case,bad,match", BAD_GRADS, ids=[c[0] for c in BAD_GRADS])
def test_bad_grads_raise_and_change_nothing(name, case, bad, match):
    p = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    opt = OPTIMIZERS[name](p, 0.01)
    g = grads_for(2, 1)[0]
    opt.step(g)
    snap = _snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step(bad(g))
    _unchanged(opt, snap)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_params_aliasing_grads_is_refused(name):
    p = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    opt = OPTIMIZERS[name](p, 0.01)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="share memory"):
        opt.step(p)
    state_buffer = next(iter(opt.state.values()))
    with pytest.raises(ValueError, match="share memory"):
        opt.step(state_buffer)
    _unchanged(opt, snap)


def test_readonly_grads_are_fine_readonly_params_are_not():
    p = np.ones(N, np.float32)
    opt = fastopt.Adam(p)
    opt.step(_readonly(grads_for(0, 1)[0]))
    assert opt.step_count == 1
    with pytest.raises(ValueError, match="params.*writable"):
        fastopt.Adam(_readonly(p))


@pytest.mark.parametrize("params,match", [
    (np.ones((4, 4), np.float32), "1-D"),
    (np.ones(8, np.float64), "float32"),
    (np.ones(16, np.float32)[::2], "contiguous"),
    ([1.0, 2.0], "numpy"),
])
def test_bad_params(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastopt.AdamW(params)


P = np.ones(4, np.float32)


@pytest.mark.parametrize("make,match", [
    (lambda: fastopt.Adam(P, lr=-1e-3), "Invalid learning rate"),
    (lambda: fastopt.Adam(P, lr=float("nan")), "Invalid learning rate"),
    (lambda: fastopt.Adam(P, betas=(1.0, 0.999)), "beta parameter at index 0"),
    (lambda: fastopt.Adam(P, betas=(0.9, -0.1)), "beta parameter at index 1"),
    (lambda: fastopt.Adam(P, betas=0.9), "betas"),
    (lambda: fastopt.AdamW(P, eps=-1.0), "epsilon"),
    (lambda: fastopt.AdamW(P, weight_decay=-0.1), "weight_decay"),
    (lambda: fastopt.Adagrad(P, lr_decay=-1), "lr_decay"),
    (lambda: fastopt.Adagrad(P, initial_accumulator_value=-1), "initial_accumulator_value"),
    (lambda: fastopt.Adagrad(P, eps=float("nan")), "epsilon"),
    (lambda: fastopt.Adadelta(P, rho=1.5), "rho"),
])
def test_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [
    lambda: fastopt.Adadelta(P, lr="0.1"), lambda: fastopt.Adam(P, betas=(0.9, None)),
    lambda: fastopt.AdamW(P, weight_decay=[0.1]), lambda: fastopt.SGD(P, momentum="0.9"),
    lambda: F.adam(P.copy(), P.copy(), P.copy(), P.copy(), step=1, eps=None)])
def test_a_hyperparameter_that_is_no_number_is_a_type_error(make):
    """As in torch, whose comparisons raise TypeError there; the message names the type."""
    with pytest.raises(TypeError, match="it must be a real number"):
        make()


def test_a_negative_second_moment_is_refused_at_load():
    """It would make the next step's square root NaN (torch too loads it)."""
    opt = fastopt.AdamW(np.ones(N, np.float32))
    opt.step(np.ones(N, np.float32))
    d = opt.state_dict()
    before = opt.state_dict()
    d["exp_avg_sq"] = -d["exp_avg_sq"]
    with pytest.raises(ValueError, match="'exp_avg_sq'.* negative values"):
        opt.load_state_dict(d)
    np.testing.assert_array_equal(opt.state_dict()["exp_avg_sq"], before["exp_avg_sq"])
    d["exp_avg"] = -d["exp_avg"]  # (a signed state may be negative)
    d["exp_avg_sq"] = before["exp_avg_sq"]
    opt.load_state_dict(d)


def test_a_flag_must_be_a_bool():
    """amsgrad="False" was true, so it turned AMSGrad on; numpy's and torch's one-element
    bools and 0/1 are taken."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    for bad in ("False", 2, 0.5, [True]):
        with pytest.raises(TypeError, match="amsgrad must be True or False"):
            fastopt.Adam(P, amsgrad=bad)
        with pytest.raises(TypeError, match="amsgrad must be True or False"):
            fot.Adam([torch.nn.Parameter(torch.zeros(3))], amsgrad=bad)
    for good, want in ((np.bool_(True), True), (torch.tensor(False), False), (1, True),
                       (None, False), (1.0, True)):  # (what torch reads as a flag)
        assert fastopt.Adam(P, amsgrad=good).defaults["amsgrad"] is want
    # fastopt.torch hands a tensor's value over as a float; a torch dict may hold one
    q = torch.nn.Parameter(torch.zeros(3))
    ours = fot.Adam([q], maximize=torch.tensor(True))
    theirs = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], amsgrad=None)
    d = theirs.state_dict()
    d["param_groups"][0]["maximize"] = torch.tensor(False)
    ours.load_state_dict(d)


def test_concurrent_step_of_one_optimizer_is_refused():
    p = np.ones(N, np.float32)
    opt = fastopt.Adam(p)
    opt._step_lock.acquire()  # as if another thread were inside step()
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            opt.step(grads_for(0, 1)[0])
    finally:
        opt._step_lock.release()
    assert opt.step_count == 0


# ----------------------------------------------------------------------------- functional


def test_functional_matches_optimizer():
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal(N).astype(np.float32)
    sched = S.warmup(S.linear(1e-2, 30), 5)
    grads = grads_for(9, 30)
    p1 = p0.copy()
    opt = fastopt.AdamW(p1, lr=sched, amsgrad=True, weight_decay=0.1)
    p2 = p0.copy()
    m, v, vmax = (np.zeros(N, np.float32) for _ in range(3))
    for k, g in enumerate(grads, start=1):
        opt.step(g)
        used = F.adamw(p2, g, m, v, vmax, step=k, schedule=sched, amsgrad=True,
                       weight_decay=0.1)
        assert used == opt.last_lr
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(m, opt.state["exp_avg"])


def test_functional_each_optimizer_one_step_vs_reference():
    from fastopt import reference as R

    rng = np.random.default_rng(10)
    p0, g = (rng.standard_normal(N).astype(np.float32) for _ in range(2))
    s1, s2 = (rng.random(N).astype(np.float32) for _ in range(2))
    cases = [
        (F.adam, R.adam, [s1, s2], dict(weight_decay=0.1), dict(weight_decay=0.1)),
        (F.adagrad, R.adagrad, [s1], dict(lr_decay=0.1), dict(lr_decay=0.1)),
        (F.adadelta, R.adadelta, [s1, s2], dict(rho=0.7), dict(rho=0.7)),
    ]
    for fn, ref, state, kw, rkw in cases:
        p = p0.copy()
        st = [s.copy() for s in state]
        lr = fn(p, g, *st, step=4, lr=0.05, **kw)
        assert lr == 0.05
        expected = ref(p0, g, *state, step=4, lr=0.05, **rkw)
        np.testing.assert_allclose(p, expected[0], rtol=1e-6, atol=1e-7)
        for got, want in zip(st, expected[1:], strict=False):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_dict_of_the_other_layer_or_no_dict_is_refused_clearly():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    opt = fastopt.AdamW(np.ones(N, np.float32))
    for bad, error, match in (([1, 2], TypeError, "must be a dict .* got list"),
                              (None, TypeError, "got NoneType")):
        with pytest.raises(error, match=match):
            opt.load_state_dict(bad)
    p = torch.nn.Parameter(torch.ones(N))
    ours = fot.AdamW([p])
    with pytest.raises(KeyError, match="torch optimizer's state dict"):
        opt.load_state_dict(ours.state_dict())
    with pytest.raises(KeyError, match="numpy/cupy class fastopt.AdamW"):
        ours.load_state_dict(opt.state_dict())


def test_max_grad_norm_resumes_through_the_state_dict():
    """opt.max_grad_norm is in the state dict, as fastopt.save keeps it (it was dropped:
    a resumed run stepped unclipped, 0.04 off the run that never stopped)."""
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(6)]
    straight = fastopt.AdamW(np.ones(N, np.float32), lr=0.1)
    straight.max_grad_norm = 0.5
    for g in grads:
        straight.step(g)
    first = fastopt.AdamW(np.ones(N, np.float32), lr=0.1)
    first.max_grad_norm = 0.5
    for g in grads[:3]:
        first.step(g)
    d = first.state_dict()
    assert d["max_grad_norm"] == 0.5
    resumed = fastopt.AdamW(first.params.copy(), lr=0.1)
    resumed.load_state_dict(d)
    assert resumed.max_grad_norm == 0.5
    for g in grads[3:]:
        resumed.step(g)
    np.testing.assert_array_equal(resumed.params, straight.params)
    d["max_grad_norm"] = -1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        resumed.load_state_dict(d)
    assert resumed.max_grad_norm == 0.5


def test_hyperparameters_are_read_only_and_change_through_a_loaded_dict():
    """opt.defaults edits (and opt.betas = ...) were ignored by the steps yet saved by
    state_dict, so a resumed run took other values than the run that never stopped: they are
    refused, and a loaded dict's values are the way to change them."""
    import copy
    import pickle

    p = np.ones(N, np.float32)
    opt = fastopt.AdamW(p, lr=0.1)
    for edit in (lambda: opt.defaults.__setitem__("betas", (0.5, 0.9)),
                 lambda: opt.defaults.update(eps=1.0), lambda: opt.defaults.pop("eps"),
                 lambda: setattr(opt, "lr", 0.5), lambda: setattr(opt, "weight_decay", 0.5)):
        with pytest.raises((TypeError, AttributeError), match="fixed at construction"):
            edit()
    assert opt.defaults["betas"] == (0.9, 0.999)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.defaults == opt.defaults
        with pytest.raises(TypeError, match="fixed at construction"):
            copied.defaults["eps"] = 1.0
    g = np.full(N, 0.5, np.float32)
    twin = fastopt.AdamW(p.copy(), lr=0.1, betas=(0.5, 0.9))
    d = opt.state_dict()
    d["betas"] = (0.5, 0.9)
    opt.load_state_dict(d)
    for _ in range(3):
        opt.step(g)
        twin.step(g)
    np.testing.assert_array_equal(opt.params, twin.params)
    opt.lr_scale, opt.schedule = 0.5, 0.01  # (these do take effect)
    d["amsgrad"] = True  # (a new state buffer: refused, saying why)
    with pytest.raises(KeyError, match="max_exp_avg_sq.*which amsgrad needs"):
        opt.load_state_dict(d)
    # an option that drops a state buffer: the int8 kernel call is made anew (it raised
    # "sgd_int8 expected 34 arguments, got 30" at the next step)
    sgd = fastopt.SGD(p.copy(), lr=0.1, momentum=0.9, state_dtype="int8")
    sgd.step(g)
    d = sgd.state_dict()
    d["momentum"] = 0.0
    sgd.load_state_dict(d)
    before = sgd.params.copy()
    sgd.step(g)
    np.testing.assert_allclose(before - sgd.params, 0.1 * g, rtol=1e-6)


def test_functional_errors():
    p, g, m, v = (np.ones(N, np.float32) for _ in range(4))
    with pytest.raises(ValueError, match="step"):
        F.adam(p, g, m, v, step=0)
    with pytest.raises(TypeError, match="step"):
        F.adam(p, g, m, v, step=1.0)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        F.adam(p, g, m, v, step=1, amsgrad=True)
    # a state buffer the options leave unused would stay as given: a forgotten option
    for call, match in ((lambda: F.adam(p, g, m, v, np.zeros(N, np.float32), step=1),
                         "max_exp_avg_sq was given .* only when amsgrad"),
                        (lambda: F.sgd(p, g, m, step=1), "only when momentum != 0.0"),
                        (lambda: F.rmsprop(p, g, v, grad_avg=m, step=1), "only when centered")):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="share memory"):
        F.adam(p, g, m, m, step=1)
    # a per-step scalar inside any buffer the kernel touches: grads, an int8 state's scales
    from fastopt import Int8State

    m8, v8 = Int8State.zeros(N), Int8State.zeros(N)
    for states, inside in (((m, v), g[:2].view(np.float64)),
                           ((m8, v8), v8.absmax[:2].view(np.float64))):
        with pytest.raises(ValueError, match="share memory"):
            F.nadam(p, g, *states, inside, step=1)
    with pytest.raises(ValueError, match="mu_product holds nan: a per-step scalar must be"):
        F.nadam(p, g, m, v, np.array([np.nan]), step=1)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        F.adam(p, g, m, v[:-1], step=1)
    with pytest.raises(ValueError, match="either lr or schedule"):
        F.adam(p, g, m, v, step=1, lr=0.1, schedule=S.constant(0.1))
    np.testing.assert_array_equal(p, np.ones(N, np.float32))  # nothing was touched


# ----------------------------------------------------------------------------- FlatBuffer


def test_flat_buffer_packs_and_views():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 5), (7,), (), (2, 3, 4)]]
    fb = fastopt.FlatBuffer(arrays)
    assert fb.buffer.ndim == 1 and fb.buffer.flags.c_contiguous and fb.buffer.dtype == np.float32
    assert len(fb) == 4
    for view, a in zip(fb.views, arrays, strict=True):
        assert view.shape == a.shape
        np.testing.assert_array_equal(view, a)
        assert np.shares_memory(view, fb.buffer)
        assert view.ctypes.data % 64 == 0
    fb.views[1][...] = 42.0  # writes through
    assert np.count_nonzero(fb.buffer == 42.0) == 7
    gb = fb.like()
    assert gb.offsets == fb.offsets and not np.any(gb.buffer)


def test_flat_buffer_with_optimizer_keeps_padding_zero():
    rng = np.random.default_rng(1)
    fb = fastopt.FlatBuffer([rng.standard_normal((3, 3)), rng.standard_normal(5)])
    gb = fb.like()
    opt = fastopt.AdamW(fb, lr=0.1)
    for _ in range(5):
        for view in gb.views:
            view[...] = rng.standard_normal(view.shape)
        opt.step(gb.buffer)
    used = np.zeros(fb.buffer.size, bool)
    for o, v in zip(fb.offsets, fb.views, strict=True):
        used[o:o + v.size] = True
    assert not np.any(fb.buffer[~used])
    assert np.all(fb.buffer[used] != 0)
