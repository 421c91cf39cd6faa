"""fastopt.torch with float16 / bfloat16 parameters: a float32 master per param, updated in the
kernel pass, so the 16-bit model follows torch.optim's float32 trajectory (given the same
gradients) and its params are that trajectory rounded to nearest even."""

import copy

import numpy as np
import pytest
import torch

import fastopt.torch as fot
from fastopt import schedules as S

OPTIMIZERS = {
    "Adam": (dict(lr=3e-3, weight_decay=0.01, amsgrad=True), {}),
    "AdamW": (dict(lr=3e-3, weight_decay=0.1, maximize=True), {}),
    "Adagrad": (dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1), {}),
    "Adadelta": (dict(lr=0.5, rho=0.8, weight_decay=0.01), {}),
}
SHAPES = [(32, 12), (32,), (5, 32), (5,)]


def params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_half_params_follow_torch_float32(name, dtype):
    kw, _ = OPTIMIZERS[name]
    ours = params(dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]  # the same starting values
    opt = getattr(fot, name)(ours, **kw)
    topt = getattr(torch.optim, name)(ref, **kw)
    for step_grads in grads(60):
        for p, r, g in zip(ours, ref, step_grads, strict=True):
            g16 = g.to(dtype)
            p.grad = g16  # a new tensor each step, as autograd gives after zero_grad()
            r.grad = g16.float()
        opt.step()
        topt.step()
    for p, r in zip(ours, ref, strict=True):
        master = opt.state[p]["master_param"]
        assert p.dtype == dtype and master.dtype == torch.float32
        np.testing.assert_allclose(master.numpy(), r.detach().numpy(), rtol=2e-5, atol=2e-6)
        assert torch.equal(p.detach(), master.to(dtype))  # params = master rounded, exactly
        assert opt.state[p]["step"] == 60


def test_mixed_dtypes_in_one_group():
    """One bucket per dtype: float32 params equal torch exactly as before, bf16 ones follow."""
    p32, p16 = params(torch.float32, seed=3)[:2], params(torch.bfloat16, seed=4)[2:]
    ref = [torch.nn.Parameter(p.detach().float()) for p in p32 + p16]
    opt = fot.AdamW(p32 + p16, lr=S.cosine(1e-2, 40))
    topt = torch.optim.AdamW(ref, lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, 40)
    assert [b.flat.dtype for b in opt._buckets[0]] == [torch.float32, torch.bfloat16]
    for step_grads in grads(40, seed=5):
        for p, r, g in zip(p32 + p16, ref, step_grads, strict=True):
            p.grad = g.to(p.dtype)
            r.grad = p.grad.float()
        opt.step()
        topt.step()
        sched.step()
    for p, r in zip(p32 + p16, ref, strict=True):
        np.testing.assert_allclose(p.detach().float().numpy(), r.detach().numpy(),
                                   rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _bf16_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4)).to(torch.bfloat16)


def _batches(steps, seed=1):
    """Labels from a fixed linear teacher, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(12, 4, generator=g)
    xs = [torch.randn(16, 12, generator=g) for _ in range(steps)]
    return [(x.to(torch.bfloat16), (x @ teacher).argmax(1)) for x in xs]


def test_bf16_model_trains_and_resumes_bit_identically():
    batches = _batches(60)
    full = _bf16_model()
    full_opt = fot.AdamW(full.parameters(), lr=S.warmup(S.cosine(1e-2, 50), 10))
    x, y = batches[0]
    before = torch.nn.functional.cross_entropy(full(x).float(), y).item()
    _train(full, full_opt, batches)
    after = torch.nn.functional.cross_entropy(full(x).float(), y).item()
    assert after < before * 0.7
    part = _bf16_model()
    part_opt = fot.AdamW(part.parameters(), lr=S.warmup(S.cosine(1e-2, 50), 10))
    _train(part, part_opt, batches[:25])
    sd = part_opt.state_dict()
    assert {v.dtype for v in sd["state"][0].values()} == {torch.float32}
    resumed = copy.deepcopy(part)
    resumed_opt = fot.AdamW(resumed.parameters(), lr=S.warmup(S.cosine(1e-2, 50), 10))
    resumed_opt.load_state_dict(sd)  # torch's loader would round master and state to bf16
    _train(resumed, resumed_opt, batches[25:])
    for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bf16_state_dicts_load_into_torch_and_back():
    batches = _batches(20)
    model = _bf16_model()
    opt = fot.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, batches[:10])
    twin = copy.deepcopy(model)
    topt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    topt.load_state_dict(opt.state_dict())  # torch casts our float32 state to bf16
    assert topt.state[next(twin.parameters())]["exp_avg"].dtype == torch.bfloat16
    _train(twin, topt, batches[10:])
    # and a torch bf16 state dict into fastopt, over the params torch stepped: the masters
    # start from them; torch kept our master_param as a bf16 tensor it never updated, and
    # taking that one would undo torch's 10 steps
    again = fot.Adam(copy.deepcopy(twin).parameters(), lr=1e-3)
    kept = topt.state_dict()
    assert kept["state"][0]["master_param"].dtype == torch.bfloat16
    assert not torch.equal(kept["state"][0]["master_param"], next(twin.parameters()))
    again.load_state_dict(kept)
    for p in again.param_groups[0]["params"]:
        st = again.state[p]
        assert torch.equal(st["master_param"], p.detach().float())
        assert st["exp_avg"].dtype == torch.float32 and int(st["step"]) == 20


def test_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        fot.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])


@pytest.mark.parametrize("multi_tensor", [False, True])
def test_meta_device_params_are_refused_with_the_cause(multi_tensor):
    """A model built on the meta device has no values to update: refused at construction,
    naming the device and the remedy, in both modes."""
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="meta tensor holds no values.*to_empty"):
        fot.AdamW([meta], multi_tensor=multi_tensor)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bf16_state_equals_the_core_optimizer(name):
    """state_dtype='bfloat16': the state is bf16 (stochastically rounded, 20 B/param for Adam
    instead of 28) and the update is bit for bit the core optimizer's on the same buffer."""
    import fastopt

    kw, _ = OPTIMIZERS[name]
    n = 4096  # a multiple of the bucket alignment: the flat buffer is exactly the param
    g = torch.Generator().manual_seed(21)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    ref = p.detach().numpy().copy()
    opt = getattr(fot, name)([p], **kw, state_dtype="bfloat16")
    core = getattr(fastopt, name)(ref, **kw, state_dtype="bfloat16")
    for _ in range(30):
        grad = torch.randn(n, generator=g)
        p.grad = grad
        opt.step()
        core.step(grad.numpy())
    np.testing.assert_array_equal(p.detach().numpy(), ref)
    state = opt.state[p]
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k != "step")


