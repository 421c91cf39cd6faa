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
    # (factored moments: tiled matrices, batched small ones, vectors; the 1e-5)
    ("Adafactor", dict(lr=1e-2, weight_decay=0.01), dict(foreach=True)),
    ("Adafactor", dict(lr=3e-3, beta2_decay=-0.5, eps=(1e-30, 1e-2), d=2.0, maximize=True),
     dict(foreach=True)),
]
SHAPES = [(257, 129), (129,), (64, 3, 3, 3), (1,), (1031,), (3, 700)]  # ((3, 700): 3 strips)


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
    layout = {"segments": [(n,)]} if getattr(fastopt, name).definition.segmented else {}
    opt = getattr(fastopt, name)(mine, lr=lr, **kw, **layout)
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


@pytest.mark.parametrize("options", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw",
                                          "weight_decay": 0.05}])
def test_fot_muon_on_cuda_matches_torch_muon(options):
    """fastopt.torch.Muon on CUDA params (its passes generated CUDA, Newton-Schulz on torch's
    bf16 matmul on torch's current stream) against torch.optim.Muon on the same card: the
    issue's 1e-4 over 100 steps, a warm-up + cosine schedule in the kernel."""
    from optimizer_cases import rel_error

    shapes = [(96, 288), (384, 96), (7, 50)]
    gen = torch.Generator(device="cuda").manual_seed(11)
    values = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    schedule = S.warmup(S.cosine(5e-3, 90, end_lr=1e-4), 10)
    opt = fot.Muon(ours, lr=schedule, **options)
    twin = torch.optim.Muon(theirs, lr=5e-3, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(twin, lambda k: schedule.at(k) / 5e-3)
    for _ in range(100):
        grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
        sched.step()
    for p, q in zip(ours, theirs, strict=True):
        assert rel_error(p.detach().cpu().numpy(), q.detach().cpu().numpy()) <= 1e-4


#: (class, keywords): plain moments, per-step scalars (NAdam's mu_product), a first-gradient
#: state (SGD's momentum), a matrix stage on torch's matmul (Muon: its 2-D params only),
#: factored moments (Adafactor: six launches)
CAPTURED = [("AdamW", dict(weight_decay=0.1)), ("NAdam", dict(weight_decay=0.01)),
            ("SGD", dict(momentum=0.9, nesterov=True)), ("Muon", {}), ("Adafactor", {}),
            ("AdamW", dict(weight_decay=0.1, state_dtype="int8"))]


@pytest.mark.parametrize("name,kw", [("AdamW", dict(weight_decay=0.1)),
                                     ("Adam", dict(amsgrad=True)),
                                     ("Adagrad", dict(lr_decay=0.01)),
                                     ("SGD", dict(momentum=0.9))])
def test_fot_cuda_int8_state_follows_the_cpu(name, kw):
    """fastopt.torch with int8 state on CUDA (a warp per block) against the same on the CPU:
    the params agree to float32 rounding, the codes are almost all identical."""
    grads = _grads(30, seed=31)
    on_gpu = [torch.nn.Parameter(p) for p in _params(seed=3)]
    on_cpu = [torch.nn.Parameter(p.cpu()) for p in _params(seed=3)]
    gpu = getattr(fot, name)(on_gpu, lr=_schedule(3e-3, 30, 5), state_dtype="int8", **kw)
    cpu = getattr(fot, name)(on_cpu, lr=_schedule(3e-3, 30, 5), state_dtype="int8", **kw)
    for gs in grads:
        for p, q, g in zip(on_gpu, on_cpu, gs, strict=True):
            p.grad, q.grad = g.clone(), g.cpu()
        gpu.step()
        cpu.step()
    for p, q in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-5)
        for key, codes in cpu.state[q].items():
            if codes.dtype == torch.uint8:
                same = (gpu.state[p][key].cpu() == codes).float().mean().item()
                assert same > 0.99, (key, same)


def _set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # (in place: the flat gradient buffer a captured step reads)


