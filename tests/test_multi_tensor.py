"""fastopt.torch's multi-tensor mode (``multi_tensor=True``): each param stepped in its own
storage, a kernel call per param, not packed into flat buffers fastopt owns; for params it
cannot own (shared with another optimizer; later: FSDP2's local shards)."""

import contextlib
import copy
import sys
import warnings

import numpy as np
import pytest
from optimizer_cases import CASES

torch = pytest.importorskip("torch")
import fastopt.torch as fot  # noqa: E402
from fastopt.algorithms import REGISTRY  # noqa: E402


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 3)).to(dtype)


def _params(model, name):
    """Muon takes the matrices only."""
    return [p for p in model.parameters() if p.ndim == 2 or REGISTRY[name].matrix is None]


def _steps(params, opt, steps, seed=5):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        opt.step()


def _bits(t):
    return t.detach().view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) \
        else t.detach()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_multi_tensor_mode_equals_the_flat_mode(name):
    """Every optimizer, its last test option: the same params and state bit for bit."""
    cls, hypers = CASES[name].options[-1]
    runs = []
    for multi in (False, True):
        model = _model()
        params = _params(model, name)
        opt = getattr(fot, cls)(params, multi_tensor=multi,
                                **{k: v for k, v in hypers.items() if k != "segments"})
        if REGISTRY[name].modes is not None:
            opt.train()
        _steps(params, opt, 4)
        runs.append((params, opt))
    (flat_params, flat), (multi_params, multi) = runs
    assert multi.multi_tensor and not flat.multi_tensor
    for p, q in zip(flat_params, multi_params, strict=True):
        assert torch.equal(_bits(p), _bits(q))
        assert q.data_ptr() == q.untyped_storage().data_ptr()  # (its own storage, not a view)
    a, b = flat.state_dict()["state"], multi.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]) if isinstance(value, torch.Tensor) \
                else value == b[i][key]


def test_multi_tensor_mode_with_16_bit_params_state_dicts_and_copies():
    """bfloat16 params with remainders (bit for bit as the flat mode) and with int8 state
    (its stochastic rounding draws other bits: each param's elements are numbered from 0);
    state dicts load across the modes and into torch.optim; deepcopy; step in backward."""
    runs = {}
    for multi in (False, True):
        model = _model(torch.bfloat16)
        params = list(model.parameters())
        opt = fot.AdamW(params, lr=1e-2, master_weights="remainder", multi_tensor=multi)
        _steps(params, opt, 3)
        runs[multi] = params, opt
    for p, q in zip(runs[False][0], runs[True][0], strict=True):
        assert torch.equal(_bits(p), _bits(q))
    int8 = fot.AdamW(_model(torch.bfloat16).parameters(), lr=1e-2, state_dtype="int8",
                     master_weights="none", multi_tensor=True)
    _steps(list(int8.param_groups[0]["params"]), int8, 3)
    fot.AdamW(_model(torch.bfloat16).parameters(), lr=1e-2, state_dtype="int8",
              master_weights="none").load_state_dict(int8.state_dict())
    saved = runs[True][1].state_dict()
    model = _model(torch.bfloat16)
    flat = fot.AdamW(model.parameters(), lr=1e-2, master_weights="remainder")
    flat.load_state_dict(saved)
    into = fot.AdamW(_model(torch.bfloat16).parameters(), lr=1e-2, master_weights="remainder",
                     multi_tensor=True)
    into.load_state_dict(runs[False][1].state_dict())
    for x, y in zip(flat.state_dict()["state"].values(), into.state_dict()["state"].values(),
                    strict=True):
        assert torch.equal(x["master_param"], y["master_param"])
    torch.optim.AdamW(_model(torch.bfloat16).parameters()).load_state_dict(saved)
    copied = copy.deepcopy(runs[True][1])
    assert copied.multi_tensor
    # step in backward: the same numbers as step()
    a, b = _model(), _model()
    opt_a = fot.Adam(a.parameters(), lr=1e-2, multi_tensor=True)
    opt_b = fot.Adam(b.parameters(), lr=1e-2, multi_tensor=True)
    handle = fot.step_in_backward(b, opt_b)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).square().mean().backward()
        opt_a.step()
        b(x).square().mean().backward()
    handle.remove()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_params_shared_with_another_optimizer():
    """A flat-mode optimizer owns the params' storage; a multi-tensor one steps them where they
    live: each step is what the two optimizers' steps give one after the other."""
    model, reference = _model(), _model()
    owner = fot.AdamW(model.parameters(), lr=1e-2)
    second = fot.SGD(model.parameters(), lr=0.1, momentum=0.9, multi_tensor=True)
    ref_owner = fot.AdamW(reference.parameters(), lr=1e-2)
    ref_second = fot.SGD(reference.parameters(), lr=0.1, momentum=0.9, multi_tensor=True)
    with pytest.raises(RuntimeError, match="stepped in place by a fastopt optimizer"):
        fot.Adagrad(model.parameters())  # (the flat mode refuses them)
    for seed in range(3):
        for opt, params in ((owner, model), (second, model), (ref_owner, reference),
                            (ref_second, reference)):
            _steps(list(params.parameters()), opt, 1, seed=seed)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(),
                                                 strict=True))


