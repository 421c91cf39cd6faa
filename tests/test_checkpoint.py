"""fastopt.save / fastopt.load: exact resume, no pickle, clear errors, atomic writes."""

import os
import zipfile

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

N = 1237
SCHED = S.warmup(S.cosine_restarts(1e-2, 30, 2), 10)


def grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(N).astype(np.float32) for _ in range(steps)]


MAKERS = {
    "Adam": lambda p: fastopt.Adam(p, lr=SCHED, betas=(0.8, 0.99), amsgrad=True),
    "AdamW": lambda p: fastopt.AdamW(p, lr=SCHED, weight_decay=0.3, maximize=True),
    "Adagrad": lambda p: fastopt.Adagrad(p, lr=SCHED, lr_decay=0.1, initial_accumulator_value=1),
    "Adadelta": lambda p: fastopt.Adadelta(p, lr=SCHED, rho=0.7),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_resume_from_checkpoint_is_bit_identical(name, tmp_path):
    data = grads(60)
    full_p = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    full = MAKERS[name](full_p)
    for g in data:
        full.step(g)
    p = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    opt = MAKERS[name](p)
    opt.lr_scale = 1.0
    for g in data[:25]:
        opt.step(g)
    path = tmp_path / "opt.npz"
    fastopt.save(opt, path)
    fresh = np.zeros(N, np.float32)
    resumed = fastopt.load(path, fresh)
    assert type(resumed) is type(opt) and resumed.step_count == 25
    assert resumed.defaults == opt.defaults
    np.testing.assert_array_equal(fresh, p)
    for g in data[25:]:
        resumed.step(g)
    np.testing.assert_array_equal(fresh, full_p)
    with np.load(path, allow_pickle=False) as z:  # a plain npz: no pickled objects inside
        assert "params" in z.files and "schedule" in z.files


def test_hyperparameters_lr_scale_and_clipping_survive(tmp_path):
    opt = fastopt.AdamW(np.ones(N, np.float32), lr=SCHED, weight_decay=0.2, betas=(0.7, 0.9))
    opt.lr_scale, opt.max_grad_norm = 0.25, 3.0
    opt.step(grads(1)[0])
    fastopt.save(opt, tmp_path / "c.npz")
    back = fastopt.load(tmp_path / "c.npz", np.ones(N, np.float32), optimizer=fastopt.AdamW)
    assert back.lr_scale == 0.25 and back.max_grad_norm == 3.0
    assert back.defaults["betas"] == (0.7, 0.9) and back.schedule == SCHED


def _saved(tmp_path, name="Adam"):
    p = np.ones(N, np.float32)
    opt = MAKERS[name](p)
    opt.step(grads(1)[0])
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_raises_and_changes_nothing(tmp_path, damage):
    path = _saved(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        raw = bytearray(data)
        raw[len(raw) // 3] ^= 0xFF  # inside a member's data: its CRC no longer matches
        path.write_bytes(bytes(raw))
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        path.write_bytes(b"")
    target = np.full(N, 7.0, np.float32)
    with pytest.raises(fastopt.CheckpointError):
        fastopt.load(path, target)
    assert np.all(target == 7.0)


def test_mismatches_raise_and_change_nothing(tmp_path):
    path = _saved(tmp_path)
    target = np.full(N + 1, 7.0, np.float32)
    with pytest.raises(fastopt.CheckpointError, match="1238"):
        fastopt.load(path, target)
    target = np.full(N, 7.0, np.float32)
    with pytest.raises(fastopt.CheckpointError, match="Adam checkpoint, not Adagrad"):
        fastopt.load(path, target, optimizer="Adagrad")
    # an optimizer instance for the class: a TypeError saying what to pass (the message was
    # "holds a Adam checkpoint, not Adam(...)")
    with pytest.raises(TypeError, match=r"optimizer=fastopt\.Adam\)"):
        fastopt.load(path, target, optimizer=fastopt.Adam(np.zeros(3, np.float32)))
    assert np.all(target == 7.0)
    # a newer format version
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = bytes(arrays["meta"]).decode().replace('"version": 1', '"version": 2')
    arrays["meta"] = np.frombuffer(meta.encode(), np.uint8)
    np.savez(tmp_path / "v2.npz", **arrays)
    with pytest.raises(fastopt.CheckpointError, match="version 2"):
        fastopt.load(tmp_path / "v2.npz", target)
    # a state buffer of the wrong size
    arrays["meta"] = np.frombuffer(meta.replace('"version": 2', '"version": 1').encode(),
                                   np.uint8)
    arrays["exp_avg"] = arrays["exp_avg"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(fastopt.CheckpointError, match="exp_avg"):
        fastopt.load(tmp_path / "bad.npz", target)
    assert np.all(target == 7.0)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = path.read_bytes()
    opt = fastopt.Adam(np.ones(N, np.float32))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        fastopt.save(opt, path)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temp file left behind
    assert zipfile.is_zipfile(path)
