"""16-bit params (float16, bfloat16) with a float32 master copy, updated in the same pass."""

import numpy as np
import pytest

import fastopt
from fastopt import functional as F
from fastopt import schedules as S

ml_dtypes = pytest.importorskip("ml_dtypes")

N = 3001
SCHED = S.warmup(S.cosine(1e-2, 60), 5)
MAKERS = {
    "Adam": lambda p, **kw: fastopt.Adam(p, lr=SCHED, weight_decay=0.1, amsgrad=True, **kw),
    "AdamW": lambda p, **kw: fastopt.AdamW(p, lr=SCHED, maximize=True, **kw),
    "Adagrad": lambda p, **kw: fastopt.Adagrad(p, lr=SCHED, lr_decay=0.01, **kw),
    "Adadelta": lambda p, **kw: fastopt.Adadelta(p, lr=SCHED, weight_decay=0.01, **kw),
}
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _data(dtype, steps=40, seed=0):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(N) * 3).astype(dtype)
    gs = [(rng.standard_normal(N) * np.exp(rng.uniform(-3, 3))).astype(dtype)
          for _ in range(steps)]
    return p, gs


@pytest.mark.parametrize("grad_kind", ["same", "float32", "bits"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_master_equals_float32_run_and_params_are_rne(name, dtype, grad_kind):
    dt = DTYPES[dtype]
    p16, grads = _data(dt)
    p32 = p16.astype(np.float32)
    ref = MAKERS[name](p32)
    opt = MAKERS[name](p16)
    assert opt.dtype == dtype and "master_param" in opt.state
    for g in grads:
        ref.step(g.astype(np.float32))
        given = {"same": g, "float32": g.astype(np.float32), "bits": g.view(np.uint16)}[grad_kind]
        opt.step(given)
    master = opt.state["master_param"]
    np.testing.assert_array_equal(master, p32)  # the same float32 math, bit for bit
    np.testing.assert_array_equal(p16.view(np.uint16), master.astype(dt).view(np.uint16))
    assert not np.array_equal(p16, _data(dt)[0])  # it moved


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_raw_uint16_params_with_dtype(dtype):
    dt = DTYPES[dtype]
    p16, grads = _data(dt, steps=10)
    bits = p16.view(np.uint16).copy()
    a, b = fastopt.AdamW(p16), fastopt.AdamW(bits, dtype=dtype)
    assert b.dtype == dtype
    for g in grads:
        a.step(g)
        b.step(g.view(np.uint16))
    np.testing.assert_array_equal(bits, p16.view(np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        fastopt.AdamW(bits.copy(), dtype="int8")
    with pytest.raises(TypeError, match="uint16"):
        fastopt.AdamW(np.ones(4, np.float32), dtype="bfloat16")


def test_functional_with_master():
    p16, grads = _data(np.float16, steps=5)
    master = p16.astype(np.float32)
    m, v = np.zeros(N, np.float32), np.zeros(N, np.float32)
    ref = p16.astype(np.float32)
    rm, rv = np.zeros(N, np.float32), np.zeros(N, np.float32)
    for k, g in enumerate(grads, start=1):
        F.adam(p16, g, m, v, step=k, lr=1e-2, master_param=master)
        F.adam(ref, g.astype(np.float32), rm, rv, step=k, lr=1e-2)
    np.testing.assert_array_equal(master, ref)
    np.testing.assert_array_equal(p16, ref.astype(np.float16))
    with pytest.raises(ValueError, match="master"):
        F.adam(p16, grads[0], m, v, step=6)


@pytest.mark.parametrize("op", ["adamw", "adagrad", "adadelta"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_functional_uint16_bits_with_dtype(op, dtype):
    """uint16 bits + dtype= (how cupy carries bfloat16) equal the typed 16-bit arrays."""
    dt = DTYPES[dtype]
    p16, grads = _data(dt, steps=6)
    bits = p16.view(np.uint16).copy()
    states = {"adamw": 2, "adagrad": 1, "adadelta": 2}[op]
    typed = [p16.astype(np.float32)] + [np.zeros(N, np.float32) for _ in range(states)]
    raw = [bits.view(dt).astype(np.float32)] + [np.zeros(N, np.float32) for _ in range(states)]
    for k, g in enumerate(grads, start=1):
        getattr(F, op)(p16, g, *typed[1:], step=k, master_param=typed[0])
        getattr(F, op)(bits, g.view(np.uint16), *raw[1:], step=k, master_param=raw[0], dtype=dtype)
    np.testing.assert_array_equal(bits, p16.view(np.uint16))
    np.testing.assert_array_equal(raw[0], typed[0])
    with pytest.raises(TypeError, match="grads"):  # grads in the params' array dtype
        getattr(F, op)(bits, grads[0], *raw[1:], step=7, master_param=raw[0], dtype=dtype)
    with pytest.raises(TypeError, match="params"):  # dtype= describes uint16 bits only
        getattr(F, op)(np.ones(N, np.float32), np.ones(N, np.float32), *raw[1:], step=7,
                       master_param=raw[0], dtype=dtype)


def test_state_dict_and_checkpoint_keep_the_master(tmp_path):
    p16, grads = _data(ml_dtypes.bfloat16, steps=20)
    opt = fastopt.Adagrad(p16, lr=SCHED)
    for g in grads[:8]:
        opt.step(g)
    assert "master_param" in opt.state_dict()
    fastopt.save(opt, tmp_path / "bf16.npz")
    fresh = np.zeros(N, ml_dtypes.bfloat16)
    back = fastopt.load(tmp_path / "bf16.npz", fresh)
    np.testing.assert_array_equal(back.state["master_param"], opt.state["master_param"])
    for g in grads[8:]:
        opt.step(g)
        back.step(g)
    np.testing.assert_array_equal(fresh.view(np.uint16), p16.view(np.uint16))
    with pytest.raises(fastopt.CheckpointError, match="bfloat16"):
        fastopt.load(tmp_path / "bf16.npz", np.zeros(N, np.float16))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_clipping_and_skip_with_16_bit_grads(dtype):
    dt = DTYPES[dtype]
    p16, grads = _data(dt, steps=3)
    opt = fastopt.AdamW(p16)
    opt.step(grads[0], max_grad_norm=1.0)
    expected = float(np.linalg.norm(grads[0].astype(np.float64)))
    assert opt.last_grad_norm == pytest.approx(expected, rel=1e-6)
    bad = grads[1].copy()
    bad[7] = np.inf
    before = p16.copy()
    assert opt.step(bad, skip_if_nonfinite=True) is False
    np.testing.assert_array_equal(p16.view(np.uint16), before.view(np.uint16))


def test_raw_bits_params_take_gradients_in_their_own_format():
    """16-bit params given as raw uint16 bits (``dtype=`` naming the format) take gradients
    in that format too, as the README says, and step exactly as params of that dtype."""
    rng = np.random.default_rng(4)
    for fmt, dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        typed = rng.standard_normal(64).astype(dtype)
        bits = typed.view(np.uint16).copy()
        a = fastopt.AdamW(bits, lr=1e-2, dtype=fmt)
        b = fastopt.AdamW(typed, lr=1e-2)
        for _ in range(3):
            g = rng.standard_normal(64).astype(dtype)
            a.step(g)
            b.step(g)
        np.testing.assert_array_equal(bits, typed.view(np.uint16))