def _capture_and_replay(opt, params, warm_grads, replay_grads):
    """Eager steps over ``warm_grads`` on a side stream, one step captured in a CUDA graph,
    then a replay per gradient of ``replay_grads`` (set in place); returns the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in warm_grads:
            _set_grads(params, gs)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for gs in replay_grads:
        _set_grads(params, gs)
        graph.replay()
    return graph


@pytest.mark.parametrize("name,kw", CAPTURED)
def test_fot_step_captured_in_a_cuda_graph(name, kw):
    """A fastopt.torch step captured in torch.cuda.graph after 3 warm-up steps: 50 replays
    equal 50 eager steps, the warm-up + cosine schedule advancing in the kernel; afterwards
    the step counts, the group's lr and further eager steps follow the device's count."""
    shapes = [s for s in SHAPES if len(s) == 2] if name == "Muon" else SHAPES
    gen = torch.Generator(device="cuda").manual_seed(21)
    values = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(56)]
    schedule = S.warmup(S.cosine(3e-3, 60, end_lr=1e-4), 5)
    captured = [torch.nn.Parameter(v.clone()) for v in values]
    eager = [torch.nn.Parameter(v.clone()) for v in values]
    opt = getattr(fot, name)(captured, lr=schedule, **kw)
    ref = getattr(fot, name)(eager, lr=schedule, **kw)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="after eager steps"), torch.cuda.graph(graph):
        _set_grads(captured, grads[0])
        opt.step()
    graph = _capture_and_replay(opt, captured, grads[:3], grads[3:53])
    for gs in grads[:53]:
        _set_grads(eager, gs)
        ref.step()
    exact = name != "Muon"  # (cuBLAS may pick other kernels inside a capture)
    for p, q in zip(captured, eager, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0 if exact else 1e-6,
                                   atol=0 if exact else 1e-7)
    assert opt.param_groups[0]["lr"] != ref.param_groups[0]["lr"]  # (the host lags)
    opt.sync_step_count()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    counts = {k: st.get("step") for k, st in opt.state_dict()["state"].items()}
    assert counts == {k: st.get("step") for k, st in ref.state_dict()["state"].items()}
    for gs in grads[53:]:  # eager steps after the replays go on from the device's count
        _set_grads(captured, gs)
        _set_grads(eager, gs)
        opt.step()
        ref.step()
    graph.replay()  # (one more replay, then a step where the first param has no gradient)
    _set_grads(eager, grads[55])
    ref.step()
    for params in (captured, eager):
        params[0].grad = None
        _set_grads(params[1:], grads[54][1:])
    opt.step()
    ref.step()
    for p, q in zip(captured, eager, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0 if exact else 1e-6,
                                   atol=0 if exact else 1e-7)
    counts = {k: st.get("step") for k, st in opt.state_dict()["state"].items()}
    assert counts == {k: st.get("step") for k, st in ref.state_dict()["state"].items()}
    if all(count is None for count in counts.values()):
        return  # (Muon keeps no step count: its params never drift apart)
    with pytest.raises(RuntimeError, match="one at a time"), \
            torch.cuda.graph(torch.cuda.CUDAGraph()):
        opt.step()  # (params at different step counts: not capturable)


@pytest.mark.parametrize("mode", ["remainder", "none"])
def test_fot_cuda_master_weights_and_capture(mode):
    """bfloat16 CUDA params with master_weights: with remainders the master equals a float32
    master run's bit for bit; without a master the params stay within an ulp of it; a
    captured step replays as eager steps do (the rounding's bits from the device's count)."""
    gen = torch.Generator(device="cuda").manual_seed(41)
    shapes = [(64, 33), (257,), (3, 5, 7)]
    values = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
             for _ in range(24)]
    runs = {}
    for name in ("fp32", mode, f"{mode}-captured"):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = fot.AdamW(params, lr=3e-3, master_weights=name.split("-")[0])
        if name.endswith("captured"):
            for gs in grads[:3]:
                _set_grads(params, gs)
                opt.step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for gs in grads[3:]:
                _set_grads(params, gs)
                graph.replay()
            opt.sync_step_count()
        else:
            for gs in grads:
                _set_grads(params, gs)
                opt.step()
        runs[name] = params, opt
    made = runs[mode][1].state_dict()["state"]  # (one group: indices in param order)
    for i, (p, q, r) in enumerate(zip(runs[mode][0], runs[f"{mode}-captured"][0],
                                      runs["fp32"][0], strict=True)):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        master = runs["fp32"][1].state[r]["master_param"]
        if mode == "remainder":
            assert torch.equal(made[i]["master_param"].view(torch.int32),
                               master.view(torch.int32))
        else:
            ulp = torch.finfo(torch.bfloat16).eps * master.abs().clamp_min(1e-30)
            assert ((p.float() - master).abs() <= 4 * ulp).all()


#: a multi-tensor launch's tensors: several chunks (MULTI_CHUNK = 65536) with a short last
#: one, exactly one chunk, and tensors smaller than a vector or an int8 block
MULTI_SHAPES = [(70001,), (257, 129), (1,), (1031,), (3, 700), (65536,)]


def _multi_values(dtype, seed, steps):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    values = [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in MULTI_SHAPES]
    grads = [[torch.randn(s, device="cuda", generator=gen).to(dtype) for s in MULTI_SHAPES]
             for _ in range(steps)]
    return values, grads


@pytest.mark.parametrize("name,kw,state_dtype,dtype", [
    ("AdamW", dict(lr=3e-3, weight_decay=0.1), "float32", torch.float32),
    ("AdamW", dict(lr=3e-3, amsgrad=True), "bfloat16", torch.float32),
    ("Adam", dict(lr=3e-3, weight_decay=0.01), "int8", torch.float32),
    ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True), "float32", torch.float32),
    ("Lion", dict(lr=1e-3, weight_decay=0.1), "float32", torch.bfloat16),
    ("AdamW", dict(lr=3e-3, master_weights="remainder"), "int8", torch.bfloat16),
])
def test_fot_multi_tensor_mode_is_one_launch_per_group(name, kw, state_dtype, dtype,
                                                       monkeypatch):
    """multi_tensor=True on CUDA: a group's params step in one multi-tensor launch (bound
    once, a block per chunk of each param), bit for bit as a launch per param (MULTI_LAUNCH
    off: the same element indices, so the same rounding bits) and, with float32 state, as the
    flat mode."""
    from fastopt.gpu import launch as gpu_launch
    from fastopt.torch import _base

    binds = []
    real = gpu_launch.bind_multi

    def counted(op, fmt, tensors, *args, **kwargs):
        binds.append(len(tensors))
        return real(op, fmt, tensors, *args, **kwargs)

    monkeypatch.setattr(gpu_launch, "bind_multi", counted)
    values, grads = _multi_values(dtype, 51, 6)
    runs = {}
    for mode in ("multi", "alone", "flat"):
        monkeypatch.setattr(_base, "MULTI_LAUNCH", mode != "alone")
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = getattr(fot, name)(params, multi_tensor=mode != "flat", state_dtype=state_dtype,
                                 **kw)
        for gs in grads:
            _set_grads(params, gs)
            opt.step()
        runs[mode] = params, opt
    # one launch over every param, bound once (SGD's again at step 2: its momentum buffer
    # is set from the first gradient at step 1, the launch's ``fresh``)
    first_grad = bool(getattr(fot, name).definition.first_grad_state)
    assert binds == [len(MULTI_SHAPES)] * (1 + first_grad)
    (multi, opt), (alone, ref) = runs["multi"], runs["alone"]
    for p, q in zip(multi, alone, strict=True):
        assert torch.equal(p.view(torch.uint8), q.view(torch.uint8))
    a, b = opt.state_dict()["state"], ref.state_dict()["state"]
    assert a.keys() == b.keys() and a
    for i in a:
        for key, value in a[i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value.cpu().view(-1).view(torch.uint8),
                                   b[i][key].cpu().view(-1).view(torch.uint8)), (i, key)
    if state_dtype == "float32":
        for p, q in zip(multi, runs["flat"][0], strict=True):
            assert torch.equal(p.view(torch.uint8), q.view(torch.uint8))


def test_fot_multi_tensor_step_captured_in_a_cuda_graph():
    """A multi-tensor launch captured in torch.cuda.graph after eager warm-up steps: the
    replays equal eager flat-mode steps with the schedule advancing on the device; the step
    counts follow the launch's counter; a step without one param's gradient launches the
    others together and the lone one alone, both equal to the flat mode's."""
    values, grads = _multi_values(torch.float32, 52, 30)
    schedule = S.warmup(S.cosine(3e-3, 40, end_lr=1e-4), 5)
    captured = [torch.nn.Parameter(v.clone()) for v in values]
    eager = [torch.nn.Parameter(v.clone()) for v in values]
    opt = fot.AdamW(captured, lr=schedule, weight_decay=0.1, multi_tensor=True)
    ref = fot.AdamW(eager, lr=schedule, weight_decay=0.1)
    _capture_and_replay(opt, captured, grads[:3], grads[3:25])
    for gs in grads[:25]:
        _set_grads(eager, gs)
        ref.step()
    assert [r.captured for r in opt._multi_launches.values()] == [True]  # (one launch)
    opt.sync_step_count()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    counts = {k: st["step"] for k, st in opt.state_dict()["state"].items()}
    assert counts == {k: st["step"] for k, st in ref.state_dict()["state"].items()}
    for params, o in ((captured, opt), (eager, ref)):
        _set_grads(params, grads[25])
        o.step()
        params[0].grad = None
        _set_grads(params[1:], grads[26][1:])
        o.step()
        _set_grads(params, grads[27])
        o.step()
    for p, q in zip(captured, eager, strict=True):
        assert torch.equal(p.detach(), q.detach())
    counts = {k: st["step"] for k, st in opt.state_dict()["state"].items()}
    assert counts == {k: st["step"] for k, st in ref.state_dict()["state"].items()}


