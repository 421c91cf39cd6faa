"""Checkpoints written by fastopt before the optimizer definitions (tests/data/checkpoints_v1,
made by tests/data/make_checkpoints_v1.py with commit af88372) load, and training resumed from
them gives the params and state that code reached 5 steps later.

Equal to float32 rounding, not bit for bit: that code let LLVM contract a*b + c into FMAs
(which pairs it fused depended on the loop shape); the generated kernels contract nothing,
like the CUDA ones (bench/NOTES.md 20)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import fastopt

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_v1", DATA / "make_checkpoints_v1.py")
make_v1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_v1)


@pytest.mark.parametrize("name", sorted(make_v1.CASES))
def test_v1_checkpoint_resumes_as_that_code_did(name):
    _, dtype = make_v1.CASES[name]
    p = np.zeros(make_v1.N, dtype)
    opt = fastopt.load(DATA / "checkpoints_v1" / f"{name}.npz", p)
    assert opt.step_count == 3 and opt.lr_scale == 0.5
    for k in range(4, 9):
        opt.step(make_v1.grads(k))
    with np.load(DATA / "checkpoints_v1" / f"{name}_after5.npz") as want:
        saved = want["params"] if p.dtype == np.float32 else want["params"].view(p.dtype)
        _close(p, saved, "params")
        d = opt.state_dict()
        keys = [k for k in want.files if k.startswith("state_")]
        assert keys
        for key in keys:  # files of that code call the master "master_params"
            name = key[len("state_"):].replace("master_params", "master_param")
            _close(d[name], want[key], key)


def _close(a, b, what):
    """max|a - b| / max|b| <= 1e-6: a few float32 ulps (FMA contraction differences over the
    5 steps), where any real change of the math shows as >= 1e-3."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(b)), what