def test_the_group_schedule_follows_the_params_that_step():
    """A frozen first layer: the group's lr (a fastopt schedule, and a torch scheduler on
    top) follows the params that do step, in both modes alike."""
    from fastopt import schedules as S

    runs = []
    for multi in (False, True):
        model = _model()
        for p in model[0].parameters():
            p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = fot.SGD(model.parameters(), lr=S.cosine(1.0, 10), multi_tensor=multi)
        lrs = []
        for _ in range(4):
            _steps(params, opt, 1)
            lrs.append(opt.param_groups[0]["lr"])
        runs.append((lrs, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] == pytest.approx([S.cosine(1.0, 10).at(k)
                                                      for k in range(1, 5)])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1], strict=True))


def test_multi_tensor_mode_refusals():
    weight = torch.nn.Parameter(torch.randn(6, 4).t())  # (a transposed view)
    with pytest.raises(ValueError, match="must be contiguous"):
        fot.AdamW([weight], multi_tensor=True)
    with pytest.raises(TypeError, match="multi_tensor must be a bool"):
        fot.AdamW(_model().parameters(), multi_tensor="yes")
    model = _model()
    opt = fot.AdamW(model.parameters(), multi_tensor=True)
    with pytest.raises(RuntimeError, match="stepped in place by a fastopt optimizer"):
        fot.Adagrad(model.parameters())  # (it would move them away from where opt steps)
    model.to(torch.float64)  # (new storage of another dtype for every param)
    with pytest.raises(RuntimeError, match="replaced by a tensor of another dtype"):
        _steps(list(model.parameters()), opt, 1)


