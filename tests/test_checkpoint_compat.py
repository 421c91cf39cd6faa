"""Checkpoints written by fastopt before the optimizer definitions (tests/data/checkpoints_v1,
made by tests/data/make_checkpoints_v1.py with commit af88372) load, and training resumed from
them gives, bit for bit, the params and state that code reached 5 steps later."""

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
def test_v1_checkpoint_resumes_bit_identically(name):
    _, dtype = make_v1.CASES[name]
    p = np.zeros(make_v1.N, dtype)
    opt = fastopt.load(DATA / "checkpoints_v1" / f"{name}.npz", p)
    assert opt.step_count == 3 and opt.lr_scale == 0.5
    for k in range(4, 9):
        opt.step(make_v1.grads(k))
    with np.load(DATA / "checkpoints_v1" / f"{name}_after5.npz") as want:
        bits = p if p.dtype == np.float32 else p.view(np.uint16)
        np.testing.assert_array_equal(bits, want["params"])
        d = opt.state_dict()
        keys = [k for k in want.files if k.startswith("state_")]
        assert keys
        for key in keys:
            np.testing.assert_array_equal(d[key[len("state_"):]], want[key], err_msg=key)
