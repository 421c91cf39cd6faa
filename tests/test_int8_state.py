"""int8 optimizer state (state_dtype="int8"): the codes, their error bounds and edge cases,
the kernels against the float32-state kernels step by step, stochastic rounding where
deterministic rounding stalls, resume, the functional layer, checkpoints, and convergence
against float32 state for every optimizer that takes it."""

import numpy as np
import pytest
from numba import njit
from optimizer_cases import CASES, logistic_problem, make, schedule_for

import fastopt
from fastopt import Int8State, _int8
from fastopt import functional as F
from fastopt import schedules as S
from fastopt._int8 import INT8_BLOCK, dequantize, quantize
from fastopt.algorithms import REGISTRY
from fastopt.cpu import int8 as cpu_int8

INT8 = sorted(name for name, d in REGISTRY.items() if d.int8_refusal is None)
N = 2 * INT8_BLOCK + 77  # (a partial last block)


def _valid_codes(signed: bool) -> np.ndarray:
    """Every code that decodes to a value the encoder can produce (0, and the magnitudes of
    the smallest binade up to 1.0), with the sign bit for a signed state."""
    one = cpu_int8.SIGNED_ONE if signed else cpu_int8.NONNEGATIVE_ONE
    magnitudes = np.array([0, *range(cpu_int8.SMALLEST, one + 1)], dtype=np.uint8)
    return np.concatenate([magnitudes, magnitudes[1:] | np.uint8(0x80)]) if signed \
        else magnitudes


@njit
def _numba_codes(y, rand, signed):
    out = np.empty(y.shape[0], np.uint8)
    for i in range(y.shape[0]):
        out[i] = cpu_int8.encode_signed(y[i], rand) if signed \
            else cpu_int8.encode_nonnegative(y[i], rand)
    return out


@njit
def _numba_values(codes, signed):
    out = np.empty(codes.shape[0], np.float32)
    for i in range(codes.shape[0]):
        out[i] = cpu_int8.decode_signed(codes[i]) if signed \
            else cpu_int8.decode_nonnegative(codes[i])
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_round_trips_and_the_two_implementations_agree(signed):
    codes = _valid_codes(signed)
    state = Int8State(codes, np.ones(_int8.blocks(codes.size), np.float32))
    values = dequantize(state, signed)
    np.testing.assert_array_equal(_numba_values(codes, signed), values)
    assert values.max() == 1.0 and (values.min() == -1.0 if signed else values.min() == 0.0)
    again = quantize(values, signed)
    if codes.size > INT8_BLOCK:  # (the second block's absmax is its own)
        again = quantize(np.concatenate([values[:INT8_BLOCK], values[INT8_BLOCK:]]), signed)
    np.testing.assert_array_equal(dequantize(again, signed), values)
    # the Numba encoder, rounding half up, equals the host's on values between the codes
    # (every block holding 1.0: its absmax, so the values are the y the encoders see)
    y = np.random.default_rng(1).uniform(-1 if signed else 0, 1, 80 * INT8_BLOCK)
    y = y.astype(np.float32)
    y[::INT8_BLOCK] = 1.0
    np.testing.assert_array_equal(_numba_codes(y, np.uint32(cpu_int8.HALF), signed),
                                  quantize(y, signed).codes)


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_error_is_within_half_a_code_step(signed):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(50 * INT8_BLOCK + 13)
         * 10.0 ** rng.uniform(-8, 3, 50 * INT8_BLOCK + 13)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    got = dequantize(quantize(x, signed), signed)
    absmax = np.repeat(quantize(x, signed).absmax, INT8_BLOCK)[:x.size]
    big = np.abs(x) >= _int8.smallest(signed) * absmax
    bound = 2.0 ** -(cpu_int8.INT8_MANTISSA_BITS + 1) * np.abs(x) * (1 + 1e-6)
    assert np.all(np.abs(got - x)[big] <= bound[big])
    assert np.all(np.abs(got - x)[~big] <= _int8.smallest(signed) * absmax[~big])
    assert np.all(np.sign(got[big]) == np.sign(x[big]))