FSDP_STEPS = 12


def _fsdp_one_rank(rank, port, out_path):
    """One nccl process: a CUDA MLP under fully_shard, fastopt.torch.AdamW (its DTensor
    params' local shards stepped by one multi-tensor launch) against torch.optim.AdamW on
    the same model and batches; saves the largest relative difference of the full params
    and how many times the multi-tensor launch was bound."""
    import os
    import traceback

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fastopt.gpu import launch as gpu_launch

    out = {}
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=1)
        binds = []
        real = gpu_launch.bind_multi

        def counted(op, fmt, tensors, *args, **kwargs):
            binds.append(len(tensors))
            return real(op, fmt, tensors, *args, **kwargs)

        gpu_launch.bind_multi = counted

        def sharded():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                                    torch.nn.Linear(256, 10)).cuda()
            for layer in m:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            return fully_shard(m)

        ours, theirs = sharded(), sharded()
        runs = ((ours, fot.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)),
                (theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)))
        gen = torch.Generator(device="cuda").manual_seed(3)
        for _ in range(FSDP_STEPS):
            x = torch.randn(32, 64, device="cuda", generator=gen)
            for model, opt in runs:
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        torch.cuda.synchronize()
        with torch.no_grad():
            out["rel"] = max(float((p.full_tensor() - q.full_tensor()).abs().max()
                                   / q.full_tensor().abs().max())
                             for p, q in zip(ours.parameters(), theirs.parameters(),
                                             strict=True))
        out["binds"] = binds
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        torch.save(out, out_path)
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)


def test_fot_fsdp2_one_nccl_rank_binds_its_multi_tensor_launch_once(tmp_path):
    """FSDP2 on a card (one nccl process): fastopt.torch.AdamW over DTensor params equals
    torch.optim.AdamW, and its multi-tensor launch is bound at the first step only. FSDP2
    makes new gradient tensors each step; the launch is keyed by where they lie, and torch's
    caching allocator hands the same memory out again (bench/NOTES.md, fourteenth session:
    the assumption this checks). Each bind copies the tables to the device, a host sync."""
    import socket

    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "out")
    mp.start_processes(_fsdp_one_rank, args=(port, out_path), nprocs=1, join=True,
                       start_method="spawn")
    out = torch.load(out_path)
    assert "error" not in out, out["error"]
    assert out["rel"] < 1e-5, out
    assert out["binds"] and out["binds"][0] == 4, out  # (one launch over the 4 params)
    assert len(out["binds"]) < FSDP_STEPS // 2, out  # (bound again only where they moved)