def test_a_replaced_storage_is_followed():
    """load_state_dict(assign=True) with torch's swap_module_params_on_conversion (the same
    Parameter objects over new storage with new values): the multi-tensor mode steps the new
    storage with the state it has, as torch.optim does; the flat mode refuses (its buffer
    was the params' storage). (Without that flag assign=True makes new Parameter objects,
    which no optimizer built before holds, torch's included.)"""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model, ref = _model(), _model()
        opt = fot.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, multi_tensor=True)
        twin = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        _steps(list(model.parameters()), opt, 3)
        _steps(list(ref.parameters()), twin, 3)
        new = {k: v * 0.5 for k, v in _model().state_dict().items()}
        weight, address = model[0].weight, model[0].weight.data_ptr()
        model.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
        ref.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
        assert model[0].weight is weight and weight.data_ptr() != address
        _steps(list(model.parameters()), opt, 3, seed=6)
        _steps(list(ref.parameters()), twin, 3, seed=6)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert float(opt.state[weight]["step"]) == 6
        flat = _model()
        flat_opt = fot.AdamW(flat.parameters(), lr=1e-2)
        flat.load_state_dict(new, assign=True)
        with pytest.raises(RuntimeError, match="use multi_tensor=True"):
            _steps(list(flat.parameters()), flat_opt, 1)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def test_state_moved_with_a_shared_chunk_is_followed(monkeypatch):
    """Module.share_memory() on a gradient that is a piece of an arena chunk moves the whole
    chunk, other params' state in it too: the next step follows it (as the flat mode does),
    here for a param without a gradient at that time, whose state spills into that chunk."""
    from fastopt.torch import _base

    monkeypatch.setattr(_base, "ARENA_CHUNK_BYTES", 8192)
    runs = []
    for multi in (True, False):
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Module()
        model.x = torch.nn.Parameter(torch.randn(1000, generator=g))
        model.y = torch.nn.Parameter(torch.randn(500, generator=g))
        x, y = model.x, model.y
        model.share_memory()
        opt = fot.AdamW([x, y], lr=1e-2, multi_tensor=multi)
        x.grad, y.grad = torch.randn(1000, generator=g), torch.randn(500, generator=g)
        opt.step()
        x.grad = None
        model.share_memory()  # (y's gradient, fastopt's, moves: with it x's exp_avg_sq)
        y.grad.copy_(torch.randn(500, generator=g))
        opt.step()
        x.grad, y.grad = torch.randn(1000, generator=g), torch.randn(500, generator=g)
        opt.step()
        runs.append([x.detach().clone(), y.detach().clone(),
                     opt.state[x]["exp_avg_sq"].clone()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_cpu_kernel_calls_wait_for_the_groups_bookkeeping(monkeypatch):
    """The multi-tensor mode's CPU kernel calls run back to back once every param of the
    group has been prepared, each param counted after its call; a param refused at the step
    leaves the ones before it stepped (as torch.optim's loop would), itself and the ones
    after it untouched; a failing call leaves the params after it unstepped and uncounted."""
    from fastopt.torch import _base

    values = [torch.randn(s, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate([(40,), (6, 7), (30,)])]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    twins = [torch.nn.Parameter(v.clone()) for v in values]
    opt = fot.AdamW(params, lr=1e-2, weight_decay=0.1, multi_tensor=True)
    twin = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    seen = []
    real = _base.run_once

    fail = [False]

    def spy(*args):  # (the steps every bucket counts when a kernel runs)
        seen.append([b.step for b in opt._buckets[0]])
        if fail[0] and len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(_base, "run_once", spy)
    for p, q, g in zip(params, twins, [torch.randn(v.shape) for v in values], strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert seen == [[0, 0, 0]] * 3
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in params]
    params[1].data = params[1].data.double()  # (refused at the step: another dtype)
    with pytest.raises(RuntimeError):
        opt.step()
    twin.step()  # (torch's loop would have stepped params[0] before failing on params[1])
    torch.testing.assert_close(params[0], twins[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(params[2], before[2])
    assert [float(opt.state[p]["step"]) for p in params] == [2, 1, 1]
    params[1].data = before[1].clone()  # (back: same dtype and shape, followed)
    seen.clear()
    fail[0] = True
    with pytest.raises(KeyboardInterrupt):
        opt.step()  # (the second call fails: params[1] and params[2] take no step)
    assert [float(opt.state[p]["step"]) for p in params] == [3, 1, 1]
    assert torch.equal(params[2], before[2])


@pytest.mark.parametrize("onto", ["grad", "exp_avg"])
def test_a_storage_shared_with_the_optimizers_own_buffers_is_refused(onto):
    """A param moved onto the optimizer's own gradient or state buffer (``p.data = p.grad``)
    would be a kernel argument overlapping another (the kernels assume none do): refused
    at the step, nothing changed."""
    model = _model()
    opt = fot.AdamW(model.parameters(), lr=1e-2, multi_tensor=True)
    params = list(model.parameters())
    _steps(params, opt, 2)
    p = params[0]
    before = p.detach().clone()
    if onto == "grad":
        opt.zero_grad(set_to_none=False)  # (p.grad: the optimizer's buffer from here on)
    p.data = p.grad if onto == "grad" else opt.state[p]["exp_avg"]
    kept = p.detach().clone()
    with pytest.raises(RuntimeError, match="shares memory with this optimizer's own"):
        _steps(params, opt, 1)
    assert torch.equal(p.detach(), kept) and not torch.equal(kept, before)


@pytest.mark.parametrize("master_weights", ["fp32", "remainder"])
def test_a_moved_16_bit_param_keeps_its_master(master_weights):
    """A bfloat16 param moved to new storage with the same values keeps its float32 master
    (bit for bit the run without the move); new values replace it (as refresh_master())."""
    runs = []
    for move in (False, True):
        model = _model(torch.bfloat16)
        opt = fot.AdamW(model.parameters(), lr=1e-2, master_weights=master_weights,
                        multi_tensor=True)
        _steps(list(model.parameters()), opt, 3)
        if move:
            for p in model.parameters():
                p.data = p.data.clone()
        _steps(list(model.parameters()), opt, 3, seed=6)
        runs.append([_bits(p).clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    model = _model(torch.bfloat16)
    opt = fot.AdamW(model.parameters(), lr=1e-2, master_weights=master_weights,
                    multi_tensor=True)
    _steps(list(model.parameters()), opt, 2)
    p = model[0].weight
    p.data = torch.full_like(p, 0.5)
    _steps([p], opt, 1)  # (one more step from 0.5, not from the old master)
    assert float((p.float() - 0.5).abs().max()) < 0.05


def test_gpu_launches_are_batched_by_every_kernel_argument(monkeypatch):
    """The multi-tensor mode's GPU launches (deferred to a group's end, made by
    ``_launch_deferred``), batched here on CPU buckets: params alike in format, state format,
    hyperparameters, schedule, ``fresh`` and step share one launch; a difference in any of
    them gives its own. Every batch is launched before the first error is raised."""
    params = [torch.nn.Parameter(torch.randn(3 + i)) for i in range(10)]
    params[2] = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))
    opt = fot.AdamW(params, multi_tensor=True, weight_decay=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    schedule, other_schedule = object(), object()
    entries = []
    for b in opt._buckets[0]:
        ((_, prepared),) = b.prepared.values()
        entries.append([b, prepared, None, schedule, 2, False])
    entries[3][4] = 3  # (a param one step ahead)
    for i in (5, 9):  # (another weight decay: the two alike)
        entries[i][1] = copy.copy(entries[i][1])
        entries[i][1].weight_decay = 0.2
    entries[6][1] = copy.copy(entries[6][1])  # (bfloat16 state)
    entries[6][1].states = [s.view(np.uint16) for s in entries[6][1].states]
    entries[7][5] = True  # (SGD's first gradient taken as the momentum)
    entries[8][3] = other_schedule
    entries = [tuple(e) for e in entries]
    seen = []

    def index(b):
        return next(i for i, p in enumerate(params) if p is b.params[0])

    def multi(batch):
        seen.append([index(e[0]) for e in batch])
        return True

    monkeypatch.setattr(opt, "_launch_multi", multi)
    monkeypatch.setattr(opt, "_launch_bucket", lambda b, *_: seen.append(index(b)))
    opt._launch_deferred(entries)
    assert seen == [[0, 1, 4], 2, 3, [5, 9], 6, 7, 8]

    def failing(b, *_):  # (a lone launch that raises: the later ones still made)
        seen.append(index(b))
        if index(b) in (1, 3, 7):
            raise RuntimeError(f"launch {index(b)}")

    seen.clear()
    monkeypatch.setattr(opt, "_launch_bucket", failing)
    with pytest.raises(RuntimeError, match="launch 3") as raised:
        opt._launch_deferred(entries)
    assert seen == [[0, 1, 4], 2, 3, [5, 9], 6, 7, 8]
    if sys.version_info >= (3, 11):
        assert "launch 7" in str(raised.value.__notes__)

    # a set whose launch could not be made: a launch each, every one made though one raises
    seen.clear()
    monkeypatch.setattr(opt, "_launch_multi", lambda batch: False)
    with pytest.raises(RuntimeError, match="launch 1"):
        opt._launch_deferred(entries)
    assert seen == [0, 1, 4, 2, 3, 5, 9, 6, 7, 8]


class _FakeDevice:
    """``_launch_multi`` run on CPU buckets: torch's CUDA stream and capture state, CuPy's
    stream and the device tables faked; ``bind_multi`` records what it binds and gives a
    launch that records its calls (or raises, ``fail``)."""

    def __init__(self, monkeypatch):
        from types import SimpleNamespace

        from fastopt.engine import Prepared
        from fastopt.gpu import launch as gpu_launch
        from fastopt.torch import _base

        self.binds, self.calls, self.syncs = [], [], []
        self.fail = self.fail_launch = self.capturing = False
        self.stream = 1
        cuda = _base.torch.cuda
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: SimpleNamespace(
            cuda_stream=self.stream, device_index=0))
        monkeypatch.setattr(cuda, "is_current_stream_capturing", lambda: self.capturing)
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.syncs.append(device))
        monkeypatch.setattr(_base, "_capturing", lambda: self.capturing)
        monkeypatch.setattr(_base, "_cupy_stream", lambda *_: contextlib.nullcontext())
        monkeypatch.setattr(_base, "device_table", lambda schedule, index: np.zeros((2, 4)))
        monkeypatch.setattr(Prepared, "kernel_values", lambda prep, grads, *_: (prep, grads))
        monkeypatch.setattr(gpu_launch, "bind_multi", self.bind_multi)

    def bind_multi(self, op, dtype, values):
        self.binds.append(len(values))
        if self.fail:
            raise RuntimeError("no kernel")
        bound = len(self.binds)

        def launch():
            if self.fail_launch:
                raise RuntimeError("launch failed")
            self.calls.append(bound)
        return launch


def _multi_entries(opt, step, grads=None):
    """``_launch_deferred``'s entries for each in-place bucket of ``opt``'s first group."""
    entries = []
    for b in opt._buckets[0]:
        ((_, prepared),) = b.prepared.values()
        entries.append((b, prepared, grads, opt._schedule_for_test, step, False))
    return entries


def test_multi_tensor_launches_bound_once_kept_while_captured_evicted_least_recent(
        monkeypatch):
    """``_launch_multi``'s bookkeeping on CPU buckets with a faked device: a launch bound
    once per set of buckets and objects, bound again when they change (``p.data = ...``
    unbinds it); a graph's captured launches kept, and only those; a launch that cannot be
    bound warns once and is not tried again; past MULTI_LAUNCHES_KEPT the least recently
    used set is dropped, never one of this step's or a captured one; an error in a capture
    is raised, without a warning or a fallback."""
    from fastopt.torch import _base

    device = _FakeDevice(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(4 + i)) for i in range(4)]
    opt = fot.AdamW(params, multi_tensor=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt._schedule_for_test = object()
    lone = []
    monkeypatch.setattr(opt, "_launch_bucket", lambda b, *_: lone.append(b))
    launches = opt.__dict__.setdefault("_multi_launches", {})

    opt._launch_deferred(_multi_entries(opt, 2))
    opt._launch_deferred(_multi_entries(opt, 3))
    ((record),) = launches.values()
    assert device.binds == [4] and device.calls == [1, 1] and not lone
    assert record.device_step == 3 and int(record.counter[0]) == 1  # (set at bind: step 1)
    assert all(b.launches == [record] for b in opt._buckets[0])

    # captured (the device holds step - 1), then bound again eagerly: the captured one kept
    device.capturing = True
    opt._launch_deferred(_multi_entries(opt, 4))
    assert record.captured and record.kept == [record.launch] and record.device_step == 3
    device.capturing = False
    opt._launch_deferred(_multi_entries(opt, 4))
    captured = record.launch
    params[0].data = params[0].data.clone()  # (a replaced storage unbinds the launch)
    opt._buckets[0][0].check_address(0)
    assert record.launch is None and record.kept == [captured]
    opt.step()  # (the CPU kernels: the bucket's call prepared again)
    opt._launch_deferred(_multi_entries(opt, 5))
    grads = np.zeros(8, np.float32)
    opt._launch_deferred(_multi_entries(opt, 6, grads))  # (gradients elsewhere: bound again)
    assert device.binds == [4, 4, 4] and record.kept == [captured]
    assert record.device_step == 6

    # a capture needs a bound launch at its step: raised, no warning, nothing launched
    device.capturing = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="warm"):
            opt._launch_deferred(_multi_entries(opt, 9))
        device.fail_launch = True
        with pytest.raises(RuntimeError, match="launch failed"):
            opt._launch_deferred(_multi_entries(opt, 7, grads))
    assert not lone
    device.capturing = device.fail_launch = False

    # a failing bind: a warning and a launch each, then the same objects not tried again
    device.fail = True
    grads = np.zeros(8, np.float32)
    with pytest.warns(RuntimeWarning, match="one launch each"):
        opt._launch_deferred(_multi_entries(opt, 7, grads))
    assert len(lone) == 4 and record.device_step is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt._launch_deferred(_multi_entries(opt, 8, grads))
    assert len(lone) == 8 and device.binds == [4, 4, 4, 4]
    device.capturing = True  # (in a capture too: a launch each, as at the warm-up)
    opt._launch_deferred(_multi_entries(opt, 9, grads))
    assert len(lone) == 12 and device.binds == [4, 4, 4, 4]
    device.capturing = False
    device.fail = False
    opt._launch_deferred(_multi_entries(opt, 9))  # (gradients elsewhere: tried, bound)
    assert len(lone) == 12 and device.binds == [4, 4, 4, 4, 4] and record.device_step == 9
    assert int(record.counter[0]) == 8

    # gradients made anew where the last ones lay (FSDP2's, each step): the same tables;
    # elsewhere, or of another length or type: bound again. The launch holds no gradient.
    memory = np.zeros(64, np.float32)
    opt._launch_deferred(_multi_entries(opt, 10, memory[:8]))
    binds = len(device.binds)
    opt._launch_deferred(_multi_entries(opt, 11, memory[:8]))
    assert len(device.binds) == binds and record.device_step == 11
    for step, moved in enumerate((memory[8:16], memory[8:15], memory[8:16].view(np.int32),
                                  memory[8:16].view(np.int32)), 12):
        opt._launch_deferred(_multi_entries(opt, step, moved))
    assert len(device.binds) == binds + 3
    import gc
    import weakref

    gone = np.zeros(8, np.float32)
    alive = weakref.ref(gone)
    opt._launch_deferred(_multi_entries(opt, 16, gone))
    del gone
    gc.collect()
    assert alive() is None

    # eviction: two sets kept; a set of another step evicts the least recent uncaptured one
    monkeypatch.setattr(_base, "MULTI_LAUNCHES_KEPT", 2)
    record.captured = False
    entries = _multi_entries(opt, 20)
    opt._launch_serial += 1
    opt._launch_deferred(entries[:2])
    opt._launch_deferred(entries[2:])  # (the same step: both kept)
    assert len(launches) == 2 and record not in opt._buckets[0][0].launches
    first_two = launches[tuple(map(id, opt._buckets[0][:2]))]
    opt._launch_serial += 1
    device.stream = 2  # (used on another stream: waited for before it is dropped)
    opt._launch_deferred(entries[:2])
    opt._launch_serial += 1
    opt._launch_deferred(entries[1:3])
    assert list(launches.values())[0] is first_two and len(launches) == 2
    assert device.syncs == []  # (the evicted ones were used on one stream each)
    first_two.captured = True  # (a captured one is never evicted)
    opt._launch_serial += 1
    opt._launch_deferred(entries[:3])
    assert first_two in launches.values() and len(launches) == 2
    first_two.captured = False
    opt._launch_serial += 1
    opt._launch_deferred(entries[1:])
    assert first_two not in launches.values() and len(device.syncs) == 1
    assert all(first_two not in b.launches for b in opt._buckets[0])

    # more sets in one step than kept: all kept that step, then evicted down to the limit
    opt._launch_serial += 1
    for first in range(3):
        opt._launch_deferred(entries[first:first + 2])
    opt._launch_deferred(entries[::3])
    assert len(launches) == 4
    opt._launch_serial += 1
    opt._launch_deferred(entries[::2])
    assert len(launches) == 2
    serial = opt._launch_serial
    opt.step()  # (each step() counts one)
    assert opt._launch_serial == serial + 1


def test_captured_counters_follow_eager_steps():
    """A captured launch's device counter (a bucket's own or a multi-tensor launch's) takes
    its params' count after eager steps taken another way, where they agree."""
    from fastopt.torch import _base

    params = [torch.nn.Parameter(torch.randn(4 + i)) for i in range(2)]
    opt = fot.AdamW(params, multi_tensor=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    b, other = opt._buckets[0]
    b.counter, b.captured, b.device_step = torch.zeros(2, dtype=torch.int64), True, 0
    record = _base._MultiLaunch([b, other], torch.device("cpu"))
    record.captured, record.device_step = True, 1
    opt.__dict__["_multi_launches"] = {(id(b), id(other)): record}
    opt._sync_captured_counters()
    assert int(b.counter[0]) == 2 and b.device_step == 2
    assert int(record.counter[0]) == 2 and record.device_step == 2
    other.step = 3  # (counts that differ: the launch keeps its own)
    record.device_step = 1
    opt._sync_captured_counters()
    assert record.device_step == 1


def test_captured_bucket_counters_synced_after_every_step_and_step_in_backward(monkeypatch):
    """A bucket's own captured launch (its device counter) takes the bucket's count after
    any eager step (there being no multi-tensor launch), where its params agree; and
    step in backward ends each backward with the same sync."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = fot.AdamW(params)
    (b,) = opt._buckets[0]
    b.counter, b.captured, b.device_step = torch.zeros(2, dtype=torch.int64), True, 0
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert b.step == 2 and int(b.counter[0]) == 2 and b.device_step == 2
    params[1].grad = None  # (a step of one param: counts differ, the counter stays)
    opt.step()
    assert not b.uniform and int(b.counter[0]) == 2

    model = torch.nn.Linear(4, 2)
    opt = fot.AdamW(model.parameters())
    calls = []
    monkeypatch.setattr(opt, "_sync_captured_counters", lambda: calls.append(1))
    handle = fot.step_in_backward(model, opt)
    model(torch.randn(3, 4)).sum().backward()
    handle.remove()
    assert calls == [1]


def test_an_error_in_a_group_still_launches_and_syncs_what_stepped(monkeypatch):
    """A bucket's error while a group's launches are deferred: the buckets stepped before
    it are launched (a failure there noted on the first error, which is raised), and the
    captured counters are synced all the same."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = fot.AdamW(params, multi_tensor=True)
    for p in params:
        p.grad = torch.ones_like(p)
    real = opt._step_bucket
    calls, launched, synced = [], [], []

    def step_bucket(group, schedule, b, hypers):
        calls.append(b)
        if len(calls) == 2:
            raise RuntimeError("the second bucket")
        real(group, schedule, b, hypers)
        opt._deferred.append(b)

    def launch_deferred(entries):
        launched.extend(entries)
        raise RuntimeError("its launch too")

    monkeypatch.setattr(opt, "_defers_launches", lambda buckets: True)
    monkeypatch.setattr(opt, "_step_bucket", step_bucket)
    monkeypatch.setattr(opt, "_launch_deferred", launch_deferred)
    monkeypatch.setattr(opt, "_sync_captured_counters", lambda: synced.append(1))
    with pytest.raises(RuntimeError, match="the second bucket") as raised:
        opt.step()
    assert launched == calls[:1] and synced == [1] and opt._deferred is None
    if sys.version_info >= (3, 11):
        assert "its launch too" in str(raised.value.__notes__)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_params_sharing_memory_stay_shared_in_the_flat_mode(name):
    """Separate Parameters over one tensor's memory (views of it): the flat mode steps those
    in place, as torch steps each where it lies, instead of packing them apart (they drifted
    apart before); params over disjoint parts of one tensor are packed as any others."""
    results = {}
    for kind in ("torch", "flat"):
        base = torch.randn(12, generator=torch.Generator().manual_seed(0))
        a, c = torch.nn.Parameter(base.view(4, 3)), torch.nn.Parameter(base.view(3, 4))
        other = torch.nn.Parameter(torch.ones(5))
        params = [a, other, c]
        opt = getattr(torch.optim, name)(params, lr=0.1) if kind == "torch" \
            else getattr(fot, name)(params, lr=0.1)
        for k in range(5):
            a.grad, c.grad = torch.full((4, 3), 1.0 + k), torch.full((3, 4), -0.5)
            other.grad = torch.ones(5)
            opt.step()
        assert a.data_ptr() == c.data_ptr() == base.data_ptr()
        results[kind] = [p.detach().clone() for p in params]
    for p, q in zip(results["flat"], results["torch"], strict=True):
        torch.testing.assert_close(p, q)
    base = torch.randn(12)
    parts = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[6:])]
    assert [b.in_place for b in fot.SGD(parts, lr=0.1)._buckets[0]] == [False]
    base = torch.randn(12)  # (strided views with no common element: packed, not flagged)
    strided = [torch.nn.Parameter(base[0::2]), torch.nn.Parameter(base[1::2])]
    assert [b.in_place for b in fot.SGD(strided, lr=0.1)._buckets[0]] == [False]
    # a transposed view of another param (tied as w and w.t()) fills the same memory: it
    # was packed apart (0.03 off torch after 3 AdamW steps); now refused, in either order,
    # in one group or two
    w = torch.randn(5, 7)
    tied = [torch.nn.Parameter(w), torch.nn.Parameter(w.t())]
    for params in (tied, tied[::-1], [{"params": [tied[0]]}, {"params": [tied[1]]}]):
        with pytest.raises(ValueError, match="shares memory with another param"):
            fot.AdamW(params, lr=0.1)
    opt = fot.AdamW([tied[0]], lr=0.1)
    with pytest.raises(ValueError, match="shares memory with another param"):
        opt.add_param_group({"params": [torch.nn.Parameter(tied[0].data.t())]})
    # 16-bit params sharing memory: a float32 master each would undo the other's update
    half = torch.zeros(4, dtype=torch.bfloat16)
    shared = [torch.nn.Parameter(half.view(4)), torch.nn.Parameter(half.view(2, 2))]
    for multi in (False, True):
        with pytest.raises(ValueError, match="master_weights='remainder'"):
            fot.SGD(shared, lr=1.0, multi_tensor=multi)
    opt = fot.SGD(shared, lr=1.0, master_weights="none")
    shared[0].grad = torch.ones(4, dtype=torch.bfloat16)
    shared[1].grad = torch.zeros(2, 2, dtype=torch.bfloat16)
    opt.step()
    assert half.tolist() == [-1.0] * 4  # (torch: -1; a master each gave 0)


def test_params_sharing_memory_across_param_groups_stay_shared():
    """Views of one tensor in different param groups (each with its lr) and a param added
    later as a view of a packed param: the flat mode steps each where it lies, in place, as
    torch does, whichever group comes first; not packed apart (they drifted apart before)."""
    results = {}
    for kind in ("torch", "flat", "multi"):
        base = torch.randn(12, generator=torch.Generator().manual_seed(0))
        a, c = torch.nn.Parameter(base.view(4, 3)), torch.nn.Parameter(base.view(3, 4))
        other = torch.nn.Parameter(torch.ones(5))
        groups = (g for g in [{"params": iter([other, a]), "lr": 0.1},  # (iterators: read
                              {"params": [c], "lr": 0.05}])            # once, as torch does)
        opt = torch.optim.Adam(groups) if kind == "torch" \
            else fot.Adam(groups, multi_tensor=kind == "multi")
        late = torch.nn.Parameter(other.data[1:3])  # (fastopt: a view of its flat buffer)
        opt.add_param_group({"params": [late], "lr": 0.2})
        for k in range(5):
            a.grad, c.grad = torch.full((4, 3), 1.0 + k), torch.full((3, 4), -0.5)
            other.grad, late.grad = torch.ones(5), torch.full((2,), 3.0)
            opt.step()
        assert a.data_ptr() == c.data_ptr() == base.data_ptr()
        assert late.data_ptr() == other.data_ptr() + late.element_size()
        results[kind] = [p.detach().clone() for p in (a, c, other, late)]
    for kind in ("flat", "multi"):
        for p, q in zip(results[kind], results["torch"], strict=True):
            torch.testing.assert_close(p, q)
    half = torch.zeros(4, dtype=torch.bfloat16)  # (16-bit, a float32 master each: refused)
    with pytest.raises(ValueError, match="master_weights='remainder'"):
        fot.SGD([{"params": [torch.nn.Parameter(half.view(4))]},
                 {"params": [torch.nn.Parameter(half.view(2, 2))]}], lr=1.0)
    with pytest.raises(TypeError, match="ordered collections"):  # (as torch)
        fot.SGD([{"params": {torch.nn.Parameter(torch.ones(2))}}], lr=1.0)


def test_add_param_group_compares_new_params_with_their_storages_only(monkeypatch):
    """add_param_group looks for shared memory among the earlier params in the new params'
    storages only (kept by storage between calls): a loop adding groups stays linear, where
    comparing with every earlier param each time made it quadratic."""
    from fastopt.torch import _base

    spans = []  # (the byte ranges worked out, and the storages looked up)
    for name in ("_memory_span", "_storage_of"):
        real = getattr(_base, name)
        monkeypatch.setattr(_base, name, lambda t, real=real: spans.append(1) or real(t))
    groups = [[torch.nn.Parameter(torch.randn(4)) for _ in range(3)] for _ in range(40)]
    opt = fot.Adam(groups[0], lr=0.1)
    for g in groups[1:]:
        opt.add_param_group({"params": g})
    assert len(spans) <= 8 * 3 * 40  # (quadratic: about 3 * 40 * 41 / 2 earlier ones)
    # (and still found: a view of a packed param, then a view of that view's memory)
    late = torch.nn.Parameter(groups[5][1].data[1:3])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4)), late]})
    opt.add_param_group({"params": [torch.nn.Parameter(late.data[1:])]})
    assert [b.in_place for b in opt._buckets[-2]] == [False, True]
    assert [b.in_place for b in opt._buckets[-1]] == [True]


