"""The float64 Adafactor reference (fastopt.reference.adafactor, the oracle of
fastopt.Adafactor) against torch.optim.Adafactor 2.13's for-loop path, on the GPT-2 small
and ResNet-50 shape lists with every dim divided by 8 (rounded up, at least 1): the issue's
lists and criterion (1e-5 relative), over 100 steps (50 on GPT-2's larger list), three
option sets on ResNet-50's list and the defaults on GPT-2's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from optimizer_cases import rel_error

from fastopt import reference
from fastopt.benchmark import load_shapes
from fastopt.segments import SegmentTable

torch = pytest.importorskip("torch")

OPTIONS = [{}, {"weight_decay": 0.1, "maximize": True},
           {"d": 2.0, "eps": (1e-30, 1e-2), "beta2_decay": -0.5, "lr": 3e-3}]


def _scaled(model: str) -> list[tuple[int, ...]]:
    return [tuple(max(1, -(-d // 8)) for d in shape) for shape in load_shapes(model)[1]]


# (every option set on ResNet-50's list, the defaults on GPT-2's larger one: CI's time)
@pytest.mark.parametrize("model,option", [("gpt2_small", 0), ("resnet50", 0), ("resnet50", 1),
                                          ("resnet50", 2)])
def test_reference_equals_torch_adafactor(model, option):
    shapes = _scaled(model)
    hypers = dict(OPTIONS[option])
    lr = hypers.pop("lr", 1e-2)
    eps1, eps2 = hypers.pop("eps", (None, 1e-3))
    rng = np.random.default_rng(option)
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in values]
    twin = torch.optim.Adafactor(theirs, lr=lr, eps=(eps1, eps2), foreach=False, **hypers)
    flat = np.concatenate([v.ravel() for v in values]).astype(np.float64)
    table = SegmentTable.contiguous(shapes)
    segments = list(zip(table.offsets, table.shapes, strict=True))
    starts, sizes = table.factored_layout()
    rows, cols, var = (np.zeros(k) for k in sizes)
    for k in range(1, (51 if model == "gpt2_small" else 101)):
        grads = [(rng.standard_normal(s) * rng.uniform(0.1, 3)).astype(np.float32)
                 for s in shapes]
        for p, g in zip(theirs, grads, strict=True):
            p.grad = torch.from_numpy(g)
        twin.step()
        flat, rows, cols, var = reference.adafactor(
            flat, np.concatenate([g.ravel() for g in grads]), rows, cols, var, step=k, lr=lr,
            segments=segments, eps1=eps1, eps2=eps2, **hypers)
    ours = [flat[o:o + math.prod(s)] for o, s in segments]
    assert max(rel_error(a, b.detach().numpy().ravel())
               for a, b in zip(ours, theirs, strict=True)) <= 1e-5
    # the factors too, where the table's layout says, against torch's per-param state
    for p, s, (row_at, col_at, var_at) in zip(theirs, shapes, starts, strict=True):
        state = twin.state[p]
        if len(s) >= 2:
            n_rows, n_cols = state["row_var"].numel(), state["col_var"].numel()
            assert rel_error(rows[row_at:row_at + n_rows], state["row_var"].numpy().ravel()) \
                <= 1e-5
            assert rel_error(cols[col_at:col_at + n_cols], state["col_var"].numpy().ravel()) \
                <= 1e-5
        else:
            n = state["variance"].numel()
            assert rel_error(var[var_at:var_at + n], state["variance"].numpy().ravel()) <= 1e-5


def test_an_infinite_gradient_gives_nan_as_torchs_lerp():
    """torch.lerp at weight 1 (the first step's) computes from the end: an infinite mean
    square gives NaN, which the reference follows (it gave finite junk, +-1e13, before);
    the kernels already did."""
    g = np.full(6, 0.5)
    g[1] = np.inf
    new, rows, _, _ = reference.adafactor(np.ones(6), g, np.zeros(2), np.zeros(3), np.zeros(0),
                                          step=1, lr=0.01, segments=[(0, (2, 3))])
    p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    theirs = torch.optim.Adafactor([p], lr=0.01)
    p.grad = torch.from_numpy(g.reshape(2, 3).copy())
    theirs.step()
    np.testing.assert_array_equal(np.isnan(new), np.isnan(p.detach().numpy().ravel()))
    assert np.isnan(new).all() and np.isnan(rows[0])
