"""Hardening II, silent wrong results first: consistent snapshots under concurrency, no stale
master, validated schedule tables, bounded scales, FlatBuffer padding with eps=0, validated
settable attributes, and the small items (current_lr, dtype types, pickling)."""

from __future__ import annotations

import copy
import json
import math
import pickle
import threading
import zipfile

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

N_PAR = 100_000  # above the parallel threshold: a step takes long enough to be overlapped


def grad_of(k: int, n: int = N_PAR) -> np.ndarray:
    """The k-th gradient of a deterministic sequence (k = 1, 2, ...)."""
    return np.random.default_rng(1000 + k).standard_normal(n).astype(np.float32)


def replay_states(p0: np.ndarray, steps, make) -> dict[int, dict]:
    """state_dict() and params of a fresh run after each of the wanted step counts."""
    p = p0.copy()
    opt = make(p)
    wanted, out = set(steps), {}
    for k in range(1, max(wanted) + 1):
        opt.step(grad_of(k, p.size))
        if k in wanted:
            out[k] = (opt.state_dict(), p.copy())
    if 0 in wanted:
        out[0] = (make(p0.copy()).state_dict(), p0.copy())
    return out


def make_adamw(p):
    return fastopt.AdamW(p, lr=S.warmup(S.cosine(1e-2, 100), 5), weight_decay=0.05)


# ------------------------------------------------------------------ 1. torn checkpoints


