"""fastopt on CUDA against torch.optim on the same card (marked gpu; skipped unless both CuPy and
torch see a CUDA device): the core optimizers on cupy arrays vs torch's fused/foreach CUDA
optimizers, and ``fastopt.torch`` on CUDA params (DLPack views, torch's current stream)."""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="cupy not installed")
torch = pytest.importorskip("torch", reason="torch not installed")
if not (cupy.cuda.is_available() and torch.cuda.is_available()):
    pytest.skip("no CUDA device for both cupy and torch", allow_module_level=True)

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402
from fastopt import schedules as S  # noqa: E402

pytestmark = pytest.mark.gpu

#: (name, fastopt/fot keywords, torch keywords beyond them): torch's fused CUDA kernels where
#: it has them (Adam, AdamW), foreach otherwise
CASES = [
    ("Adam", dict(lr=3e-3, weight_decay=0.01, amsgrad=True), dict(fused=True)),
    ("Adam", dict(lr=3e-3, betas=(0.8, 0.99), maximize=True), dict(fused=True)),
    ("AdamW", dict(lr=3e-3, weight_decay=0.1), dict(fused=True)),
    ("AdamW", dict(lr=3e-3, amsgrad=True, maximize=True), dict(fused=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
     dict(foreach=True)),
    ("Adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.01), dict(foreach=True)),
]
SHAPES = [(257, 129), (129,), (64, 3, 3, 3), (1,), (1031,)]


def _grads(steps, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [[torch.randn(s, device="cuda", generator=gen) for s in SHAPES]
            for _ in range(steps)]


def _params(seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=gen) for s in SHAPES]


def _torch_run(name, kw, extra, grads, steps, warm=20):
    """torch with SequentialLR(LinearLR warmup, CosineAnnealingLR): the schedule fastopt
    evaluates in the kernel as warmup(cosine)."""
    from torch.optim import lr_scheduler as L

    params = [torch.nn.Parameter(p) for p in _params()]
    opt = getattr(torch.optim, name)(params, **kw, **extra)
    sched = L.SequentialLR(opt, [L.LinearLR(opt, 0.1, 1.0, warm),
                                 L.CosineAnnealingLR(opt, steps - warm)], [warm])
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        sched.step()
    return params


def _schedule(lr, steps, warm=20):
    return S.warmup(S.cosine(lr, steps - warm), warm, start_lr=lr * 0.1)


@pytest.mark.parametrize("name,kw,extra", CASES)
def test_fot_cuda_matches_torch_cuda(name, kw, extra):
    """fastopt.torch on CUDA params, lr schedule in the kernel, vs torch on the same card."""
    steps = 120
    grads = _grads(steps, seed=1)
    ref = _torch_run(name, dict(kw), extra, grads, steps)
    kw = dict(kw)
    params = [torch.nn.Parameter(p) for p in _params()]
    opt = getattr(fot, name)(params, lr=_schedule(kw.pop("lr"), steps), **kw)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    torch.cuda.synchronize()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
    state = opt.state_dict()["state"][0]
    assert float(state["step"]) == steps


@pytest.mark.parametrize("name,kw,extra", CASES)
def test_core_on_cupy_matches_torch_cuda(name, kw, extra):
    """The core optimizers on one cupy buffer vs torch on the same bytes (DLPack)."""
    steps, n = 100, 100_003
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for _ in range(steps)]
    kw = dict(kw)
    lr = kw.pop("lr")
    mine = cupy.asarray(p0)
    opt = getattr(fastopt, name)(mine, lr=lr, **kw)
    theirs = torch.nn.Parameter(torch.from_dlpack(cupy.asarray(p0)))
    topt = getattr(torch.optim, name)([theirs], lr=lr, **kw, **extra)
    for g in grads:
        opt.step(g)
        theirs.grad = torch.from_dlpack(g)
        topt.step()
    torch.cuda.synchronize()
    np.testing.assert_allclose(mine.get(), theirs.detach().cpu().numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fot_cuda_16_bit_params_follow_fp32_master(dtype):
    """16-bit CUDA params: the float32 master follows torch fp32 AdamW on the same grads, and
    the params are the master rounded to nearest even."""
    steps = 60
    grads = _grads(steps, seed=3)
    ref = [torch.nn.Parameter(p) for p in _params()]
    topt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, fused=True)
    params = [torch.nn.Parameter(p.to(dtype)) for p in _params()]
    masters = [p.detach().float() for p in params]
    for r, m in zip(ref, masters, strict=True):
        r.data.copy_(m)  # both start from the rounded params
    opt = fot.AdamW(params, lr=1e-3, weight_decay=0.1)
    for gs in grads:
        for p, r, g in zip(params, ref, gs, strict=True):
            r.grad = g.to(dtype).float()
            p.grad = g.to(dtype)
        topt.step()
        opt.step()
    torch.cuda.synchronize()
    for p, r in zip(params, ref, strict=True):
        master = opt.state[p]["master_param"]
        torch.testing.assert_close(master, r.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master.to(dtype))


def test_fot_cuda_runs_on_torchs_current_stream():
    """A step issued on a side stream is ordered on that stream: waiting on it suffices."""
    params = [torch.nn.Parameter(p) for p in _params()]
    ref = [torch.nn.Parameter(p) for p in _params()]
    opt, topt = fot.AdamW(params, lr=1e-3), torch.optim.AdamW(ref, lr=1e-3, fused=True)
    side = torch.cuda.Stream()
    for gs in _grads(10, seed=4):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for p, r, g in zip(params, ref, gs, strict=True):
                p.grad, r.grad = g.clone(), g.clone()
            opt.step()
            topt.step()
        torch.cuda.current_stream().wait_stream(side)
    side.synchronize()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


def test_indices_past_2_to_the_31():
    """A buffer of more than 2^31 elements: the last elements (past int32 indexing) are updated
    exactly like the first ones, on the vector path and on the scalar tail."""
    n = (1 << 31) + 3 * 4096 + 7  # not a multiple of the vector width: a scalar tail
    need = 3 * 4 * n + (1 << 30)
    if cupy.cuda.Device().mem_info[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free on the device")
    # the same 4096 values repeated: every element's update is a function of its (p, g) only
    cupy.random.seed(5)
    pattern = cupy.random.standard_normal(2 * 4096, dtype=cupy.float32)
    full = (n // 4096) * 4096
    params = cupy.empty(n, dtype=cupy.float32)
    grads = cupy.empty(n, dtype=cupy.float32)
    for buf, values in ((params, pattern[:4096]), (grads, pattern[4096:])):
        buf[:full].reshape(-1, 4096)[...] = values
        buf[full:] = values[:n - full]
    opt = fastopt.Adagrad(params, lr=0.1, initial_accumulator_value=0.5)
    for _ in range(3):
        opt.step(grads)
    head = params[:4096].get()
    cpu = pattern[:4096].get()
    cpu_opt = fastopt.Adagrad(cpu, lr=0.1, initial_accumulator_value=0.5)
    for _ in range(3):
        cpu_opt.step(pattern[4096:].get())
    np.testing.assert_allclose(head, cpu, rtol=1e-6, atol=1e-7)  # the update did happen
    expect = np.tile(head, 2)
    for lo in ((1 << 31) - 4096, (1 << 31), full - 8192):
        np.testing.assert_array_equal(params[lo:lo + 8192].get(), expect, err_msg=str(lo))
    np.testing.assert_array_equal(params[full:].get(), head[:n - full])
    assert float(opt.state["sum"][-1]) > 0.5
    del params, grads, opt
    cupy.get_default_memory_pool().free_all_blocks()
