"""Factored statistics (fastopt/cpu/factored.py over SegmentTable.row_blocks): the row and
column sums of g^2 of every tensor of 2 or more dims, the layout Adafactor's packed
``row_var``/``col_var`` state takes, against numpy in float64; the same bits serial and
parallel; the block table's invariants."""

import math

import numpy as np
import pytest

from fastopt import _bf16
from fastopt._checks import FORMATS
from fastopt.cpu.convert import BF16, FP16
from fastopt.cpu.factored import factored_square_sums
from fastopt.segments import CHUNK, ROW_BLOCKS, SegmentTable

#: vectors and scalars (not factored), batched matrices, a matrix of several blocks, a wide
#: single row, an empty matrix, a tall thin one of more rows than ROW_BLOCKS
SHAPES = [(5,), (7, 3), (), (2, 3, 4), (300, 250), (1, 40_000), (3, 0), (2, 1, 5),
          (5000, 9), (3000, 4, 3)]


def _table(shapes):
    gap = 3  # (elements between the tensors: never read)
    offsets, at = [], 0
    for s in shapes:
        offsets.append(at)
        at += math.prod(s) + gap
    return SegmentTable(offsets, shapes, at)


def test_row_blocks_cover_each_matrix_once_in_order():
    """Every row of every non-empty matrix in exactly one block, in order; a matrix of CHUNK
    or more elements in its own blocks (at most ROW_BLOCKS, each with a partial), smaller
    ones whole and grouped (no partial); the partials packed in block order."""
    table = _table([*SHAPES, (40, 3, 3), (3, 20_000)])
    blocks, size = table.row_blocks()
    seen = {}
    for s, first, stop, at in blocks.tolist():
        shape = table.shapes[s]
        rows, cols = shape[-2], shape[-1]
        assert len(shape) >= 2 and cols > 0 and first < stop
        if rows * cols >= CHUNK:
            assert first // rows == (stop - 1) // rows and at >= 0  # (within one matrix)
        else:
            assert first % rows == 0 and stop % rows == 0 and at == -1  # (whole matrices)
            assert (stop - first) * cols <= max(CHUNK, rows * cols)
        seen.setdefault(s, []).append((first, stop, at))
    factored = [i for i, s in enumerate(table.shapes) if len(s) >= 2 and math.prod(s)]
    assert sorted(seen) == factored
    at = 0
    for s in sorted(seen):
        shape = table.shapes[s]
        assert seen[s][0][0] == 0 and seen[s][-1][1] == math.prod(shape[:-1])
        assert all(a[1] == b[0] for a, b in zip(seen[s][:-1], seen[s][1:], strict=True))
        if shape[-2] * shape[-1] >= CHUNK:
            for _, _, offset in seen[s]:
                assert offset == at
                at += shape[-1]
            per_matrix = len(seen[s]) // math.prod(shape[:-2])
            assert per_matrix == max(1, min(ROW_BLOCKS, shape[-2],
                                            -(-shape[-2] * shape[-1] // CHUNK)))
    assert size == at
    assert len([b for b in blocks.tolist() if b[0] == len(SHAPES)]) == 1  # (40 3x3s: one)


def _reference(table, g, factor):
    layout, (n_rows, n_cols, _) = table.factored_layout()
    rows, cols = np.full(n_rows, np.nan), np.full(n_cols, np.nan)
    for s, (offset, shape) in enumerate(zip(table.offsets, table.shapes, strict=True)):
        if len(shape) < 2:
            continue
        batch, r, c = math.prod(shape[:-2]), shape[-2], shape[-1]
        g3 = (factor * g[offset:offset + batch * r * c].astype(np.float64)).reshape(batch, r, c)
        rows[layout[s, 0]:layout[s, 0] + batch * r] = (g3 * g3).sum(axis=2).ravel()
        cols[layout[s, 1]:layout[s, 1] + batch * c] = (g3 * g3).sum(axis=1).ravel()
    return rows, cols


def _run(table, grads, fmt, factor, parallel):
    layout, (n_rows, n_cols, _) = table.factored_layout()
    blocks, size = table.row_blocks()
    rows, cols = np.full(n_rows, np.nan), np.full(n_cols, np.nan)
    factored_square_sums(grads, fmt, factor, table.rows, layout, blocks, rows,
                         np.full(size, np.nan), cols, parallel)
    return rows, cols


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16"])
def test_row_and_column_sums_equal_numpy(fmt):
    table = _table(SHAPES)
    rng = np.random.default_rng(4)
    g = (rng.standard_normal(table.size) * rng.uniform(0.1, 10)).astype(np.float32)
    if fmt == "float32":
        grads, code, values = g, FP16, g
    elif fmt == "bfloat16":
        grads = _bf16.encode(g)
        code, values = BF16, _bf16.decode(grads)
    else:
        grads = g.astype(np.float16).view(np.uint16)
        code, values = FP16, g.astype(np.float16).astype(np.float32)
    want_rows, want_cols = _reference(table, values, -1.5)
    for parallel in (False, True):
        rows, cols = _run(table, grads, code, -1.5, parallel)
        np.testing.assert_allclose(rows, want_rows, rtol=1e-12)
        np.testing.assert_allclose(cols, want_cols, rtol=1e-12)


def test_the_sums_do_not_depend_on_the_thread_count():
    table = _table(SHAPES)
    g = np.random.default_rng(5).standard_normal(table.size).astype(np.float32)
    serial = _run(table, g, FP16, 1.0, False)
    parallel = _run(table, g, FP16, 1.0, True)
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_finite_gradients_reach_their_row_and_column_only():
    table = _table([(4, 6), (3, 3)])
    g = np.ones(table.size, np.float32)
    g[table.offsets[0] + 1 * 6 + 2] = np.inf  # row 1, column 2 of the first matrix
    rows, cols = _run(table, g, FP16, 1.0, True)
    assert np.isinf(rows[1]) and np.isfinite(np.delete(rows, 1)).all()
    assert np.isinf(cols[2]) and np.isfinite(np.delete(cols, 2)).all()


# ------------------------------------------------------------------ Adafactor's kernel

def _scaled(model: str) -> list[tuple[int, ...]]:
    from fastopt.benchmark import load_shapes

    return [tuple(max(1, -(-d // 8)) for d in shape) for shape in load_shapes(model)[1]]


#: torch.optim.Adafactor's arguments: the defaults, decay with maximize, and the rest
ADAFACTOR_OPTIONS = [{}, {"weight_decay": 0.1, "maximize": True},
                     {"d": 2.0, "eps1": 1e-30, "eps2": 1e-2, "beta2_decay": -0.5}]


@pytest.mark.parametrize("option", range(len(ADAFACTOR_OPTIONS)))
@pytest.mark.parametrize("model", ["gpt2_small", "resnet50"])
def test_generated_adafactor_kernel_equals_the_reference(model, option):
    """The Numba kernel generated from fastopt/algorithms/_adafactor.py (before its layers
    exist: called with its arguments directly) against fastopt.reference.adafactor, itself
    checked against torch.optim.Adafactor: params and every factor within 2e-6 after 10
    steps on the issue's scaled shape lists, parallel and serial alike."""
    from optimizer_cases import rel_error

    from fastopt import reference
    from fastopt.cpu.ops.adafactor import adafactor
    from fastopt.schedules import constant

    hyp = {"beta2_decay": -0.8, "eps1": None, "eps2": 1e-3, "d": 1.0, "weight_decay": 0.0,
           "maximize": False, **ADAFACTOR_OPTIONS[option]}
    table = SegmentTable.contiguous(_scaled(model))
    layout, (n_rows, n_cols, n_var) = table.factored_layout()
    blocks, size = table.row_blocks()
    factored = np.array([len(s) >= 2 for s in table.shapes], np.int64)
    rng = np.random.default_rng(option)
    params = rng.standard_normal(table.size).astype(np.float32)
    want = params.astype(np.float64)
    state = [np.zeros(k, np.float32) for k in (n_rows, n_cols, n_var)]
    want_state = [np.zeros(k) for k in (n_rows, n_cols, n_var)]
    eps1 = float(np.finfo(np.float32).eps) if hyp["eps1"] is None else hyp["eps1"]
    slots = [hyp["beta2_decay"], eps1, hyp["eps2"], hyp["d"], 0.0, 0.0, 0.0, 0.0]
    none, scalar = np.zeros(1, np.float32), np.zeros(1)
    work = (np.zeros((table.chunks.shape[0], 2)), np.zeros((len(table), 4)), none, layout,
            factored, blocks, np.zeros(n_rows), np.zeros(size), np.zeros(n_cols),
            np.zeros(n_rows, np.float32))
    lr, schedule = 1e-2, constant(1e-2).table
    segments = list(zip(table.offsets, table.shapes, strict=True))
    for k in range(1, 11):
        g = (rng.standard_normal(table.size) * rng.uniform(0.1, 3)).astype(np.float32)
        # (float32 params' format and an int step, the types the library passes: the
        # specialisation the layers' tests compile too, not one of this test's own)
        adafactor(params, none, *state, none, scalar, scalar, scalar, scalar,
                  hyp["weight_decay"], False, hyp["maximize"], *slots, FORMATS["float32"],
                  None, table.rows, table.chunks, *work, g, schedule, k, 1.0, 1.0, 0,
                  k % 2 == 0)
        want, *want_state = reference.adafactor(
            want, g, *want_state, step=k, lr=lr, segments=segments,
            beta2_decay=hyp["beta2_decay"], eps1=hyp["eps1"], eps2=hyp["eps2"], d=hyp["d"],
            weight_decay=hyp["weight_decay"], maximize=hyp["maximize"])
    assert rel_error(params, want) <= 2e-6
    for ours, theirs in zip(state, want_state, strict=True):
        assert rel_error(ours, theirs) <= 2e-6