@pytest.mark.parametrize("n", [0, 1, INT8_BLOCK - 1, INT8_BLOCK, INT8_BLOCK + 1, 3 * INT8_BLOCK])
def test_lengths_that_are_not_a_multiple_of_the_block(n):
    x = np.linspace(-3, 5, n).astype(np.float32)
    q = quantize(x, True)
    assert q.codes.shape == (n,) and q.absmax.shape == (_int8.blocks(n),)
    assert q.nbytes == n + 4 * _int8.blocks(n)  # 1 + 4/256 B per element
    np.testing.assert_allclose(dequantize(q, True), x, rtol=2.0 ** -4, atol=1e-30)


def test_edge_blocks_zero_huge_nan_inf_and_subnormal():
    x = np.ones(6 * INT8_BLOCK, np.float32)
    x[:INT8_BLOCK] = 0.0  # block 0: all zeros
    x[INT8_BLOCK + 3] = 1e30  # block 1: one huge value, the rest 1e-30 of it
    x[2 * INT8_BLOCK + 5] = np.nan  # block 2: a NaN
    x[3 * INT8_BLOCK + 7] = -np.inf  # block 3: an inf
    x[4 * INT8_BLOCK:5 * INT8_BLOCK] = 1e-39  # block 4: subnormal values
    q = quantize(x, True)
    got = dequantize(q, True)
    assert np.all(got[:INT8_BLOCK] == 0) and q.absmax[0] == 0
    assert got[INT8_BLOCK + 3] == 1e30 and np.all(got[INT8_BLOCK:INT8_BLOCK + 3] == 0)
    assert np.all(np.isnan(got[2 * INT8_BLOCK:3 * INT8_BLOCK]))  # a NaN poisons its block
    assert not np.any(np.isfinite(got[3 * INT8_BLOCK:4 * INT8_BLOCK]))  # so does an inf
    assert np.all(got[4 * INT8_BLOCK:5 * INT8_BLOCK] == 0) and q.absmax[4] == 0
    np.testing.assert_array_equal(got[5 * INT8_BLOCK:], 1.0)  # the others are untouched


def _start(name, cls, hypers, rng):
    """An optimizer of each state format over the same params, the int8 one's state moved
    away from its start by a few steps, the float32 one's set to its decoded values."""
    d = REGISTRY[name]
    schedule = schedule_for(name, S.cosine(0.02, 50))
    p0 = rng.standard_normal(N).astype(np.float32)
    a, b = p0.copy(), p0.copy()
    full = make(cls, a, lr=schedule, **hypers)
    small = make(cls, b, lr=schedule, state_dtype="int8", **hypers)
    for _ in range(3):
        g = rng.standard_normal(N).astype(np.float32)
        small.step(g)
    a[...] = b
    state = small.state_dict()
    full.load_state_dict({k: v for k, v in state.items()
                          if not k.endswith(("_codes", "_absmax")) and k != "int8_code_version"})
    return d, a, b, full, small


@pytest.mark.parametrize("name", INT8)
def test_int8_step_equals_the_float32_step_from_the_decoded_state(name):
    """One step: the params equal (bit for bit) those of the float32-state kernel started from
    the decoded state, and the new state is within one code step of that kernel's."""
    rng = np.random.default_rng(3)
    for cls, hypers in CASES[name].options:
        d, a, b, full, small = _start(name, cls, hypers, rng)
        for _ in range(2):
            g = rng.standard_normal(N).astype(np.float32)
            full.step(g)
            small.step(g)
            np.testing.assert_array_equal(b, a)
            want, got = full.state_dict(), small.state_dict()
            for key in small.state:
                absmax = np.repeat(small.state[key].absmax, INT8_BLOCK)[:N]
                signed = _int8.signed(d, key)
                bound = 2.0 ** -3 * np.abs(want[key]) + _int8.smallest(signed) * absmax
                assert np.all(np.abs(got[key] - want[key]) <= bound * (1 + 1e-5)), (cls, key)
            full.load_state_dict({k: v for k, v in got.items() if k in want})  # go on from
            # the same state