def test_large_buffers_ask_for_huge_pages(monkeypatch):
    """A flat-mode bucket madvises its large CPU buffers (params, grads, master, state) for
    transparent huge pages, each over the whole pages inside it; the multi-tensor mode's
    buckets take theirs (grads, master, state) as pieces of madvised chunks (a chunk has
    room for two of the piece that starts it, so a 2 MB piece starts a 4 MB chunk)."""
    from fastopt.torch import _base

    calls = []
    monkeypatch.setattr(_base, "_madvise", lambda: lambda start, length, advice: calls.append(
        (start, length, advice)))
    n = _base.HUGE_PAGE_MIN_BYTES // 2 + 4096  # (bf16: each buffer just above the size)
    small = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))  # (below: none)

    def inside(t, whole: bool) -> bool:  # (a madvised range over t's pages, or around t)
        low, high = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(advice == _base._MADV_HUGEPAGE and start % 4096 == 0 and (
            0 <= start - low < 4096 and 0 <= high - (start + length) < 4096 if whole
            else start <= low and high <= start + length) for start, length, advice in calls)

    for multi in (False, True):
        calls.clear()
        p = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16))
        opt = fot.AdamW([p, small] if multi else [p], multi_tensor=multi)
        if multi:
            buffers = [t for b in opt._buckets[0] for t in
                       (b.grad, b.master, b.state["exp_avg"], b.state["exp_avg_sq"])]
            assert all(inside(t, whole=False) for t in buffers)
            chunks = {t.untyped_storage().data_ptr() for t in buffers}
            assert len(calls) == len(chunks) < len(buffers)
            continue
        [[b]] = opt._buckets
        buffers = [b.flat, b.grad, b.master, b.state["exp_avg"], b.state["exp_avg_sq"]]
        assert len(calls) == len(buffers)
        assert all(inside(t, whole=True) for t in buffers)


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
def test_multi_tensor_buffers_span_chunks_and_big_ones_stand_alone(monkeypatch, state_dtype):
    """With chunks of 8 KB: pieces fill a chunk, then a new one; a piece over half a chunk
    is a buffer of its own; no two buffers overlap, and the steps equal those with the
    default chunks (and the flat mode's, where no rounding is stochastic: README)."""
    from fastopt.torch import _base

    rng = torch.Generator().manual_seed(5)
    shapes = [(300,), (7, 90), (1500,), (5,), (2000,), (600,)]
    values = [torch.randn(s, generator=rng) for s in shapes]
    grads = [[torch.randn(s, generator=rng) for s in shapes] for _ in range(4)]
    runs = []
    for multi, chunk in ((False, None), (True, None), (True, 8192)):
        if chunk is not None:
            monkeypatch.setattr(_base, "ARENA_CHUNK_BYTES", chunk)
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = fot.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True,
                        state_dtype=state_dtype, multi_tensor=multi)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        runs.append(params)
    owned = [t for b in opt._buckets[0] for t in (b.grad, *b.state.values(),
                                                  *b.absmax.values())]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in owned)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    storages = {t.untyped_storage().data_ptr() for t in owned}
    assert 2 < len(storages) < len(owned)  # (several chunks, shared)
    alone = [t for t in owned if t.numel() * t.element_size() > 4096]
    assert alone and all(t.untyped_storage().nbytes() == t.numel() * t.element_size()
                         for t in alone)
    for flat, multi, small in zip(*runs, strict=True):
        assert torch.equal(multi, small)
        assert torch.equal(flat, multi) or state_dtype == "int8"


def test_a_small_optimizers_buffers_are_not_views_of_a_large_chunk():
    """The arena's chunks start at 1 MB and double: a small model's state tensors are views
    of 1 MB, not 64 MB (torch.save of one of them writes its storage: 64 MB for a bias), and
    a large model still reaches the largest chunks."""
    from fastopt.torch import _base

    model = torch.nn.Linear(10, 2)
    opt = fot.Adam(model.parameters(), multi_tensor=True)
    model(torch.ones(1, 10)).sum().backward()
    opt.step()
    storage = opt.state[model.bias]["exp_avg"].untyped_storage().nbytes()
    assert storage <= _base.ARENA_FIRST_CHUNK_BYTES + _base._PAGE
    arena = _base._Arena()
    sizes = []
    for _ in range(12):
        piece = arena.take(1 << 18, 0.0, torch.float32)  # 1 MB each
        sizes.append(piece.untyped_storage().nbytes() - _base._PAGE)
    assert sorted(set(sizes)) == [2 << 20, 4 << 20, 8 << 20]  # (room for two pieces)