def test_bf16_state_trains_like_float32_state_and_resumes():
    batches = _batches(80)
    losses = {}
    for state_dtype in ("float32", "bfloat16"):
        model = _bf16_model().float()
        opt = fot.AdamW(model.parameters(), lr=S.cosine(1e-2, 80), state_dtype=state_dtype)
        _train(model, opt, [(x.float(), y) for x, y in batches])
        x, y = batches[0]
        losses[state_dtype] = torch.nn.functional.cross_entropy(model(x.float()), y).item()
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    # resume: bf16 state and the step survive a state dict round trip, bit for bit
    a = _bf16_model().float()
    a_opt = fot.Adagrad(a.parameters(), lr=0.05, state_dtype="bfloat16")
    _train(a, a_opt, [(x.float(), y) for x, y in batches[:30]])
    b = copy.deepcopy(a)
    b_opt = fot.Adagrad(b.parameters(), lr=0.05, state_dtype="bfloat16")
    b_opt.load_state_dict(a_opt.state_dict())
    rest = [(x.float(), y) for x, y in batches[30:]]
    _train(a, a_opt, rest)
    _train(b, b_opt, rest)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="state_dtype"):
        fot.Adam(_bf16_model().parameters(), state_dtype="float16")


def test_refresh_master_after_loading_weights():
    """Weights loaded into a bf16 model after the optimizer exists: without refresh_master the
    next step would overwrite them with the stale master; with it they are kept."""
    source = _bf16_model(seed=1)
    batches = _batches(2)
    runs = []
    for refresh in (True, False):
        model = _bf16_model(seed=0)
        opt = fot.AdamW(model.parameters(), lr=1e-3)
        _train(model, opt, batches[:1])
        model.load_state_dict(source.state_dict())  # in place, into the flat buffer's views
        if refresh:
            opt.refresh_master()
            for p, q in zip(model.parameters(), source.parameters(), strict=True):
                assert torch.equal(opt.state[p]["master_param"], q.detach().float())
        _train(model, opt, batches[1:])
        runs.append(max(float((p.detach().float() - q.detach().float()).abs().max())
                        for p, q in zip(model.parameters(), source.parameters(), strict=True)))
    assert runs[0] < 0.05  # one small step from the loaded weights
    assert runs[1] > 0.1  # the stale master undid the load


def test_deepcopy_with_the_model_keeps_masters_and_buffers_apart():
    """copy.deepcopy((model, opt)): the copy's params are views of the copy's own flat buffer,
    its float32 masters and state are copies, and both train on bit for bit alike."""
    batches = _batches(20)
    model = _bf16_model()
    opt = fot.AdamW(model.parameters(), lr=S.cosine(1e-2, 20), weight_decay=0.1)
    _train(model, opt, batches[:5])
    model2, opt2 = copy.deepcopy((model, opt))
    assert [id(p) for g in opt2.param_groups for p in g["params"]] == \
        [id(p) for p in model2.parameters()]
    flat2 = opt2._buckets[0][0].flat
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert p2.untyped_storage().data_ptr() == flat2.untyped_storage().data_ptr()
        assert torch.equal(opt2.state[p2]["master_param"], opt.state[p]["master_param"])
        assert opt2.state[p2]["master_param"].data_ptr() != opt.state[p]["master_param"].data_ptr()
    _train(model, opt, batches[5:])
    _train(model2, opt2, batches[5:])
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)
