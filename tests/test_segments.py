"""The segment table (fastopt/segments.py) and the tensor-aware kernels over it (LAMB): the
layout, tensors of many chunks against the float64 reference, sums that do not depend on the
thread count, elements outside every tensor left alone, and the layout kept by state dicts
and checkpoints (a mismatch refused)."""

import numba
import numpy as np
import pytest

import fastopt
from fastopt import functional as F
from fastopt import reference
from fastopt.checkpoint import CheckpointError
from fastopt.segments import CHUNK, SegmentTable


def test_rows_factor_the_last_two_dims_and_chunks_split_long_tensors():
    table = SegmentTable([0, 30, 40, 100], [(2, 3, 5), (4,), (), (3 * CHUNK + 5,)],
                         100 + 3 * CHUNK + 5)
    assert table.rows[:, :4].tolist() == [[0, 2, 3, 5], [30, 1, 1, 4], [40, 1, 1, 1],
                                          [100, 1, 3 * CHUNK + 5, 1]][:3] + [[100, 1, 1,
                                                                              3 * CHUNK + 5]]
    # each tensor's chunks, in order; the long one in four, none spanning two tensors
    assert table.rows[:, 4:].tolist() == [[0, 1], [1, 2], [2, 3], [3, 7]]
    assert table.chunks[3:].tolist() == [[100 + i * CHUNK, min(100 + (i + 1) * CHUNK,
                                                                100 + 3 * CHUNK + 5), 3]
                                         for i in range(4)]
    empty = SegmentTable([0, 0], [(0, 3), (2,)], 2)
    assert empty.chunks.tolist() == [[0, 0, 0], [0, 2, 1]]  # an empty tensor: one empty chunk


@pytest.mark.parametrize("offsets,shapes,size,match", [
    ([0, 5], [(6,), (2,)], 10, "inside the one before"),
    ([0], [(11,)], 10, "past the buffer"),
    ([0, 1], [(1,)], 10, "offsets for"),
    ([], [], 10, "at least one"),
    ([0], [(-1,)], 10, "negative"),
])
def test_bad_tables_are_refused(offsets, shapes, size, match):
    with pytest.raises(ValueError, match=match):
        SegmentTable(offsets, shapes, size)


def _flat(rng, shapes):
    return fastopt.FlatBuffer([np.asarray(rng.standard_normal(s), np.float32) for s in shapes])


def _reference_run(fb, grads, lr, steps, **h):
    p = fb.buffer.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    spans = [(o, int(np.prod(s))) for o, s in zip(fb.offsets, fb.shapes, strict=True)]
    for k in range(1, steps + 1):
        p, m, v = reference.lamb(p, grads[k - 1], m, v, step=k, lr=lr, segments=spans, **h)
    return p


