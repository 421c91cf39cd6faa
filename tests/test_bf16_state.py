"""bfloat16 optimizer state (state_dtype="bfloat16"): stochastic rounding, accuracy, resume."""

import numpy as np
import pytest
from numba import njit
from optimizer_cases import logistic_problem

import fastopt
from fastopt import _bf16
from fastopt import schedules as S
from fastopt.cpu.convert import bf16_to_float, float_to_bf16_stochastic, random16

N = 4001
MAKERS = {
    "Adam": lambda p, **kw: fastopt.Adam(p, lr=S.cosine(1e-2, 300), amsgrad=True, **kw),
    "AdamW": lambda p, **kw: fastopt.AdamW(p, lr=1e-2, weight_decay=0.1, **kw),
    "Adagrad": lambda p, **kw: fastopt.Adagrad(p, lr=5e-2, initial_accumulator_value=0.1, **kw),
    "Adadelta": lambda p, **kw: fastopt.Adadelta(p, lr=1.0, **kw),
}


@njit(error_model="numpy")
def _round_many(value, seed, copies):
    total = 0.0
    for i in range(copies):
        total += bf16_to_float(float_to_bf16_stochastic(value, random16(i, seed)))
    return total / copies


@pytest.mark.parametrize("value", [1.0 + 2.0**-10, 3.14159, -7.77e-5, 123456.7])
def test_stochastic_rounding_is_unbiased(value):
    value = np.float32(value)
    ulp = abs(float(np.float32(_bf16.decode(np.array([_bf16.encode(value)]))[0])
                    - value)) + 2.0 ** -8 * abs(float(value))
    mean = _round_many(value, np.uint32(12345), 200_000)
    assert abs(mean - float(value)) < 0.01 * ulp  # nearest rounding would be off by ~ulp/2
    down = _bf16.decode(np.array([_bf16.encode(value)]))[0]
    assert mean != pytest.approx(float(down), abs=0.0)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bf16_state_tracks_fp32_state(name):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(N).astype(np.float32)
    a, b = p0.copy(), p0.copy()
    full, half = MAKERS[name](a), MAKERS[name](b, state_dtype="bfloat16")
    assert all(v.dtype == np.uint16 for v in half.state.values())
    for _ in range(300):
        g = rng.standard_normal(N).astype(np.float32)
        full.step(g)
        half.step(g)
    moved = np.max(np.abs(a - p0))
    assert np.max(np.abs(b - a)) < 0.05 * moved  # within 5 % of how far the params moved
    for key in full.state:
        np.testing.assert_allclose(half.state_dict()[key], full.state_dict()[key], rtol=0.05,
                                   atol=0.05 * np.max(np.abs(full.state_dict()[key])))


def test_logistic_regression_converges_like_fp32():
    """A real problem: the final loss with bf16 state is within 1 % of fp32 state's."""
    loss_and_grad = logistic_problem()
    losses = {}
    for state_dtype in ("float32", "bfloat16"):
        w = np.zeros(50, np.float32)
        opt = fastopt.AdamW(w, lr=S.cosine(0.05, 600), weight_decay=0.0, state_dtype=state_dtype)
        for _ in range(600):
            opt.step(loss_and_grad(w)[1])
        losses[state_dtype] = loss_and_grad(w)[0]
    assert losses["float32"] < 0.35  # it learned (chance is 0.69)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.01)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bf16_state_resume_is_bit_identical(name, tmp_path):
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(30)]
    a = p0.copy()
    full = MAKERS[name](a, state_dtype="bfloat16")
    for g in grads:
        full.step(g)
    b = p0.copy()
    part = MAKERS[name](b, state_dtype="bfloat16")
    for g in grads[:11]:
        part.step(g)
    fastopt.save(part, tmp_path / "s.npz")
    c = np.zeros(N, np.float32)
    resumed = fastopt.load(tmp_path / "s.npz", c)
    assert resumed.state_dtype == "bfloat16"
    for g in grads[11:]:
        resumed.step(g)
    np.testing.assert_array_equal(c, a)
    for key in full.state:
        np.testing.assert_array_equal(resumed.state[key], full.state[key])


def test_bf16_state_with_16_bit_params_and_errors():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = np.random.default_rng(4).standard_normal(N).astype(ml_dtypes.bfloat16)
    opt = fastopt.AdamW(p, state_dtype="bfloat16")
    opt.step(np.ones(N, np.float32))
    assert opt.state["master_param"].dtype == np.float32  # the master stays float32
    assert opt.state["exp_avg"].dtype == np.uint16
    with pytest.raises(ValueError, match="state_dtype"):
        fastopt.Adam(np.ones(4, np.float32), state_dtype="float16")