def test_stochastic_rounding_keeps_small_increments_that_nearest_rounding_loses():
    """Adagrad's sum: in each block one element holds 4 (the absmax, no gradient), the others
    start at 1 and grow by g^2 = 1e-3 a step: each increment is 1/30 of their code step.
    Rounding to nearest would keep them at 1 for ever; the kernel's stochastic rounding is
    unbiased, so they follow the exact 1 + 1e-3 k on average."""
    n, steps = 8 * INT8_BLOCK, 300
    top = np.arange(n) % INT8_BLOCK == 0
    start = np.where(top, 4.0, 1.0).astype(np.float32)
    opt = fastopt.Adagrad(np.zeros(n, np.float32), lr=0.0, state_dtype="int8")
    saved = {k: v for k, v in opt.state_dict().items() if not k.startswith("sum_")}
    opt.load_state_dict({**saved, "sum": start})  # (the float values: without the raw form)
    g = np.where(top, 0.0, np.sqrt(1e-3)).astype(np.float32)
    nearest = quantize(start, False)
    for _ in range(steps):
        opt.step(g)
        nearest = quantize(dequantize(nearest, False) + g * g, False)
    exact = 1.0 + 1e-3 * steps
    got = opt.state_dict()["sum"][~top]
    assert np.all(dequantize(nearest, False)[~top] == 1.0)  # stalled
    assert abs(got.mean() - exact) < 0.01 * exact, got.mean()  # tracks the exact sum
    assert np.all(opt.state_dict()["sum"][top] == 4.0)


@pytest.mark.parametrize("name", INT8)
def test_resume_is_bit_identical(name, tmp_path):
    cls, hypers = CASES[name].options[-1]
    rng = np.random.default_rng(5)
    schedule = schedule_for(name, S.cosine(0.02, 50))
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(12)]
    a = p0.copy()
    whole = make(cls, a, lr=schedule, state_dtype="int8", **hypers)
    for g in grads:
        whole.step(g)
    b = p0.copy()
    part = make(cls, b, lr=schedule, state_dtype="int8", **hypers)
    for g in grads[:5]:
        part.step(g)
    fastopt.save(part, tmp_path / "s.npz")
    c = np.zeros(N, np.float32)
    resumed = fastopt.load(tmp_path / "s.npz", c)
    copy = make(cls, b.copy(), lr=schedule, state_dtype="int8", **hypers)
    copy.load_state_dict(part.state_dict())  # the state dict's raw form, too
    for g in grads[5:]:
        resumed.step(g)
        copy.step(g)
    np.testing.assert_array_equal(c, a)
    np.testing.assert_array_equal(copy.params, a)
    for key in whole.state:
        np.testing.assert_array_equal(resumed.state[key].codes, whole.state[key].codes)
        np.testing.assert_array_equal(resumed.state[key].absmax, whole.state[key].absmax)


def test_state_dicts_load_across_state_formats():
    rng = np.random.default_rng(6)
    p = rng.standard_normal(N).astype(np.float32)
    small = fastopt.AdamW(p.copy(), state_dtype="int8")
    for _ in range(3):
        small.step(rng.standard_normal(N).astype(np.float32))
    d = small.state_dict()
    assert d["exp_avg"].dtype == np.float32 and d["exp_avg_codes"].dtype == np.uint8
    assert d["exp_avg_absmax"].shape == (_int8.blocks(N),) and d["int8_code_version"] == 1
    full = fastopt.AdamW(p.copy())
    full.load_state_dict(d)  # the raw form decoded
    np.testing.assert_array_equal(full.state["exp_avg"], small.state["exp_avg"].decode(True))
    back = fastopt.AdamW(p.copy(), state_dtype="int8")
    back.load_state_dict(full.state_dict())  # float32 values quantised
    np.testing.assert_array_equal(back.state["exp_avg"].codes, small.state["exp_avg"].codes)
    with pytest.raises(ValueError, match="code version"):
        back.load_state_dict({**d, "int8_code_version": 2})
    with pytest.raises(KeyError, match="without the other"):
        back.load_state_dict({k: v for k, v in d.items() if k != "exp_avg_absmax"})
    with pytest.raises(fastopt.ArrayArgumentError, match="uint8"):
        back.load_state_dict({**d, "exp_avg_codes": d["exp_avg_codes"][:-1]})
    np.testing.assert_array_equal(back.state["exp_avg"].codes, small.state["exp_avg"].codes)