def test_snapshots_taken_while_training_are_each_of_one_step(tmp_path):
    p0 = np.random.default_rng(0).standard_normal(N_PAR).astype(np.float32)
    p = p0.copy()
    opt = make_adamw(p)
    n_steps, done = 40, threading.Event()
    snapshots, saved = [], []

    def train():  # (on until the checkpointer has saved 3 times: a loaded host is slow)
        k = 0
        while k < n_steps or (len(saved) < 3 and k < 50 * n_steps):
            k += 1
            opt.step(grad_of(k))
        done.set()

    def checkpoint():
        i = 0
        while not done.is_set():
            snapshots.append(opt.state_dict())
            path = tmp_path / f"c{i}.npz"
            fastopt.save(opt, path)
            saved.append(path)
            i += 1

    threads = [threading.Thread(target=train), threading.Thread(target=checkpoint)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(snapshots) >= 3 and len(saved) >= 3
    loaded = {}
    for path in saved:
        q = np.zeros_like(p0)
        back = fastopt.load(path, q)
        loaded[path] = (back.state_dict(), q)
    steps = {d["step"] for d in snapshots} | {d["step"] for d, _ in loaded.values()}
    truth = replay_states(p0, steps, make_adamw)
    for d in snapshots:
        want, _ = truth[d["step"]]
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(d[name], want[name], err_msg=f"step {d['step']}")
    for d, q in loaded.values():
        want, want_p = truth[d["step"]]
        np.testing.assert_array_equal(q, want_p, err_msg=f"params of step {d['step']}")
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(d[name], want[name], err_msg=f"step {d['step']}")


def test_load_state_dict_during_training_replaces_the_state_between_two_steps():
    # AdamW's moments depend on the gradients alone, and the gradient of step k is fixed:
    # whatever moment the load lands on, the final moments are those of a clean run.
    p0 = np.random.default_rng(1).standard_normal(N_PAR).astype(np.float32)
    early = replay_states(p0, [3], make_adamw)[3][0]
    p = p0.copy()
    opt = make_adamw(p)
    started, done = threading.Event(), threading.Event()

    def train():
        for _ in range(30):
            opt.step(grad_of(opt.step_count + 1))
            started.set()
        done.set()

    def load():
        started.wait()
        while not done.is_set():
            opt.load_state_dict(early)

    threads = [threading.Thread(target=train), threading.Thread(target=load)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = opt.state_dict()
    want = replay_states(p0, [final["step"]], make_adamw)[final["step"]][0]
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(final[name], want[name])


# ------------------------------------------------------------------ 2. stale master


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_load_without_master_takes_the_params_current_values(dtype):
    rng = np.random.default_rng(2)
    p32 = rng.standard_normal(64).astype(np.float32)
    float_run = fastopt.AdamW(p32, lr=0.1)
    float_run.step(rng.standard_normal(64).astype(np.float32))
    d = float_run.state_dict()
    assert "master_param" not in d

    p16 = (-np.ones(64)).astype(dtype)
    opt = fastopt.AdamW(p16, lr=0.1)
    opt.step(rng.standard_normal(64).astype(np.float32))
    p16[...] = 5.0  # the user restores their params, then the optimizer state
    opt.load_state_dict(d)
    opt.step(np.zeros(64, np.float32), grad_scale=1.0)
    # one more step of lr <= 0.1 from 5.0 (with the loaded moments): nowhere near -1
    assert np.all(np.abs(p16.astype(np.float32) - 5.0) < 0.5)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_refresh_master_after_changing_16bit_params_in_place(dtype):
    p = np.linspace(-1, 1, 256).astype(dtype)
    opt = fastopt.Adam(p, lr=0.0)
    opt.step(np.ones(256, np.float32))
    p[...] = np.arange(256).astype(dtype)
    opt.refresh_master()
    opt.step(np.ones(256, np.float32))  # lr 0: the params stay what the user wrote
    np.testing.assert_array_equal(p, np.arange(256).astype(dtype))
    fastopt.AdamW(np.ones(8, np.float32)).refresh_master()  # float32: nothing to do


# ------------------------------------------------------------------ 3. schedule tables


def _bad_tables():
    restarts = S.cosine_restarts(1e-3, 4, 2).table.copy()
    restarts[0, 6] = 0.5  # period_mult 0.5: the period walk would never end
    cosine = S.cosine(1e-3, 10).table.copy()
    cosine[0, 5] = 0.0  # zero length: 0/0
    negative = S.constant(1e-3).table.copy()
    negative[0, 3] = -1.0
    cyclic = S.cyclic(1e-3, 1e-2, 4).table.copy()
    cyclic[0, 6] = 0.0  # step_size_down 0
    late_origin = S.join([1e-3, S.cosine(1e-3, 5)], [4]).table.copy()
    late_origin[1, 2] = 10.0
    return [restarts, cosine, negative, cyclic, late_origin]


@pytest.mark.parametrize("table", _bad_tables())
def test_invalid_schedule_tables_are_refused_wherever_they_enter(table, tmp_path):
    with pytest.raises(ValueError, match="schedule table"):
        fastopt.Schedule(table, "crafted")
    p = np.ones(32, np.float32)
    opt = fastopt.Adam(p, lr=1e-3)
    d = opt.state_dict()
    d["schedule"] = table
    with pytest.raises(ValueError, match="schedule table"):
        opt.load_state_dict(d)
    assert opt.schedule == S.constant(1e-3)
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    _rewrite(path, schedule=table)
    with pytest.raises(fastopt.CheckpointError):
        fastopt.load(path, np.ones(32, np.float32))


def test_every_constructor_makes_a_valid_table():
    made = [S.constant(1e-3), S.linear(1e-3, 10), S.linear_lr(1e-3), S.polynomial(1, 5, 2.0),
            S.inverse_time(1, 3, 0.5, True), S.exponential(1, 0.9, 2), S.step(1, 3),
            S.multistep(1, [0, 2, 2, 5]), S.ladder(1, 0.1, 2), S.cosine(1, 7),
            S.cosine_restarts(1, 3, 3), S.cyclic(0.1, 1, 3, 2, "exp_range", 0.9),
            S.one_cycle(1, 10), S.one_cycle(1, 10, 0.5, "linear", three_phase=True),
            S.one_cycle(1, 100, pct_start=0.0), S.warmup(S.cosine(1, 5), 3, 0.1)]
    for sched in made:
        again = fastopt.Schedule(sched.table, "again")  # validation accepts its own output
        assert np.all(np.isfinite(again.at(np.arange(200)))) and np.all(again.at(
            np.arange(200)) >= 0)


def test_checkpoint_without_schedule_is_refused(tmp_path):
    opt = fastopt.Adam(np.ones(16, np.float32), lr=S.cosine(0.5, 10))
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    _rewrite(path, drop=("schedule",))
    with pytest.raises(fastopt.CheckpointError, match="schedule"):
        fastopt.load(path, np.ones(16, np.float32))


def _rewrite(path, drop=(), meta=None, **members):
    """Rewrite a checkpoint with members dropped, replaced, or meta entries changed."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(members)
    if meta:
        m = json.loads(bytes(arrays["meta"]).decode())
        m.update(meta)
        arrays["meta"] = np.frombuffer(json.dumps(m).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    assert zipfile.is_zipfile(path)


# ------------------------------------------------------------------ 4. bounded scales


def test_lr_scale_must_be_finite(tmp_path):
    p = np.ones(16, np.float32)
    opt = fastopt.AdamW(p)
    for bad in (math.inf, math.nan, -1.0, 10**400):
        with pytest.raises(ValueError, match="lr_scale"):
            opt.lr_scale = bad
    d = opt.state_dict()
    d["lr_scale"] = math.inf
    with pytest.raises(ValueError, match="lr_scale"):
        opt.load_state_dict(d)
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    _rewrite(path, meta={"lr_scale": 1e309})  # JSON Infinity
    with pytest.raises(fastopt.CheckpointError):
        fastopt.load(path, np.ones(16, np.float32))
    assert opt.lr_scale == 1.0


@pytest.mark.parametrize("grad_scale", [1e-310, 1e-39, 1e38, 1e300, math.inf, 0.0, -1.0,
                                        10**400])
def test_grad_scale_whose_inverse_is_no_normal_float32_is_refused(grad_scale):
    p = np.ones(16, np.float32)
    opt = fastopt.Adam(p)
    g = np.ones(16, np.float32)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(g, grad_scale=grad_scale, skip_if_nonfinite=True)
    with pytest.raises(ValueError, match="grad_scale"):
        fastopt.functional.adam(p, g, np.zeros(16, np.float32), np.zeros(16, np.float32),
                                step=1, grad_scale=grad_scale)
    assert opt.step_count == 0 and np.all(p == 1.0)


def test_grad_scale_at_the_edges_of_the_range_unscales_exactly():
    for scale in (2.0**-126, 2.0**120):
        p, q = np.ones(16, np.float32), np.ones(16, np.float32)
        g = np.full(16, 0.5, np.float32)
        fastopt.Adagrad(p).step((g * np.float64(scale)).astype(np.float32), grad_scale=scale)
        fastopt.Adagrad(q).step(g)
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("make", [
    lambda p: fastopt.Adam(p, lr=10**400),
    lambda p: fastopt.Adam(p, eps=10**400),
    lambda p: fastopt.Adagrad(p, lr_decay=10**400),
    lambda p: fastopt.Adadelta(p, weight_decay=-(10**400)),
])
def test_huge_python_ints_raise_value_error(make):
    with pytest.raises(ValueError):
        make(np.ones(8, np.float32))


# ------------------------------------------------------------------ 5. padding with eps=0


@pytest.mark.parametrize("make", [
    lambda p: fastopt.Adam(p, eps=0.0, weight_decay=0.1),
    lambda p: fastopt.AdamW(p, eps=0.0, amsgrad=True),
    lambda p: fastopt.Adagrad(p, eps=0.0),
    lambda p: fastopt.Adadelta(p, eps=0.0),
])
def test_flatbuffer_padding_stays_zero_with_eps_zero(make):
    rng = np.random.default_rng(5)
    shapes = [(3, 5), (7,), (2, 2, 3)]
    fb = fastopt.FlatBuffer([rng.standard_normal(s).astype(np.float32) for s in shapes])
    gb = fb.like()
    opt = make(fb)
    pad = np.ones(fb.buffer.size, bool)
    for o, s in zip(fb.offsets, shapes, strict=True):
        pad[o:o + math.prod(s)] = False
    assert pad.any()
    for _ in range(5):
        for view in gb.views:
            view[...] = rng.standard_normal(view.shape)
        opt.step(gb.buffer)
    assert np.all(fb.buffer[pad] == 0.0)
    assert np.all(np.isfinite(fb.buffer))
    for name in opt.state:
        assert np.all(opt.state[name][pad] == 0.0)


def test_eps_zero_matches_torch_where_state_is_nonzero():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    p = rng.standard_normal(100).astype(np.float32)
    t = torch.tensor(p.copy(), requires_grad=True)
    opt = fastopt.Adam(p, lr=1e-2, eps=0.0)
    ref = torch.optim.Adam([t], lr=1e-2, eps=0.0, foreach=False)
    for _ in range(10):
        g = rng.standard_normal(100).astype(np.float32)
        opt.step(g)
        t.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ 8. settable attributes


def test_max_grad_norm_is_validated_and_stored_as_a_plain_float(tmp_path):
    opt = fastopt.AdamW(np.ones(16, np.float32))
    opt.max_grad_norm = np.float32(1.0)
    assert type(opt.max_grad_norm) is float
    fastopt.save(opt, tmp_path / "c.npz")
    for bad in (-1.0, 0.0, "abc", math.nan, -math.inf):
        with pytest.raises(TypeError if bad == "abc" else ValueError, match="max_grad_norm"):
            opt.max_grad_norm = bad
    assert opt.max_grad_norm == 1.0
    opt.max_grad_norm = None
    for bad in (-1.0, "abc"):
        path = tmp_path / "c.npz"
        fastopt.save(opt, path)
        _rewrite(path, meta={"max_grad_norm": bad})
        with pytest.raises(fastopt.CheckpointError):
            fastopt.load(path, np.ones(16, np.float32))


# ------------------------------------------------------------------ small items


def test_current_lr_equals_the_lr_the_next_step_uses():
    p = np.ones(8, np.float32)
    opt = fastopt.Adam(p, lr=S.exponential(1e-2, 0.97))
    opt.lr_scale = 0.3
    for _ in range(300):
        expected = opt.current_lr
        opt.step(np.ones(8, np.float32))
        assert opt.last_lr == expected


@pytest.mark.parametrize("dtype", [np.float16, np.dtype("float16"), "float16",
                                   ml_dtypes.bfloat16, "bfloat16"])
def test_dtype_given_as_a_type_a_dtype_or_a_name(dtype):
    name = np.dtype(dtype).name if dtype != "bfloat16" else "bfloat16"
    bits = np.ones(16, dtype=np.dtype(ml_dtypes.bfloat16) if name == "bfloat16"
                   else np.float16).view(np.uint16)
    opt = fastopt.AdamW(bits, dtype=dtype)
    assert opt.dtype == name
    opt.step(np.ones(16, np.float32))


def test_flatbuffer_takes_bfloat16():
    a = np.arange(5, dtype=np.float32)
    fb = fastopt.FlatBuffer([a, a[:3]], dtype=ml_dtypes.bfloat16)
    assert fb.buffer.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(fb[0].astype(np.float32), a)
    opt = fastopt.AdamW(fb)
    grads = np.zeros(fb.buffer.size, np.float32)
    grads[:5] = 1.0
    opt.step(grads)
    assert fb.offsets == [0, 32]  # 64-byte alignment: 32 bfloat16 elements
    assert np.all(fb.buffer[5:32].astype(np.float32) == 0.0)  # padding
    assert np.all(opt.state["master_param"][:5] < a)  # bf16 params round 1 - 1e-3 to 1


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_copies_of_a_core_optimizer_are_independent_and_resume_identically(clone):
    rng = np.random.default_rng(7)
    p = rng.standard_normal(300).astype(np.float32)
    opt = fastopt.AdamW(p, lr=S.cosine(1e-2, 20), amsgrad=True, state_dtype="bfloat16")
    grads = [rng.standard_normal(300).astype(np.float32) for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
    twin = clone(opt)
    assert twin.params is not p and not np.shares_memory(twin.params, p)
    for g in grads[3:]:
        opt.step(g)
        twin.step(g)
    np.testing.assert_array_equal(twin.params, p)
    assert twin.step_count == opt.step_count == 6
    for name in opt.state:
        np.testing.assert_array_equal(twin.state[name], opt.state[name])


def test_a_state_dict_without_its_class_name_is_refused():
    """Every state_dict() names its class; one without the name is refused, not taken as
    this class's (a review found an AdamW dict loaded into Adam, its decoupled decay made
    L2, and into Lion and SGD, its state taken or dropped)."""
    p = np.ones(8, np.float32)
    saved = fastopt.AdamW(p, weight_decay=0.1)
    saved.step(np.ones(8, np.float32))
    d = saved.state_dict()
    del d["optimizer"]
    for cls in (fastopt.AdamW, fastopt.Adam, fastopt.Lion, fastopt.SGD):
        other = cls(np.ones(8, np.float32))
        with pytest.raises(KeyError, match="no 'optimizer'"):
            other.load_state_dict(d)
        assert other.step_count == 0


def test_the_last_step_count_the_kernels_take_is_refused_clearly():
    """A step count of 2**63 - 1 (loadable) cannot step again: the kernels' step number is a
    signed 64-bit int. ValueError, nothing changed (a bare OverflowError before); the
    functional layer refuses step=2**63, fastopt.torch a param at that count."""
    p = np.ones(8, np.float32)
    opt = fastopt.AdamW(p)
    d = opt.state_dict()
    d["step"] = 2**63 - 1
    opt.load_state_dict(d)
    with pytest.raises(ValueError, match="signed 64-bit"):
        opt.step(np.ones(8, np.float32))
    assert np.array_equal(p, np.ones(8, np.float32)) and opt.step_count == 2**63 - 1
    zeros = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="signed 64-bit"):
        fastopt.functional.adam(p, zeros, zeros.copy(), zeros.copy(), step=2**63, lr=0.1)
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    param = torch.nn.Parameter(torch.ones(8))
    param.grad = torch.ones(8)
    topt = fot.AdamW([param], lr=0.1)
    topt.step()
    d = topt.state_dict()
    d["state"][0]["step"] = torch.tensor(2**63 - 1)
    topt.load_state_dict(d)
    before = param.detach().clone()
    with pytest.raises(ValueError, match="signed 64-bit"):
        topt.step()
    assert torch.equal(param.detach(), before)
