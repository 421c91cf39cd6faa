"""master_weights= for 16-bit params: "fp32" (a float32 master), "remainder" (bfloat16 params
plus the master's low 16 bits: the same master bit for bit, in 2 B/param) and "none" (no
master: the params rounded stochastically), in every layer."""

import numpy as np
import pytest
from numba import njit
from optimizer_cases import CASES, logistic_problem, make, schedule_for

import fastopt
from fastopt import _bf16
from fastopt import functional as F
from fastopt import schedules as S
from fastopt.algorithms import REGISTRY
from fastopt.cpu import convert

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16, F16 = ml_dtypes.bfloat16, np.float16


def _special_masters() -> np.ndarray:
    """float32 bit patterns around every bfloat16 value: each high half (every sign, exponent
    and mantissa: powers of two, subnormals, the largest finite, inf, NaN) with low halves at
    and around the tie (0x8000) and the ends."""
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = np.array([0, 1, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=np.uint32)
    return (high[:, None] | lows[None, :]).reshape(-1).view(np.float32)


def _round_ties_away(master: np.ndarray) -> np.ndarray:
    """bfloat16 bits of finite float32 values rounded to nearest, ties away from zero, found
    independently: the two bfloat16 neighbours compared in float64 (past the largest finite
    value the upper neighbour is 2^128: inf)."""
    u = master.view(np.uint32)
    low_bits = (u >> np.uint32(16)).astype(np.uint16)  # truncated toward zero
    down = (u & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    sign = np.where(master < 0, -1.0, 1.0)
    up_bits = (low_bits.astype(np.uint32) + 1).astype(np.uint32)
    up = (up_bits << np.uint32(16)).view(np.float32).astype(np.float64)
    up = np.where(np.isinf(up), sign * 2.0 ** 128, up)
    x = master.astype(np.float64)
    return np.where(np.abs(x - down) < np.abs(up - x), low_bits, up_bits.astype(np.uint16))


def test_split_and_join_are_exact_and_round_to_nearest_ties_away():
    master = _special_masters()
    bits, remainder = _bf16.split_master(master)
    assert bits.dtype == np.uint16 and remainder.dtype == np.int16
    back = _bf16.join_remainder(bits, remainder)
    nan = np.isnan(master)
    quiet = (master.view(np.uint32) & np.uint32(0x00400000)) != 0
    exact = ~nan | quiet  # (a signalling NaN comes back quiet, as arithmetic makes it)
    np.testing.assert_array_equal(back.view(np.uint32)[exact], master.view(np.uint32)[exact])
    assert np.isnan(back[nan]).all()
    params = _bf16.decode(bits)
    np.testing.assert_array_equal(np.isnan(params), nan)  # a NaN master, a NaN param
    finite = np.isfinite(master)
    np.testing.assert_array_equal(bits[finite], _round_ties_away(master[finite]))
    np.testing.assert_array_equal(bits[np.isinf(master)],
                                  (master[np.isinf(master)].view(np.uint32) >> 16))
    # against round to nearest even: other only at exact ties
    rne = _bf16.encode(master)
    differ = (rne != bits) & ~nan
    assert differ.any()
    assert ((master.view(np.uint32)[differ] & np.uint32(0xFFFF)) == 0x8000).all()


@njit
def _numba_split_join(master):
    bits = np.empty(master.shape[0], np.uint16)
    remainder = np.empty(master.shape[0], np.int16)
    back = np.empty(master.shape[0], np.float32)
    for i in range(master.shape[0]):
        bits[i], remainder[i] = convert.split_master(master[i])
        back[i] = convert.join_remainder(bits[i], remainder[i])
    return bits, remainder, back


def test_numba_split_and_join_equal_the_host_ones():
    master = _special_masters()
    bits, remainder, back = _numba_split_join(master)
    host_bits, host_remainder = _bf16.split_master(master)
    np.testing.assert_array_equal(bits, host_bits)
    np.testing.assert_array_equal(remainder, host_remainder)
    np.testing.assert_array_equal(back.view(np.uint32),
                                  _bf16.join_remainder(bits, remainder).view(np.uint32))


@njit
def _numba_join(bits, remainder):
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = convert.join_remainder(bits[i], remainder[i])
    return out


def test_join_remainder_of_any_pair_agrees_and_a_zero_param_stays_a_number():
    """Every bfloat16 pattern with remainders of each sign: Numba's join equals the host's
    bit for bit (the CUDA one: test_cuda_host); a finite param joins to a number, a zero one
    (set in place without refresh_master(), its remainder stale) to one next to 0 of its
    sign: a negative remainder made its bits 0xFFFF or 0x7FFF, NaNs (found by a review).
    Pairs split_master makes join as before (test_split_and_join_are_exact_...)."""
    bits = np.repeat(np.arange(65536, dtype=np.uint32).astype(np.uint16), 6)
    remainder = np.tile(np.array([-32768, -12345, -1, 0, 1, 32767], np.int16), 65536)
    host = _bf16.join_remainder(bits, remainder)
    np.testing.assert_array_equal(_numba_join(bits, remainder).view(np.uint32),
                                  host.view(np.uint32))
    finite = (bits & 0x7FFF) < 0x7F80
    assert np.isfinite(host[finite]).all()
    zero = (bits & 0x7FFF) == 0
    assert (np.abs(host[zero]) < np.finfo(np.float32).tiny).all()
    assert (np.signbit(host[zero]) == (bits[zero] >= 0x8000)).all()


@njit
def _numba_stochastic(values, rand, fp16):
    out = np.empty((values.shape[0], rand.shape[0]), np.uint16)
    for i in range(values.shape[0]):
        for k in range(rand.shape[0]):
            out[i, k] = convert.float_to_fp16_stochastic(values[i], rand[k]) if fp16 \
                else convert.float_to_bf16_stochastic(values[i], rand[k])
    return out


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_stochastic_param_rounding_is_unbiased_over_every_random_draw(fmt):
    """Over all 2^16 random draws, each value rounds to one of its two neighbours and its
    mean is the value (to 2^-16 of an ulp: whole ulps for float16 normals, an exact fraction
    for its subnormals); specials stay, past the largest finite value it may round to inf."""
    dtype = F16 if fmt == "float16" else BF16
    rng = np.random.default_rng(3)
    values = (rng.standard_normal(300) * np.exp(rng.uniform(-25, 10, 300))).astype(np.float32)
    values = np.concatenate([values, np.float32([0.0, -0.0, 1.0, -2.0, 6e-8, -3e-8, 1e-9,
                                                 6.1e-5, 65504.0, np.inf, -np.inf, np.nan])])
    out = _numba_stochastic(values, np.arange(1 << 16, dtype=np.uint32), fmt == "float16")
    rounded = out.view(dtype).astype(np.float64)
    specials = ~np.isfinite(values)
    for v, row in zip(values[specials], rounded[specials], strict=True):
        assert (np.isnan(row).all() if np.isnan(v) else (row == v).all())
    finite = np.isfinite(values) & (np.abs(values) < (65504 if fmt == "float16" else 3e38))
    x = values[finite].astype(np.float64)
    below = np.nextafter(x.astype(dtype), dtype(0)).astype(np.float64)
    spacing = np.maximum(np.abs(x.astype(dtype).astype(np.float64) - below),
                         2.0 ** -24 if fmt == "float16" else 2.0 ** -133)
    assert (np.abs(rounded[finite] - x[:, None]) <= spacing[:, None] * 1.0001).all()
    bias = np.abs(rounded[finite].mean(axis=1) - x) / spacing
    assert bias.max() < 2.0 ** -15


def _bf16_problem(n=2048, steps=1000, seed=0):
    """bfloat16 params with values near powers of two, subnormals, inf and NaN, and grads of
    many scales (some NaN and inf)."""
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(n) * np.exp(rng.uniform(-4, 4, n))).astype(np.float32)
    p[:64] = np.float32(2.0) ** rng.integers(-20, 20, 64) * (1 + rng.uniform(-1e-3, 1e-3, 64))
    p[64:80] = rng.uniform(-1, 1, 16) * np.float32(1e-38)  # subnormal
    p[80:84] = [np.inf, -np.inf, np.nan, -np.nan]
    grads = rng.standard_normal((steps, n)).astype(np.float32) * np.float32(0.1)
    grads[::97, 100] = np.nan  # now and then one NaN and one inf gradient
    grads[::89, 101] = np.inf
    return p.astype(BF16), grads.astype(BF16)


def test_remainder_master_is_bit_identical_over_1000_steps():
    p0, grads = _bf16_problem()
    a, b = p0.copy(), p0.copy()
    options = dict(lr=S.warmup(S.cosine(3e-3, 1000), 20), weight_decay=0.1, amsgrad=True)
    fp32 = fastopt.AdamW(a, **options)
    rem = fastopt.AdamW(b, master_weights="remainder", **options)
    assert "master_param" not in rem.state and rem.state["master_remainder"].dtype == np.int16
    for k, g in enumerate(grads):
        fp32.step(g)
        rem.step(g)
        if k % 50 == 0 or k == len(grads) - 1:
            master = fp32.state["master_param"]
            made = _bf16.join_remainder(b.view(np.uint16), rem.state["master_remainder"])
            np.testing.assert_array_equal(made.view(np.uint32), master.view(np.uint32))
            bits, _ = _bf16.split_master(master)  # the params: ties away from zero
            np.testing.assert_array_equal(b.view(np.uint16), bits)
            differ = b.view(np.uint16) != a.view(np.uint16)
            assert ((master.view(np.uint32)[differ] & 0xFFFF) == 0x8000).all()
    assert np.isnan(fp32.state["master_param"][100])  # (the NaN gradient reached it)
    np.testing.assert_array_equal(rem.state_dict()["master_param"].view(np.uint32),
                                  fp32.state["master_param"].view(np.uint32))


#: the kernel families besides the elementwise one (AdamW above): segmented with a matrix
#: stage (Muon; LAMB's passes are written by the same driver) and factored moments
#: (Adafactor: passes of their own); first-step state from the params (Schedule-Free's z)
#: is tested with its train() and eval() below. (One optimizer each: every new master mode
#: is a kernel specialisation to compile, seconds each in CI.)
FAMILIES = ["adafactor", "muon"]


@pytest.mark.parametrize("name", FAMILIES)
def test_remainder_equals_the_float32_master_in_every_kernel_family(name):
    cls, hypers = CASES[name].options[0]
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(600).astype(BF16)
    a, b = p0.copy(), p0.copy()
    fp32 = make(cls, a, **hypers)
    rem = make(cls, b, master_weights="remainder", **hypers)
    for _ in range(6):
        g = rng.standard_normal(600).astype(BF16)
        fp32.step(g)
        rem.step(g)
    made = _bf16.join_remainder(b.view(np.uint16), rem.state["master_remainder"])
    np.testing.assert_array_equal(made.view(np.uint32),
                                  fp32.state["master_param"].view(np.uint32))
    assert not np.array_equal(b, p0)


def test_master_weights_none_is_unbiased_where_round_to_nearest_would_stall():
    """Updates of a fortieth of the spacing below 1.0: round to nearest would keep the params
    at 1.0; stochastic rounding moves them by the updates' sum on average (each step an
    unbiased draw between two neighbours), in bfloat16 and float16."""
    n, steps = 20000, 40
    for dtype in (BF16, F16):
        spacing = 1.0 - float(np.nextafter(dtype(1.0), dtype(0.0)))
        lr = spacing / 40
        p = np.ones(n, dtype)
        opt = fastopt.SGD(p, lr=lr, master_weights="none")
        for _ in range(steps):
            opt.step(np.ones(n, dtype))
        values = p.astype(np.float64)
        sigma = np.sqrt(steps * lr * spacing / n)  # (a step's draw: variance <= lr * spacing)
        assert abs(values.mean() - (1.0 - steps * lr)) < 5 * sigma, values.mean()
        assert "master_param" not in opt.state and opt.memory_report()["total"] == 2.0


@pytest.mark.parametrize("name", ["adam", "lion"])
def test_master_weights_none_converges_like_a_float32_master(name):
    """A logistic regression (300 steps) with bfloat16 params: without a master (stochastic
    rounding) the final loss is within 1 % of the float32 master's with the same state
    format (float32, and int8 where the optimizer takes it)."""
    loss_and_grad = logistic_problem()
    cls, hypers = CASES[name].options[0]
    lr = {"lion": 0.005, "adagrad": 0.1, "rmsprop": 0.005}.get(name, 0.05)
    losses = {}
    formats = ["float32"] + ["int8"] * (REGISTRY[name].int8_refusal is None)
    for mode, state_dtype in [(m, f) for f in formats for m in ("fp32", "none")]:
        w = np.zeros(50, BF16)
        opt = make(cls, w, lr=schedule_for(name, S.cosine(lr, 300)), master_weights=mode,
                   state_dtype=state_dtype, **hypers)
        for _ in range(300):
            opt.step(loss_and_grad(w.astype(np.float32))[1].astype(BF16))
        losses[mode, state_dtype] = loss_and_grad(w.astype(np.float32))[0]
    assert losses["fp32", "float32"] < 0.45, losses
    for state_dtype in formats:
        assert losses["none", state_dtype] == pytest.approx(losses["fp32", state_dtype],
                                                            rel=0.01), losses


def test_the_smallest_mode_and_the_memory_report():
    p = np.zeros(4096, BF16)
    small = fastopt.AdamW(p, state_dtype="int8", master_weights="none")
    report = small.memory_report()
    assert report["params"] == 2.0 and "master_param" not in report
    assert report["total"] == pytest.approx(2 + 2 * (1 + 4 / 256))
    rem = fastopt.AdamW(np.zeros(4096, BF16), master_weights="remainder").memory_report()
    assert rem["master_remainder"] == 2.0 and rem["total"] == 12.0
    assert fastopt.AdamW(np.zeros(4096, BF16)).memory_report()["master_param"] == 4.0


def test_bad_master_weights_are_refused():
    with pytest.raises(ValueError, match="float16 params cannot"):
        fastopt.AdamW(np.zeros(8, F16), master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights must be one of"):
        fastopt.AdamW(np.zeros(8, BF16), master_weights="fp16")
    with pytest.raises(ValueError, match="master_weights must be one of"):
        fastopt.AdamW(np.zeros(8, BF16), master_weights=None)
    # float32 params need no master whatever the mode
    opt = fastopt.AdamW(np.zeros(8, np.float32), master_weights="remainder")
    assert set(opt.state) == {"exp_avg", "exp_avg_sq"}


def test_functional_remainder_and_none_equal_the_classes():
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(1000).astype(BF16)
    grads = [rng.standard_normal(1000).astype(BF16) for _ in range(5)]
    for mode in ("remainder", "none"):
        a = p0.copy()
        opt = fastopt.AdamW(a, lr=1e-2, master_weights=mode)
        b = p0.copy()
        m, v = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
        remainder = np.zeros(1000, np.int16)
        for k, g in enumerate(grads, start=1):
            opt.step(g)
            if mode == "remainder":
                F.adamw(b, g, m, v, step=k, lr=1e-2, remainder=remainder)
            else:
                F.adamw(b, g, m, v, step=k, lr=1e-2, master_weights="none")
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
        if mode == "remainder":
            np.testing.assert_array_equal(remainder, opt.state["master_remainder"])


def test_functional_master_arguments_are_checked():
    p, g = np.zeros(8, BF16), np.zeros(8, BF16)
    m, v = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="need master_param"):
        F.adamw(p, g, m, v, step=1)
    with pytest.raises(ValueError, match="not both"):
        F.adamw(p, g, m, v, step=1, master_param=np.zeros(8, np.float32),
                remainder=np.zeros(8, np.int16))
    with pytest.raises(ValueError, match="takes neither"):
        F.adamw(p, g, m, v, step=1, master_weights="none", remainder=np.zeros(8, np.int16))
    with pytest.raises(ValueError, match="takes remainder"):
        F.adamw(p, g, m, v, step=1, master_weights="remainder",
                master_param=np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="int16"):
        F.adamw(p, g, m, v, step=1, remainder=np.zeros(8, np.uint16))
    with pytest.raises(ValueError, match="float16 params cannot"):
        F.adamw(np.zeros(8, F16), np.zeros(8, F16), m, v, step=1,
                remainder=np.zeros(8, np.int16))
    # float32 params need no master: one given would not be updated (it was ignored)
    master = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="master_param= is for 16-bit params"):
        F.adamw(np.ones(8, np.float32), np.ones(8, np.float32), m, v, step=1,
                master_param=master)
    assert not master.any() and not m.any()