def test_functional_layer_takes_int8_state():
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(4)]
    a, b = p0.copy(), p0.copy()
    opt = fastopt.AdamW(a, lr=1e-2, state_dtype="int8")
    m, v = Int8State.zeros(N), Int8State.zeros(N)
    for k, g in enumerate(grads, start=1):
        opt.step(g)
        F.adamw(b, g, m, v, step=k, lr=1e-2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.codes, opt.state["exp_avg"].codes)
    with pytest.raises(fastopt.ArrayArgumentError, match="one format"):
        F.adamw(b, grads[0], m, np.zeros(N, np.float32), step=5)
    with pytest.raises(fastopt.ArrayArgumentError, match="absmax must have"):
        F.adamw(b, grads[0], m, Int8State(v.codes, v.absmax[:-1]), step=5)
    with pytest.raises(fastopt.ArrayArgumentError, match="share memory|overlap"):
        F.adamw(b, grads[0], m, Int8State(v.codes, m.absmax), step=5)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - set(INT8)))
def test_the_others_refuse_int8_state_saying_why(name):
    cls, hypers = CASES[name].options[0]
    with pytest.raises(ValueError, match="int8|8 bits|float32 state only"):
        make(cls, np.zeros(64, np.float32), lr=1e-3, state_dtype="int8", **hypers)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        fastopt.AdamW(np.zeros(4, np.float32), state_dtype="int4")


#: per optimizer: its lr on the logistic regression (a schedule where it takes one)
LOGISTIC_LR = {"adadelta": 5.0, "adagrad": 0.3, "sgd": 0.5, "rprop": 0.01, "lion": 0.005,
               "nadam": 0.1}


@pytest.mark.parametrize("name", INT8)
def test_logistic_regression_ends_within_1_percent_of_float32_state(name):
    loss_and_grad = logistic_problem()
    cls, hypers = CASES[name].options[0]
    lr = LOGISTIC_LR.get(name, 0.05)
    losses = {}
    for state_dtype in ("float32", "int8"):
        w = np.zeros(50, np.float32)
        opt = make(cls, w, lr=schedule_for(name, S.cosine(lr, 300)), state_dtype=state_dtype,
                   **hypers)
        for _ in range(300):
            opt.step(loss_and_grad(w)[1])
        losses[state_dtype] = loss_and_grad(w)[0]
    assert losses["float32"] < 0.45, losses  # it learned (chance is 0.69)
    assert losses["int8"] == pytest.approx(losses["float32"], rel=0.01), losses


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))


def test_fastopt_torch_int8_state_dicts_and_copies():
    torch = pytest.importorskip("torch")
    import copy

    import fastopt.torch as fot

    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    losses = {}
    for state_dtype in ("float32", "int8"):
        model = _mlp()
        opt = fot.AdamW(model.parameters(), lr=1e-2, state_dtype=state_dtype)
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses[state_dtype] = loss.item()
    assert losses["int8"] == pytest.approx(losses["float32"], rel=0.05)
    live = opt.state[model[0].weight]
    assert live["exp_avg"].dtype == torch.uint8 and live["exp_avg"].shape == (300, 20)
    assert live["exp_avg_absmax"].shape == (_int8.blocks(6000),)
    d = opt.state_dict()
    entry = d["state"][0]
    assert entry["exp_avg"].dtype == torch.float32 and entry["int8_code_version"] == 1
    assert torch.equal(entry["exp_avg_codes"], live["exp_avg"])
    # into torch.optim (the float values), and back from torch's dict (quantised)
    theirs = torch.optim.AdamW(_mlp().parameters(), lr=1e-2)
    theirs.load_state_dict(d)
    twin = _mlp()
    again = fot.AdamW(twin.parameters(), lr=1e-2, state_dtype="int8")
    again.load_state_dict(theirs.state_dict())  # (torch cast the codes to float32: taken)
    assert torch.equal(again.state[twin[0].weight]["exp_avg"], live["exp_avg"])
    plain = fot.AdamW(_mlp().parameters(), lr=1e-2)
    plain.load_state_dict(d)
    assert plain.state_dict()["state"][0]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(plain.state_dict()["state"][0]["exp_avg"], entry["exp_avg"])
    twin_copy = copy.deepcopy(opt)
    for a, b in zip(twin_copy.param_groups[0]["params"], model.parameters(), strict=True):
        assert torch.equal(twin_copy.state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])
        assert torch.equal(twin_copy.state[a]["exp_avg_sq_absmax"],
                           opt.state[b]["exp_avg_sq_absmax"])
    # a param without a gradient: the others step one at a time (their own blocks)
    model[2].bias.grad = None
    before = model[2].bias.detach().clone()
    opt.step()
    assert torch.equal(model[2].bias.detach(), before)
    with pytest.raises(ValueError, match="int8"):
        fot.LAMB(_mlp().parameters(), state_dtype="int8")