def test_tensors_of_many_chunks_equal_the_reference():
    rng = np.random.default_rng(0)
    shapes = [(3 * CHUNK + 17,), (300, 200), (5,), ()]
    fb = _flat(rng, shapes)
    start = fb.buffer.copy()
    grads = [rng.standard_normal(fb.buffer.size).astype(np.float32) for _ in range(30)]
    for g in grads:  # (no gradient in the gaps between views, as a FlatBuffer's grads)
        for o, s in zip(fb.offsets, fb.shapes, strict=True):
            g[o + int(np.prod(s)):o + int(np.prod(s)) + (-int(np.prod(s))) % 16] = 0.0
    opt = fastopt.LAMB(fb, lr=1e-2, weight_decay=0.1)
    for g in grads:
        opt.step(g)
    want = _reference_run(fastopt.FlatBuffer([start[o:o + int(np.prod(s))].reshape(s)
                                              for o, s in zip(fb.offsets, fb.shapes,
                                                              strict=True)]),
                          grads, 1e-2, 30, weight_decay=0.1)
    np.testing.assert_allclose(fb.buffer, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sums_do_not_depend_on_the_thread_count():
    """Each chunk's partial sum goes to its own slot and each tensor adds its chunks in order:
    one thread and all threads give the same bits."""
    shapes = [(4 * CHUNK + 3,), (257, 129)]
    results = []
    threads = numba.get_num_threads()
    assert threads > 1, "this test needs two Numba threads"
    size = _flat(np.random.default_rng(1), shapes).buffer.size
    grads = [np.random.default_rng(k).standard_normal(size).astype(np.float32)
             for k in range(5)]
    for count in (1, threads):
        numba.set_num_threads(count)
        try:
            fb = _flat(np.random.default_rng(1), shapes)
            opt = fastopt.LAMB(fb, lr=1e-2, weight_decay=0.05)
            for g in grads:
                opt.step(g)
            results.append(fb.buffer.copy())
        finally:
            numba.set_num_threads(threads)
    np.testing.assert_array_equal(results[0], results[1])


def test_elements_outside_every_tensor_are_not_touched():
    rng = np.random.default_rng(2)
    p = rng.standard_normal(100).astype(np.float32)
    before = p.copy()
    table = SegmentTable([10, 50], [(5, 4), (20,)], 100)
    opt = fastopt.LAMB(p, lr=0.1, segments=table)
    for _ in range(3):
        opt.step(rng.standard_normal(100).astype(np.float32))
    outside = np.ones(100, bool)
    outside[10:30] = outside[50:70] = False
    np.testing.assert_array_equal(p[outside], before[outside])
    assert (p[~outside] != before[~outside]).all()
    assert (opt.state["exp_avg"][outside] == 0).all()


def test_layouts_are_required_and_checked():
    p = np.zeros(10, np.float32)
    with pytest.raises(TypeError, match="FlatBuffer, or segments="):
        fastopt.LAMB(p)
    with pytest.raises(TypeError, match="unexpected keyword argument 'segments'"):
        fastopt.AdamW(p, segments=[(10,)])
    with pytest.raises(ValueError, match="6 elements in all for a buffer of 10"):
        fastopt.LAMB(p, segments=[(2, 3)])
    with pytest.raises(TypeError, match="segments must be"):
        fastopt.LAMB(p, segments=10)
    m, v = np.zeros(10, np.float32), np.zeros(10, np.float32)
    with pytest.raises(TypeError, match="segments"):
        F.lamb(p, p.copy(), m, v, step=1)  # noqa  (a required keyword)
    lr = F.lamb(p, np.ones(10, np.float32), m, v, step=1, segments=[(2, 5)], lr=0.5)
    assert lr == 0.5 and (m != 0).all()


@pytest.mark.parametrize("cls", [fastopt.LAMB, fastopt.Adafactor, fastopt.Muon])
def test_a_flat_buffer_with_other_segments_is_refused(cls):
    """A FlatBuffer carries its arrays' layout: segments= for other tensors (here one tensor
    over both arrays and the padding between them) is refused, the same layout accepted."""
    rng = np.random.default_rng(4)
    fb = _flat(rng, [(5, 3), (7, 4)])
    n = fb.buffer.size
    with pytest.raises(ValueError, match=r"shapes \[\[5, 3\], \[7, 4\]\] at offsets"):
        cls(fb, segments=[(1, n)] if cls is fastopt.Muon else [(n,)])
    assert cls(fb, segments=SegmentTable.of(fb)).segments == cls(fb).segments
    assert cls(fb, segments=fb).segments == SegmentTable.of(fb)


def test_state_dicts_and_checkpoints_keep_the_layout(tmp_path):
    rng = np.random.default_rng(3)
    fb = _flat(rng, [(6, 7), (9,)])
    opt = fastopt.LAMB(fb, lr=1e-2)
    opt.step(rng.standard_normal(fb.buffer.size).astype(np.float32))
    d = opt.state_dict()
    assert d["segments"] == {"offsets": fb.offsets, "shapes": [[6, 7], [9]]}
    other = fastopt.LAMB(fb.buffer.copy(), lr=1e-2, segments=[(fb.buffer.size,)])
    with pytest.raises(ValueError, match="not this optimizer's"):
        other.load_state_dict(d)
    fastopt.save(opt, tmp_path / "c.npz")
    loaded = fastopt.load(tmp_path / "c.npz", fb.buffer.copy())
    assert loaded.segments == opt.segments
    g = rng.standard_normal(fb.buffer.size).astype(np.float32)
    opt.step(g)
    loaded.step(g)
    np.testing.assert_array_equal(loaded.params, fb.buffer)
    with pytest.raises(CheckpointError, match="other offsets"):
        fastopt.load(tmp_path / "c.npz", _flat(rng, [(42,), (9,)]))


def test_factored_layout_packs_each_tensors_factors_in_order():
    """Adafactor's packed state (reference.adafactor's layout): a (2, 3, 4) tensor takes 2*3
    row values and 2*4 col values, a vector and a scalar their numel of the variance."""
    table = SegmentTable.contiguous([(2, 3, 4), (5,), (), (6, 7)])
    starts, sizes = table.factored_layout()
    assert starts.tolist() == [[0, 0, 0], [6, 8, 0], [6, 8, 5], [6, 8, 6]]
    assert sizes == (12, 15, 6)


@pytest.mark.parametrize("name", ["LAMB", "Adafactor", "Muon"])
def test_a_dict_for_other_shapes_names_the_shapes(name):
    """The layout is checked before the state's sizes, which follow from it (Adafactor said
    'row_var must be of shape (14,)' instead)."""
    rng = np.random.default_rng(0)
    fb = fastopt.FlatBuffer([rng.standard_normal((4, 6)).astype(np.float32),
                             rng.standard_normal((8, 3)).astype(np.float32)])
    opt = getattr(fastopt, name)(fb)
    opt.step(rng.standard_normal(fb.buffer.shape[0]).astype(np.float32))
    other = getattr(fastopt, name)(fastopt.FlatBuffer([np.zeros((6, 4), np.float32),
                                                       np.zeros((8, 3), np.float32)]))
    with pytest.raises(ValueError, match=r"state_dict is for tensors of shapes \[\[4, 6\]"):
        other.load_state_dict(opt.state_dict())


def test_a_nan_update_norm_spreads_over_its_tensor_as_in_optax():
    """optax's trust ratio is 1 only where a norm is exactly 0: a NaN gradient makes the
    tensor's update norm, its ratio and so the whole tensor NaN (the kernel and the
    reference had taken ratio 1, leaving one NaN element among finite ones); the other
    tensors step as usual."""
    fb = fastopt.FlatBuffer([np.ones((2, 3), np.float32), np.ones(4, np.float32)])
    g = np.full(fb.buffer.shape[0], 0.5, np.float32)
    g[1] = np.nan
    before = fb.buffer.copy()
    fastopt.LAMB(fb, lr=0.01).step(g)
    assert np.isnan(fb[0]).all() and np.isfinite(fb[1]).all()
    table = SegmentTable.of(fb)
    spans = [(o, int(np.prod(s))) for o, s in zip(table.offsets, table.shapes, strict=True)]
    p, _, _ = reference.lamb(before, g, np.zeros_like(before), np.zeros_like(before), step=1,
                             lr=0.01, segments=spans)
    np.testing.assert_array_equal(np.isnan(p), np.isnan(fb.buffer))