def test_state_dicts_of_fp32_and_remainder_are_interchangeable():
    p0, grads = _bf16_problem(n=512, steps=12, seed=5)
    a, b = p0.copy(), p0.copy()
    fp32 = fastopt.AdamW(a, lr=1e-2)
    rem = fastopt.AdamW(b, lr=1e-2, master_weights="remainder")
    for g in grads[:6]:
        fp32.step(g)
        rem.step(g)
    saved_fp32, saved_rem = fp32.state_dict(), rem.state_dict()
    assert set(saved_fp32) == set(saved_rem) and "master_remainder" not in saved_rem
    # each loads the other's dict, and goes on as the other would have
    c = np.zeros_like(p0)
    into_rem = fastopt.AdamW(c, lr=1e-2, master_weights="remainder")
    into_rem.load_state_dict(saved_fp32)
    np.testing.assert_array_equal(c.view(np.uint16), b.view(np.uint16))  # params from it
    into_fp32 = fastopt.AdamW(a.copy(), lr=1e-2)
    into_fp32.load_state_dict(saved_rem)
    for g in grads[6:]:
        rem.step(g)
        into_rem.step(g)
        into_fp32.step(g)
    np.testing.assert_array_equal(c.view(np.uint16), b.view(np.uint16))
    np.testing.assert_array_equal(into_fp32.state["master_param"].view(np.uint32),
                                  rem.state_dict()["master_param"].view(np.uint32))
    # a dict without a master (a float32 run's): the params' values exactly
    into_rem.load_state_dict({k: v for k, v in saved_fp32.items() if k != "master_param"})
    assert not into_rem.state["master_remainder"].any()
    # a master of the wrong shape changes nothing
    before = c.copy()
    with pytest.raises(ValueError, match="master_param"):
        into_rem.load_state_dict({**saved_fp32, "master_param": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(c.view(np.uint16), before.view(np.uint16))


def test_refresh_master_after_changing_the_params():
    p = np.linspace(-1, 1, 64).astype(BF16)
    opt = fastopt.AdamW(p, lr=1e-2, master_weights="remainder")
    opt.step(np.ones(64, BF16))
    assert opt.state["master_remainder"].any()
    p[...] = np.float32(3.0)
    opt.refresh_master()
    assert not opt.state["master_remainder"].any()
    np.testing.assert_array_equal(opt.state_dict()["master_param"], np.full(64, 3.0))
    none = fastopt.AdamW(np.zeros(8, BF16), master_weights="none")
    none.refresh_master()  # (nothing to refresh)


@pytest.mark.parametrize("mode", ["remainder", "none"])
def test_checkpoints_keep_the_mode_and_load_across_modes(tmp_path, mode):
    p0, grads = _bf16_problem(n=300, steps=8, seed=6)
    p = p0.copy()
    opt = fastopt.AdamW(p, lr=1e-2, master_weights=mode, state_dtype="int8")
    for g in grads[:4]:
        opt.step(g)
    fastopt.save(opt, tmp_path / "c.npz")
    q = np.zeros_like(p0)
    back = fastopt.load(tmp_path / "c.npz", q)
    assert back.master_weights == mode
    np.testing.assert_array_equal(q.view(np.uint16), p.view(np.uint16))
    if mode == "remainder":
        np.testing.assert_array_equal(back.state["master_remainder"],
                                      opt.state["master_remainder"])
    for g in grads[4:]:
        opt.step(g)
        back.step(g)
    np.testing.assert_array_equal(q.view(np.uint16), p.view(np.uint16))
    other = "fp32" if mode == "remainder" else "remainder"
    r = np.zeros_like(p0)
    moved = fastopt.load(tmp_path / "c.npz", r, master_weights=other)
    assert moved.master_weights == other
    if mode == "remainder":  # the float32 master is the saved one
        np.testing.assert_array_equal(moved.state["master_param"],
                                      fastopt.load(tmp_path / "c.npz", np.zeros_like(p0))
                                      .state_dict()["master_param"])
    else:  # no master saved: the params' values
        assert not moved.state["master_remainder"].any()


def test_schedule_free_train_and_eval_move_the_master_with_remainders():
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal(256).astype(BF16)
    grads = [rng.standard_normal(256).astype(BF16) for _ in range(5)]
    masters = {}
    for mode in ("fp32", "remainder"):
        opt = fastopt.AdamWScheduleFree(p0.copy(), lr=0.01, master_weights=mode)
        opt.train()
        for g in grads:
            opt.step(g)
        opt.eval()
        masters[mode] = opt.state_dict()["master_param"]
    np.testing.assert_array_equal(masters["fp32"].view(np.uint32),
                                  masters["remainder"].view(np.uint32))


# ---------------------------------------------------------------------- fastopt.torch


def _torch_mlp(dtype):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 3)).to(dtype)