def test_a_small_state_beside_a_large_one_grows_instead_of_staying_zero():
    """Values below the smallest code (2^-30 of the block's absmax for a second moment) round
    up to that code, so an accumulator fed tiny gradients beside a huge one grows (a little
    faster than the exact sum) instead of staying 0: the params follow float32 state's (they
    moved 20x too far when such values were set to 0)."""
    moved = {}
    for state_dtype in ("float32", "int8"):
        p = np.zeros(INT8_BLOCK, np.float32)
        opt = fastopt.Adagrad(p, lr=0.01, state_dtype=state_dtype)
        g = np.full(INT8_BLOCK, 1e-5, np.float32)
        g[0] = 1.0
        opt.step(g)
        g[0] = 0.0
        for _ in range(1999):
            opt.step(g)
        moved[state_dtype] = p[1:]
    # (5 % more on average: the noisy sum under a square root, Jensen; it was 20x before)
    assert np.mean(moved["int8"]) == pytest.approx(np.mean(moved["float32"]), rel=0.1)
    np.testing.assert_allclose(moved["int8"], moved["float32"], rtol=0.6)  # (each: noisy)


def test_a_kept_first_moment_never_meets_a_zero_second_moment():
    """Adam with small gradients beside a large one in their block: the first moment keeps
    codes down to 2^-14 of its block's largest, the second down to 2^-30, and a second
    moment rounded to 0 under a kept first moment made a step m / sqrt(v) up to 100x too
    large (a review's finding: mean |p| 12x float32 state's). A positive second moment is
    now never stored as 0: the steps stay near float32 state's, or shorter."""
    rng = np.random.default_rng(0)
    for small in (1e-5, 1e-6):
        moved = {}
        for state_dtype in ("float32", "int8"):
            p = np.zeros(INT8_BLOCK, np.float32)
            opt = fastopt.Adam(p, lr=1e-3, state_dtype=state_dtype)
            for _ in range(20):
                g = (small * np.sign(rng.standard_normal(INT8_BLOCK))).astype(np.float32)
                g[0] = 1.0
                opt.step(g)
            moved[state_dtype] = np.abs(p[1:])
        assert np.mean(moved["int8"]) < 1.3 * np.mean(moved["float32"])
        assert np.max(moved["int8"]) < 2 * 20 * 1e-3  # (float32 state: at most lr a step)


