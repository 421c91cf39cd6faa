"""Property tests (hypothesis): random lengths, hyperparameters and schedules vs the reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import reference
from fastopt import schedules as S

LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129,
                                     767, 768, 16_383, 16_384, 16_385]), st.integers(0, 3000))
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

schedule_st = st.one_of(
    st.floats(0.0, 0.1),
    st.builds(S.cosine, st.floats(1e-4, 0.1), st.integers(1, 20), st.floats(0, 1e-4)),
    st.builds(S.cyclic, st.floats(1e-4, 1e-3), st.floats(1e-3, 0.1), st.integers(1, 5),
              st.integers(1, 5), st.sampled_from(["triangular", "triangular2", "exp_range"]),
              st.floats(0.5, 1.0)),
    st.builds(S.warmup, st.builds(S.exponential, st.floats(1e-4, 0.1), st.floats(0.5, 1.0)),
              st.integers(0, 4)),
    st.builds(S.one_cycle, st.floats(1e-3, 0.1), st.integers(10, 50)),
)


def _data(seed, n, offset):
    rng = np.random.default_rng(seed)
    # an unaligned view into a bigger buffer: offset elements in
    base = rng.standard_normal(n + offset).astype(np.float32)
    return base[offset:], [rng.standard_normal(n).astype(np.float32) * rng.uniform(0.01, 10)
                           for _ in range(6)]


def _close(ours, ref):
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5 * scale)


@SETTINGS
@given(n=LENGTHS, offset=st.integers(0, 7), seed=st.integers(0, 2**32 - 1),
       beta1=st.floats(0.0, 0.999), beta2=st.floats(0.5, 0.9999), eps=st.floats(1e-8, 1e-2),
       weight_decay=st.floats(0.0, 0.5), amsgrad=st.booleans(), maximize=st.booleans(),
       decoupled=st.booleans(), schedule=schedule_st)
def test_adam_family_vs_reference(n, offset, seed, beta1, beta2, eps, weight_decay, amsgrad,
                                  maximize, decoupled, schedule):
    p, grads = _data(seed, n, offset)
    p0 = p.copy()
    cls = fastopt.AdamW if decoupled else fastopt.Adam
    opt = cls(p, lr=schedule, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
              amsgrad=amsgrad, maximize=maximize)
    ref = [p0.astype(np.float64), np.zeros(n), np.zeros(n), np.zeros(n) if amsgrad else None]
    for k, g in enumerate(grads, start=1):
        opt.step(g)
        ref = reference.adam(*ref[:1], g, *ref[1:], step=k, lr=opt.schedule.at(k - 1),
                             beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                             decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
    _close(p, ref[0])
    _close(opt.state["exp_avg"], ref[1])


@SETTINGS
@given(n=LENGTHS, offset=st.integers(0, 7), seed=st.integers(0, 2**32 - 1),
       lr_decay=st.floats(0.0, 1.0), eps=st.floats(1e-10, 1e-2), weight_decay=st.floats(0, 0.5),
       init=st.floats(0.0, 1.0), maximize=st.booleans(), schedule=schedule_st)
def test_adagrad_vs_reference(n, offset, seed, lr_decay, eps, weight_decay, init, maximize,
                              schedule):
    p, grads = _data(seed, n, offset)
    p0 = p.copy()
    opt = fastopt.Adagrad(p, lr=schedule, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                          initial_accumulator_value=init, maximize=maximize)
    ref = [p0.astype(np.float64), np.full(n, init)]
    for k, g in enumerate(grads, start=1):
        opt.step(g)
        ref = reference.adagrad(ref[0], g, ref[1], step=k, lr=opt.schedule.at(k - 1),
                                lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                                maximize=maximize)
    _close(p, ref[0])
    _close(opt.state["sum"], ref[1])


@SETTINGS
@given(n=LENGTHS, offset=st.integers(0, 7), seed=st.integers(0, 2**32 - 1),
       rho=st.floats(0.0, 1.0), eps=st.floats(1e-8, 1e-2), weight_decay=st.floats(0, 0.5),
       maximize=st.booleans(), schedule=schedule_st)
def test_adadelta_vs_reference(n, offset, seed, rho, eps, weight_decay, maximize, schedule):
    p, grads = _data(seed, n, offset)
    p0 = p.copy()
    opt = fastopt.Adadelta(p, lr=schedule, rho=rho, eps=eps, weight_decay=weight_decay,
                           maximize=maximize)
    ref = [p0.astype(np.float64), np.zeros(n), np.zeros(n)]
    for k, g in enumerate(grads, start=1):
        opt.step(g)
        ref = reference.adadelta(ref[0], g, ref[1], ref[2], step=k, lr=opt.schedule.at(k - 1),
                                 rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    _close(p, ref[0])


@SETTINGS
@given(schedule=schedule_st, steps=st.lists(st.integers(0, 10**6), min_size=1, max_size=30))
def test_schedule_kernel_evaluator_equals_at(schedule, steps):
    from fastopt.cpu.schedule import lr_at

    sched = S.as_schedule(schedule)
    for t in steps:
        np.testing.assert_allclose(lr_at(sched.table, float(t)), sched.at(t), rtol=1e-12,
                                   atol=1e-300)


ml_dtypes = pytest.importorskip("ml_dtypes")
PARAM_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# per-step tolerance of the storage formats against the float64 reference (relative to scale)
TOLERANCE = {("float32", "float32"): 2e-5, ("float16", "float32"): 2e-3,
             ("bfloat16", "float32"): 1.6e-2, ("float32", "bfloat16"): 3e-2,
             ("float16", "bfloat16"): 3e-2, ("bfloat16", "bfloat16"): 4e-2}


@SETTINGS
@given(n=LENGTHS, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(sorted(PARAM_DTYPES)),
       state_dtype=st.sampled_from(["float32", "bfloat16"]),
       name=st.sampled_from(["Adam", "AdamW", "Adagrad", "Adadelta"]), schedule=schedule_st)
def test_every_dtype_vs_reference(n, seed, dtype, state_dtype, name, schedule):
    """16-bit params (fp32 master) and bf16 state track the float64 reference within the
    storage format's precision."""
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(n)).astype(PARAM_DTYPES[dtype])
    opt = getattr(fastopt, name)(p, lr=schedule, state_dtype=state_dtype)
    start = p.astype(np.float64)
    ref_p = start.copy()
    ref_state = {"Adam": [np.zeros(n), np.zeros(n)], "AdamW": [np.zeros(n), np.zeros(n)],
                 "Adagrad": [np.zeros(n)], "Adadelta": [np.zeros(n), np.zeros(n)]}[name]
    fn = {"Adam": reference.adam, "AdamW": reference.adam, "Adagrad": reference.adagrad,
          "Adadelta": reference.adadelta}[name]
    extra = {"AdamW": dict(decoupled=True, weight_decay=1e-2)}.get(name, {})
    for k in range(1, 6):
        g = (rng.standard_normal(n) * rng.uniform(0.1, 3)).astype(PARAM_DTYPES[dtype])
        opt.step(g)
        ref_p, *ref_state = fn(ref_p, g.astype(np.float64), *ref_state, step=k,
                               lr=opt.schedule.at(k - 1), **extra)
        ref_state = [s for s in ref_state if s is not None]
    moved = max(float(np.max(np.abs(ref_p - start))) if n else 0.0, 1e-3)
    got = p.astype(np.float64)
    rounding = float(np.max(np.abs(ref_p))) * {"float32": 6 * 2**-23, "float16": 2**-11,
                                               "bfloat16": 2**-8}[dtype] if n else 0.0
    tol = TOLERANCE[(dtype, state_dtype)] * moved * 5 + rounding
    assert np.max(np.abs(got - ref_p), initial=0.0) <= tol