def _train(model, opt, steps, seed=1, backward_only=False):
    import torch

    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    inputs = torch.randn(512, 20)
    labels = (inputs @ torch.randn(20, 3)).argmax(1)  # (learnable: a linear rule)
    for _ in range(steps):
        batch = torch.randint(0, 512, (32,))
        x, y = inputs[batch].to(dtype), labels[batch]
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        if not backward_only:
            opt.zero_grad()
        loss.backward()
        if not backward_only:
            opt.step()
    return float(loss.detach())


def _fixed_grad_steps(model, opt, steps, seed=2):
    """Steps with the same gradients whatever the params (the modes' params differ at ties,
    and gradients from them would differ)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        opt.step()


def test_fastopt_torch_remainder_is_the_float32_master_in_half_the_bytes():
    torch = pytest.importorskip("torch")
    import copy

    import fastopt.torch as fot

    runs = {}
    for mode in ("fp32", "remainder"):
        model = _torch_mlp(torch.bfloat16)
        opt = fot.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, master_weights=mode)
        _fixed_grad_steps(model, opt, 25)
        runs[mode] = model, opt, opt.state_dict()
    fp32, rem = runs["fp32"][2]["state"], runs["remainder"][2]["state"]
    assert set(fp32) == set(rem) and all(set(fp32[i]) == set(rem[i]) for i in fp32)
    for i in fp32:
        assert torch.equal(fp32[i]["master_param"].view(torch.int32),
                           rem[i]["master_param"].view(torch.int32))
    model, opt = runs["remainder"][:2]
    live = opt.state[next(model.parameters())]
    assert live["master_remainder"].dtype == torch.int16 and "master_param" not in live
    for a, b in zip(runs["fp32"][0].parameters(), model.parameters(), strict=True):
        master = runs["fp32"][1].state[a]["master_param"]  # the params: other only at ties
        differ = a.view(torch.int16) != b.view(torch.int16)
        assert ((master.view(torch.int32)[differ] & 0xFFFF) == 0x8000).all()
    report = opt.memory_report()
    assert report["master_remainder"] == pytest.approx(report["params"])
    assert report["total"] == pytest.approx(runs["fp32"][1].memory_report()["total"]
                                            - report["params"])
    # interchangeable: each loads the other's dict; copies and torch.optim load it too
    for source, target in (("fp32", "remainder"), ("remainder", "fp32")):
        other = _torch_mlp(torch.bfloat16)
        loaded = fot.AdamW(other.parameters(), lr=1e-2, weight_decay=0.1,
                           master_weights=target)
        loaded.load_state_dict(runs[source][2])
        assert all(torch.equal(a["master_param"], b["master_param"]) for a, b in zip(
            loaded.state_dict()["state"].values(), fp32.values(), strict=True))
    copied = copy.deepcopy(opt)
    assert all(torch.equal(a["master_param"], b["master_param"]) for a, b in zip(
        copied.state_dict()["state"].values(), rem.values(), strict=True))
    torch.optim.AdamW(_torch_mlp(torch.bfloat16).parameters()).load_state_dict(
        runs["remainder"][2])
    # refresh_master: the params as they are now, exactly
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    opt.refresh_master()
    assert all((st["master_param"] == 0.5).all() for st in opt.state_dict()["state"].values())


def test_fastopt_torch_step_in_backward_with_remainders_equals_step():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    a, b = _torch_mlp(torch.bfloat16), _torch_mlp(torch.bfloat16)
    opt_a = fot.Adam(a.parameters(), lr=1e-2, master_weights="remainder")
    opt_b = fot.Adam(b.parameters(), lr=1e-2, master_weights="remainder")
    _train(a, opt_a, 5)
    handle = fot.step_in_backward(b, opt_b)
    _train(b, opt_b, 5, backward_only=True)
    handle.remove()
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
    assert all(torch.equal(s["master_param"], t["master_param"]) for s, t in zip(
        opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values(),
        strict=True))


def test_fastopt_torch_none_mode_trains_with_every_state_format():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    losses = {}
    for mode, state_dtype in (("fp32", "float32"), ("none", "float32"), ("none", "int8")):
        model = _torch_mlp(torch.bfloat16)
        opt = fot.AdamW(model.parameters(), lr=1e-2, master_weights=mode,
                        state_dtype=state_dtype)
        losses[mode, state_dtype] = _train(model, opt, 60)
        if mode == "none":
            assert all("master_param" not in st and "master_remainder" not in st
                       for st in opt.state.values())
            assert "master_param" not in opt.state_dict()["state"][0]
    assert losses["fp32", "float32"] < 0.9  # (chance: 1.10)
    for key, loss in losses.items():
        assert loss == pytest.approx(losses["fp32", "float32"], rel=0.1), (key, losses)


def test_fastopt_torch_master_weights_checks_and_mixed_dtypes():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    with pytest.raises(ValueError, match="float16 params cannot"):
        fot.AdamW(_torch_mlp(torch.float16).parameters(), master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights must be one of"):
        fot.AdamW(_torch_mlp(torch.bfloat16).parameters(), master_weights="bf16")
    # float32 and bfloat16 params in one optimizer: only the bfloat16 ones get remainders
    wide, half = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16)
    opt = fot.AdamW([*wide.parameters(), *half.parameters()], master_weights="remainder")
    x = torch.randn(2, 4)
    (wide(x).sum() + half(x.to(torch.bfloat16)).float().sum()).backward()
    opt.step()
    assert "master_remainder" not in opt.state[wide.weight]
    assert opt.state[half.weight]["master_remainder"].dtype == torch.int16
    # a master that is not a float tensor is refused, and changes nothing
    saved = opt.state_dict()
    saved["state"][2]["master_param"] = torch.ones(4, 4, dtype=torch.bool)
    before = half.weight.detach().clone()
    with pytest.raises(RuntimeError, match="must be a float tensor"):
        opt.load_state_dict(saved)
    assert torch.equal(half.weight.detach().view(torch.int16), before.view(torch.int16))
    # fp16 params with no master
    model = _torch_mlp(torch.float16)
    opt = fot.SGD(model.parameters(), lr=0.1, master_weights="none")
    _train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_review_cases_of_the_master_arguments(tmp_path):
    """An independent review's cases: a saved master loads into "none" (rounded to nearest
    even); join_remainder refuses what it cannot read; a bfloat16 master loads; the caller's
    bad master_weights is a ValueError, not a bad file; remainder= with float32 params."""
    p = np.linspace(-2, 2, 64).astype(BF16)
    opt = fastopt.AdamW(p, lr=0.01)
    opt.step(np.ones(64, BF16))
    fastopt.save(opt, tmp_path / "c.npz")
    q = np.zeros(64, BF16)
    none = fastopt.load(tmp_path / "c.npz", q, master_weights="none")
    np.testing.assert_array_equal(q.view(np.uint16), _bf16.encode(opt.state["master_param"]))
    assert none.master_weights == "none" and "master_param" not in none.state
    with pytest.raises(ValueError, match="master_weights must be one of"):
        fastopt.load(tmp_path / "c.npz", np.zeros(64, BF16), master_weights="bogus")
    with pytest.raises(ValueError, match="float16 params cannot"):
        fastopt.load(tmp_path / "c.npz", np.zeros(64, F16), master_weights="remainder")
    bits, remainder = fastopt.split_master(np.float32([1.0 + 2.0 ** -8 + 2.0 ** -9, 0.1]))
    np.testing.assert_array_equal(fastopt.join_remainder(bits.view(BF16), remainder),
                                  fastopt.join_remainder(bits, remainder))
    for args in ((bits, remainder.view(np.uint16)), (bits, remainder.astype(np.int32)),
                 (bits.view(F16), remainder)):
        with pytest.raises(TypeError):
            fastopt.join_remainder(*args)
    rem = fastopt.AdamW(np.zeros(64, BF16), lr=0.01, master_weights="remainder")
    rem.load_state_dict({**opt.state_dict(),
                         "master_param": opt.state["master_param"].astype(BF16)})
    np.testing.assert_array_equal(rem.state_dict()["master_param"],
                                  opt.state["master_param"].astype(BF16).astype(np.float32))
    with pytest.raises(ValueError, match="master_param"):
        rem.load_state_dict({**opt.state_dict(), "master_param": np.ones(64, np.int32)})
    m, v = np.zeros(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="for bfloat16 params"):
        F.adamw(np.zeros(64, np.float32), np.zeros(64, np.float32), m, v, step=1,
                remainder=np.zeros(64, np.int16))