def test_a_block_aligned_flat_buffer_gives_each_array_its_own_blocks():
    """FlatBuffer(align_elements=Int8State.BLOCK): each array starts on a block, as
    fastopt.torch lays out each param, and the core class then steps bit for bit as
    fastopt.torch does (without it a block spans a 16-element array and its neighbour)."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    rng = np.random.default_rng(0)
    grads = [(np.ones(16, np.float32), (1e-5 * np.sign(rng.standard_normal(240))).astype(
        np.float32)) for _ in range(20)]
    fb = fastopt.FlatBuffer([np.zeros(16, np.float32), np.zeros(240, np.float32)],
                            align_elements=fastopt.Int8State.BLOCK)
    gb = fb.like()
    assert fb.offsets == gb.offsets == [0, INT8_BLOCK]
    core = fastopt.Adam(fb, lr=1e-3, state_dtype="int8")
    params = [torch.nn.Parameter(torch.zeros(16)), torch.nn.Parameter(torch.zeros(240))]
    ours = fot.Adam(params, lr=1e-3, state_dtype="int8")
    for step_grads in grads:
        for view, p, g in zip(gb.views, params, step_grads, strict=True):
            view[...] = g
            p.grad = torch.from_numpy(g)
        core.step(gb.buffer)
        ours.step()
    for view, p in zip(fb.views, params, strict=True):
        np.testing.assert_array_equal(view, p.detach().numpy())
    with pytest.raises(ValueError, match="align_elements must be a positive int"):
        fastopt.FlatBuffer([np.zeros(3)], align_elements=0)


def test_edited_or_stepped_float_values_win_over_stale_codes():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    # the core: an edited exp_avg beside the (now stale) raw form; master raw keys ignored
    p = np.ones(3 * INT8_BLOCK, np.float16)
    opt = fastopt.AdamW(p, state_dtype="int8")
    opt.step(np.ones(p.size, np.float16))
    d = opt.state_dict()
    d["exp_avg"] = np.zeros(p.size, np.float32)
    d["master_param_codes"] = np.zeros(p.size, np.uint8)
    opt.load_state_dict(d)
    assert np.all(opt.state_dict()["exp_avg"] == 0)
    # fastopt.torch: a dict stepped by torch.optim after loading ours
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(700))
    ours = fot.AdamW([w], lr=1e-2, state_dtype="int8")
    for _ in range(3):
        w.grad = torch.randn(700)
        ours.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    theirs = torch.optim.AdamW([w2], lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(20):
        w2.grad = torch.randn(700)
        theirs.step()
    w3 = torch.nn.Parameter(w2.detach().clone())
    back = fot.AdamW([w3], lr=1e-2, state_dtype="int8")
    back.load_state_dict(theirs.state_dict())
    want = theirs.state[w2]["exp_avg"]
    got = back.state_dict()["state"][0]["exp_avg"]
    assert (got - want).abs().max() <= 2.0 ** -4 * want.abs().max() + 1e-12


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
def test_two_conditional_states_turned_on_at_once(state_dtype):
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    r = torch.nn.Parameter(torch.randn(10))
    opt = fot.RMSprop([r], lr=0.01, state_dtype=state_dtype)
    r.grad = torch.randn(10)
    opt.step()
    opt.param_groups[0].update(centered=True, momentum=0.5)
    opt.step()
    assert {"grad_avg", "momentum_buffer"} <= set(opt.state[r])


def test_a_checkpoint_of_int8_state_without_state_buffers_loads(tmp_path):
    p = np.zeros(10, np.float32)
    opt = fastopt.SGD(p, lr=0.1, state_dtype="int8")  # (no momentum: no state buffer)
    opt.step(np.ones(10, np.float32))
    fastopt.save(opt, tmp_path / "s.npz")
    assert fastopt.load(tmp_path / "s.npz", p).step_count == 1


def test_memory_report_counts_bytes_per_parameter_by_component():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    n = 4 * INT8_BLOCK
    want = {"float32": {"params": 4, "exp_avg": 4, "exp_avg_sq": 4, "total": 12},
            "bfloat16": {"params": 4, "exp_avg": 2, "exp_avg_sq": 2, "total": 8},
            "int8": {"params": 4, "exp_avg": 1, "exp_avg_sq": 1, "scales": 8 / INT8_BLOCK,
                     "total": 6 + 8 / INT8_BLOCK}}
    for state_dtype, expected in want.items():
        report = fastopt.AdamW(np.zeros(n, np.float32), state_dtype=state_dtype).memory_report()
        assert report == pytest.approx(expected), state_dtype
    half = fastopt.AdamW(np.zeros(n, np.float16), state_dtype="int8").memory_report()
    assert half["params"] == 2 and half["master_param"] == 4
    model = torch.nn.Linear(INT8_BLOCK, 4, bias=False)  # (one param of whole blocks)
    report = fot.AdamW(model.parameters(), state_dtype="int8").memory_report()
    assert report == pytest.approx({"params": 4, "grads": 4, "exp_avg": 1, "exp_avg_sq": 1,
                                    "scales": 8 / INT8_BLOCK, "total": 10 + 8 / INT8_BLOCK})
