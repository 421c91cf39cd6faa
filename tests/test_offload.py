"""fastopt.torch.CPUOffload without a GPU: the same orchestration (hooks, copies on side
streams, the worker thread, the waits) over CPU "device" tensors and fake streams whose
copies run only when something waits for them, as a GPU's would. A missing wait leaves a
copy undone and the numbers wrong; every case compares with the fastopt.torch optimizer
stepping the same model without offload."""

import copy
import gc
import threading
import weakref

import pytest
import torch

import fastopt.torch as fot
from fastopt import schedules

STEPS = 6


class FakeStream:
    def __init__(self):
        self.pending: list = []
        self.issued = 0  # copies issued so far
        self.done = 0


class FakeEvent:
    def __init__(self, stream: FakeStream, count: int):
        self.stream, self.count = stream, count


class FakeTransfers:
    """Copies are queued per stream and run when an event after them is waited for."""

    def __init__(self):
        self.d2h, self.h2d = FakeStream(), FakeStream()
        self.lock = threading.Lock()

    def pinned(self) -> bool:
        return False

    def after_current(self, stream) -> None:
        pass  # (the host is the "current stream": what it issued has run)

    def copy(self, stream, dst, src) -> None:
        with self.lock:
            stream.pending.append((dst, src))
            stream.issued += 1

    def record(self, stream):
        with self.lock:
            return FakeEvent(stream, stream.issued)

    def synchronize(self, event) -> None:
        with self.lock:
            s = event.stream
            while s.done < event.count:
                dst, src = s.pending.pop(0)
                dst.copy_(src)  # (reads the source now, as a stream runs it late)
                s.done += 1

    def current_waits(self, event) -> None:
        self.synchronize(event)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24),
                            torch.nn.Tanh(), torch.nn.Linear(24, 3))
    m.unused = torch.nn.Parameter(torch.randn(5))  # gets no gradient: skipped, as by torch
    return m.to(dtype)


def _loss(m, step, scale=1.0):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=g).to(next(m.parameters()).dtype)
    return m(x).float().square().mean() * scale


def _offload(m, name="AdamW", bucket_elements=400, **kwargs):
    return fot.CPUOffload(m.parameters(), name, bucket_elements=bucket_elements,
                          _transfers=FakeTransfers(), **kwargs)


def _run(m, opt, steps=STEPS, *, clip=None, accumulate=1, scheduler=None, grad_scale=None):
    for step in range(steps):
        for micro in range(accumulate):
            _loss(m, 10 * step + micro, grad_scale or 1.0).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        if grad_scale is not None:
            opt.step(grad_scale=grad_scale)
        else:
            opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _equal(a, b, rtol=0.0):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if rtol:
            torch.testing.assert_close(p, q, rtol=rtol, atol=1e-7, msg=name)
        else:
            assert torch.equal(p, q), f"{name} differs by {float((p - q).abs().max()):.3g}"


CASES = {
    "AdamW": dict(lr=schedules.warmup(schedules.cosine(1e-2, STEPS), 2), weight_decay=0.1),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "Adagrad": dict(lr=0.05),
    "LAMB": dict(lr=1e-2, weight_decay=0.01),
}


@pytest.mark.parametrize("name", CASES)
def test_equals_the_optimizer_without_offload(name):
    """Several buckets (400 elements each: some hold one param, the 576-element weight is
    one alone), a param without gradient, each bucket's copies issued in backward."""
    m, ref = _model(), _model()
    opt = _offload(m, name, **CASES[name])
    assert len(opt._buckets[0]) > 2
    twin = getattr(fot, name)(ref.parameters(), **CASES[name])
    _loss(m, 0).backward()
    # every bucket with a gradient had its copy issued during backward (the hooks)
    assert len(opt._order) == len(opt._buckets[0]) - 1  # (the unused param's bucket: none)
    opt.zero_grad()
    _run(m, opt)
    _run(ref, twin)
    _equal(m, ref)
    p = next(m.parameters())
    assert opt.state[p].keys() == twin.state[next(ref.parameters())].keys()
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]


def test_memory_report():
    """AdamW over bfloat16 params with bfloat16 state: 4 B/param on the device (params and
    gradients), the host's params, gradients, master and two states."""
    m = _model(torch.bfloat16)
    report = _offload(m, lr=1e-2, state_dtype="bfloat16").memory_report()
    assert report["device"] == {"params": 2.0, "grads": 2.0, "total": 4.0}
    host = report["host"]
    assert host["master_param"] == pytest.approx(4.0, rel=0.1)  # (the flat buffers' padding)
    assert host["exp_avg"] == pytest.approx(2.0, rel=0.1)
    assert host["total"] == pytest.approx(2 + 2 + 4 + 2 + 2, rel=0.1)


@pytest.mark.parametrize("master_weights,state_dtype", [
    ("fp32", "float32"), ("remainder", "bfloat16"), ("none", "int8"), ("fp32", "int8")])
def test_bf16_params_every_format(master_weights, state_dtype):
    """bfloat16 model params: the host kernel rounds them from the master (or
    stochastically) and the device gets the bfloat16 values. One bucket, so the stochastic
    modes draw the same bits as the optimizer without offload. (Each master mode and each
    state format once: the host optimizer's formats are tested on their own elsewhere, the
    offload path is the same for all.)"""
    m, ref = _model(torch.bfloat16), _model(torch.bfloat16)
    kwargs = dict(lr=1e-2, state_dtype=state_dtype, master_weights=master_weights)
    opt = _offload(m, bucket_elements=1 << 20, **kwargs)
    _run(m, opt)
    _run(ref, fot.AdamW(ref.parameters(), **kwargs))
    _equal(m, ref)
    assert next(m.parameters()).dtype == torch.bfloat16


def test_max_grad_norm_equals_clip_grad_norm():
    m, ref = _model(), _model()
    opt = _offload(m, lr=1e-2, max_grad_norm=0.05)
    _run(m, opt)
    _run(ref, fot.AdamW(ref.parameters(), lr=1e-2), clip=0.05)
    _equal(m, ref, rtol=1e-6)


def test_gradients_changed_after_backward_are_copied_again():
    """clip_grad_norm_ after backward (in place: torch's version counter moves) and gradient
    accumulation over two backwards (the first backward's copies are stale)."""
    m, ref = _model(), _model()
    _run(m, _offload(m, lr=1e-2), clip=0.05, accumulate=2)
    _run(ref, fot.AdamW(ref.parameters(), lr=1e-2), clip=0.05, accumulate=2)
    _equal(m, ref)


def test_grad_scale_and_skip_if_nonfinite():
    m, ref = _model(), _model()
    opt = _offload(m, lr=1e-2, skip_if_nonfinite=True)
    _run(m, opt, grad_scale=1024.0)
    _run(ref, fot.AdamW(ref.parameters(), lr=1e-2))
    _equal(m, ref, rtol=1e-6)
    before = [p.detach().clone() for p in m.parameters()]
    _loss(m, 99).backward()
    m[0].weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.last_step_skipped
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
    assert float(opt.state[m[0].weight]["step"]) == STEPS  # (no count moved)
    opt.zero_grad()
    _loss(m, 100).backward()
    opt.step()
    assert not opt.last_step_skipped and float(opt.state[m[0].weight]["step"]) == STEPS + 1


def test_torch_scheduler_and_state_dicts_interchange():
    """A torch LR scheduler on CPUOffload's groups; its state dict loads into the optimizer
    without offload and the other way round, and both go on equally."""
    m, ref = _model(), _model()
    opt = _offload(m, lr=1e-2, weight_decay=0.1)
    twin = fot.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    _run(m, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5))
    _run(ref, twin, scheduler=torch.optim.lr_scheduler.StepLR(twin, 2, gamma=0.5))
    _equal(m, ref)
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3
    saved = opt.state_dict()
    theirs = twin.state_dict()
    assert saved["state"].keys() == theirs["state"].keys()
    for k, st in theirs["state"].items():
        for key, value in st.items():
            assert torch.equal(saved["state"][k][key], value), key
    # crossed: each loads the other's dict into a fresh copy of the model
    m2, ref2 = _model(), _model()
    m2.load_state_dict(m.state_dict())
    ref2.load_state_dict(ref.state_dict())
    opt2 = _offload(m2, lr=1.0, weight_decay=0.1)
    twin2 = fot.AdamW(ref2.parameters(), lr=1.0, weight_decay=0.1)
    opt2.load_state_dict(theirs)
    twin2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3
    _run(m2, opt2, 3)
    _run(ref2, twin2, 3)
    _equal(m2, ref2)


def test_a_missing_wait_is_caught():
    """The fake streams are strict: without the current stream's wait for the params'
    copies, the device params are not updated (so the tests above would fail)."""
    m = _model()
    opt = _offload(m, lr=1e-2)
    opt._transfers.current_waits = lambda event: None
    before = [p.detach().clone() for p in m.parameters()]
    _loss(m, 0).backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))


def test_errors_and_release():
    m = _model()
    with pytest.raises(ValueError, match="CUDA params"):
        fot.CPUOffload(m.parameters(), "AdamW")
    with pytest.raises(ValueError, match="unknown optimizer"):
        _offload(m, "Adamw")
    with pytest.raises(ValueError, match="modes"):
        _offload(m, "AdamWScheduleFree")
    with pytest.raises(TypeError, match="unexpected keyword"):
        _offload(m, lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match="bucket_elements"):
        _offload(m, bucket_elements=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _offload(m, max_grad_norm=-1.0)
    opt = _offload(m, lr=1e-2)
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None  # (the gradient hooks hold no reference to it)
    _loss(m, 0).backward()  # (and do nothing once it is gone)


@pytest.mark.parametrize("in_backward", [False, True])
def test_params_changed_on_the_device_are_taken(in_backward):
    """model.load_state_dict after the optimizer was built (an in-place copy: torch's version
    counter moves): the next step starts from the new values, as without offload; also
    where it is taken in backward (a review found the host's stale copies stepped and
    written over the loaded params there)."""
    m, ref = _model(), _model()
    opt = _offload(m, lr=1e-2, step_in_backward=in_backward)
    twin = fot.AdamW(ref.parameters(), lr=1e-2)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    m.load_state_dict(other.state_dict())
    ref.load_state_dict(other.state_dict())
    _run(m, opt, 2)
    _run(ref, twin, 2)
    _equal(m, ref)


def test_named_params_and_a_remainder_load():
    """Named params (torch 2.13): the state dict keeps the names. A bfloat16 run with
    remainders loads a state dict and writes the params from its master, as without
    offload."""
    m, ref = _model(torch.bfloat16), _model(torch.bfloat16)
    kwargs = dict(lr=1e-2, master_weights="remainder")
    opt = fot.CPUOffload(m.named_parameters(), "AdamW", bucket_elements=400,
                         _transfers=FakeTransfers(), **kwargs)
    twin = fot.AdamW(ref.named_parameters(), **kwargs)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    saved = twin.state_dict()
    assert opt.state_dict()["param_groups"][0]["param_names"] == \
        saved["param_groups"][0]["param_names"]
    _run(m, opt, 2)  # (both move on, then load the dict taken at step 2)
    _run(ref, twin, 2)
    twin.load_state_dict(saved)
    opt.load_state_dict(saved)
    _equal(m, ref)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    _equal(m, ref)


class EagerTransfers(FakeTransfers):
    """Copies run when issued: the gradients' copies from backward are done before anything
    after backward (GradScaler's unscale_, clipping) touches the device gradients, as on a
    GPU where they usually finish first."""

    def copy(self, stream, dst, src) -> None:
        dst.copy_(src)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler(unscale_first):
    """torch.amp.GradScaler: CPUOffload takes its scale and inf flag (it changes the device
    gradients in place without a version bump, so the copies made in backward would be
    stale); with unscale_ called first (to clip), every gradient is copied again. A step
    with an inf is skipped, as GradScaler skips it."""
    m, ref = _model(), _model()
    opt = fot.CPUOffload(m.parameters(), "SGD", lr=0.05, momentum=0.9, bucket_elements=400,
                         _transfers=EagerTransfers())
    twin = fot.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    for step in range(STEPS):
        for model, o, scaler in ((m, opt, scalers[0]), (ref, twin, scalers[1])):
            scaler.scale(_loss(model, step)).backward()
            if step == 3:
                model[0].weight.grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # (no clipping)
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        assert opt.last_step_skipped == (step == 3)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    _equal(m, ref, rtol=1e-6)


def test_refusals_after_review():
    """A param listed twice (torch steps it once per listing), a param replaced by one of
    another dtype (model.to()), copying or pickling: clear errors, not silent results."""
    m = _model()
    with pytest.raises(ValueError, match="each param once"):
        fot.CPUOffload([m[0].weight, m[0].weight], "AdamW", _transfers=FakeTransfers())
    with pytest.raises(ValueError, match="more than one parameter group"):  # (torch's)
        fot.CPUOffload([{"params": [m[0].weight]}, {"params": [m[0].weight]}], "AdamW",
                       _transfers=FakeTransfers())
    opt = _offload(m, lr=1e-2)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)
    m[0].weight.data = torch.zeros(24, 12, dtype=torch.float64)
    _loss(m.double(), 0).backward()
    with pytest.raises(RuntimeError, match="another dtype"):
        opt.step()


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_replaced_storage_is_followed(in_backward):
    """p.data = ... (same dtype, device and shape; new values) after some steps: the next
    step starts from the new values with the state it has, as torch.optim's would (also
    a step taken in backward)."""
    m, ref = _model(), _model()
    opt = _offload(m, lr=1e-2, step_in_backward=in_backward)
    twin = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    for model in (m, ref):
        model[2].weight.data = torch.full((24, 24), 0.01)
        model[0].bias.data = model[0].bias.data.clone()  # (moved, values unchanged)
    _run(m, opt, 3)
    _run(ref, twin, 3)
    _equal(m, ref, rtol=1e-6)


def test_a_failed_step_or_load_leaves_it_consistent():
    """A bad hyperparameter in one group raises before any bucket steps; a state dict that
    fails to load part way leaves every bucket as it was."""
    m, ref = _model(), _model()
    groups = lambda model: [{"params": list(model[0].parameters())},  # noqa: E731
                            {"params": list(model[2].parameters()) + list(model[4].parameters()),
                             "lr": 5e-3}]
    opt = fot.CPUOffload(groups(m), "AdamW", lr=1e-2, bucket_elements=400,
                         _transfers=FakeTransfers())
    twin = fot.AdamW(groups(ref), lr=1e-2)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    before = [p.detach().clone() for p in m.parameters()]
    opt.param_groups[1]["lr"] = -1.0
    _loss(m, 50).backward()
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
    opt.param_groups[1]["lr"] = 5e-3
    opt.zero_grad()
    bad = twin.state_dict()
    bad["state"][3] = bad["state"][2]  # (a state of the wrong shape for the last buckets)
    saved = opt.state_dict()
    with pytest.raises(RuntimeError, match="shape"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for k, st in saved["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][k][key], value), (k, key)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    _equal(m, ref)


def test_step_in_backward():
    """step_in_backward=True: each bucket's CPU step starts in backward as soon as its
    gradients are copied (before step() is called); step() waits for them. The numbers equal
    the optimizer without offload; what needs the gradients first is refused."""
    m, ref = _model(), _model()
    kwargs = dict(lr=schedules.warmup(schedules.cosine(1e-2, STEPS), 2), weight_decay=0.1)
    opt = _offload(m, step_in_backward=True, **kwargs)
    twin = fot.AdamW(ref.parameters(), **kwargs)
    _loss(m, 0).backward()
    assert len(opt._inflight) == len(opt._buckets[0]) - 1  # (all but the unused param's)
    for _, future in opt._inflight:
        future.result()
    hosts = [b.host for b, _ in opt._inflight]
    assert all(float(next(iter(h.state.values()))["step"]) == 1 for h in hosts)
    opt.step()
    opt.zero_grad()
    for step in range(1, STEPS):
        _loss(m, 10 * step).backward()  # (_run's batches)
        opt.step()
        opt.zero_grad()
    _run(ref, twin, STEPS)
    _equal(m, ref)
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]
    _loss(m, 99).backward()
    # the device gradients were dropped once copied (they never all exist at once); the
    # bucket with the unused param never completes in backward: it steps at step()
    assert m[2].weight.grad is None and m[4].weight.grad is None
    assert m[0].weight.grad is not None
    with pytest.raises(RuntimeError, match="loss scale"):
        opt.step(grad_scale=2.0)
    opt.zero_grad()
    _loss(m, 100).backward()
    with pytest.raises(RuntimeError, match="second backward"):
        _loss(m, 101).backward()  # (raised before any gradient is copied over)
    with pytest.raises(RuntimeError, match="second backward ran"):
        opt.step()
    opt.zero_grad()
    _loss(m, 102).backward()  # (and then it goes on)
    opt.step()
    with pytest.raises(ValueError, match="global norm"):
        _offload(_model(), step_in_backward=True, max_grad_norm=1.0)


def test_step_in_backward_refuses_what_would_see_half_a_step():
    """Step in backward (found by a review): between a backward and its step() some buckets
    have stepped and others not, so state_dict(), load_state_dict() and refresh_master()
    raise (refresh_master raced the running steps, undoing them; state_dict mixed step
    counts); clip_grad_norm_ on the gradients of a bucket that did not complete in backward
    (the unused param's: it steps at step()) makes step() raise, as for the others (it was
    clipped alone, by a norm over its own gradients)."""
    m = _model()
    opt = _offload(m, step_in_backward=True, lr=1e-2)
    _loss(m, 0).backward()
    for call in (opt.state_dict, opt.refresh_master,
                 lambda: opt.load_state_dict(opt.state_dict())):
        with pytest.raises(RuntimeError, match="call step\\(\\) after backward before"):
            call()
    opt.step()
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())  # (between steps: fine)
    _loss(m, 1).backward()
    assert m[0].weight.grad is not None  # (its bucket waits for step())
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    with pytest.raises(RuntimeError, match="changed after it"):
        opt.step()


def test_a_storage_replaced_at_its_old_address_is_followed():
    """A param's storage replaced by another at the same address (the old one freed first:
    model.to(torch.bfloat16).to(torch.float32) on a caching allocator) with other values:
    followed, as one at a new address is (the address alone missed it: the host's stale copy
    was stepped and written back; found by a review)."""
    import numpy as np

    m, ref = _model(), _model()
    opt = _offload(m, "SGD", lr=0.1, momentum=0.9)
    twin = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    memory = np.empty(m[2].weight.numel(), np.float32)
    for model in (m, ref):  # (a storage over numpy memory: the next one lies at its address)
        memory[:] = model[2].weight.detach().numpy().ravel()
        model[2].weight.data = torch.from_numpy(memory.copy() if model is ref else memory)\
            .view(24, 24)
    _run(m, opt, 2)
    _run(ref, twin, 2)
    for model in (m, ref):
        values = (model[2].weight.detach() * 0.5).numpy().ravel()
        if model is m:  # (new values at the old address, then a new storage over them)
            memory[:] = values
            model[2].weight.data = torch.from_numpy(memory).view(24, 24)
        else:
            model[2].weight.data = torch.from_numpy(values.copy()).view(24, 24)
    assert m[2].weight.data_ptr() == memory.ctypes.data
    _run(m, opt, 2)
    _run(ref, twin, 2)
    _equal(m, ref, rtol=1e-6)


def test_step_in_backward_refuses_a_gradient_hook_registered_after_it():
    """step_in_backward=True frees each bucket's gradients once they are copied: a
    post-accumulate-grad hook registered after the optimizer would run on a freed gradient,
    so backward raises; one registered before sees the gradient before it is copied."""
    m = _model()
    opt = _offload(m, step_in_backward=True, lr=1e-2)
    handle = m[0].weight.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(0.5))
    with pytest.raises(RuntimeError, match="registered on a parameter after"):
        _loss(m, 0).backward()
    handle.remove()
    before, ref = _model(), _model()
    seen = []
    before[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.sum()))
    opt = _offload(before, step_in_backward=True, lr=1e-2)
    twin = fot.AdamW(ref.parameters(), lr=1e-2)
    _loss(before, 0).backward()
    opt.step()
    _loss(ref, 0).backward()
    twin.step()
    assert len(seen) == 1
    _equal(before, ref)


@pytest.mark.parametrize("in_backward", [False, True])
def test_requires_grad_changed_between_steps(in_backward):
    """A layer frozen for some steps and unfrozen (its bucket gets no gradient, then all of
    them), and a param frozen when the optimizer was built and unfrozen later (no hook
    then): equal to the optimizer without offload, with a schedule. A bucket counts the
    gradients that complete it at each backward (it counted them at the last step, so the
    unfrozen layer's bucket stepped on its first gradient alone, and step in backward then
    raised); the late param gets its hook at the step after, and its bucket then steps in
    backward again."""
    m, ref = _model(), _model()
    for mm in (m, ref):
        mm[4].bias.requires_grad_(False)
    lr = schedules.warmup(schedules.cosine(1e-2, 10), 3)
    opt = _offload(m, step_in_backward=in_backward, lr=lr)
    twin = fot.AdamW(ref.parameters(), lr=lr)
    for step in range(8):
        for mm in (m, ref):
            for p in mm[0].parameters():
                p.requires_grad_(not 2 <= step < 5)
            mm[4].bias.requires_grad_(step >= 3)
        for mm, o in ((m, opt), (ref, twin)):
            _loss(mm, step).backward()
            if in_backward and o is opt and step >= 6:
                # (every bucket but the unused param's completed in backward)
                assert len(opt._inflight) == len(opt._buckets[0]) - 1
            o.step()
            o.zero_grad()
    _equal(m, ref)


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_group_whose_count_stays_moves_its_schedule_on(in_backward):
    """A group of two params stepping in turn (one unused on odd steps, the other frozen on
    steps 1 and 2): a step that does not raise the group's count still moves its lr on, as
    the optimizer without offload does; only a step with no gradient at all did (the lr fell
    a step behind: 4e-3 off after 6 steps, a review's finding)."""
    lr = schedules.warmup(schedules.cosine(1e-2, 6), 2)

    def groups(mm):
        ps = list(mm.parameters())  # (the module's own param first: unused, 0.weight, ...)
        return [{"params": ps[:2]}, {"params": ps[2:]}]

    m, ref = _model(), _model()
    opt = fot.CPUOffload(groups(m), "AdamW", lr=lr, bucket_elements=400,
                         step_in_backward=in_backward, _transfers=FakeTransfers())
    twin = fot.AdamW(groups(ref), lr=lr)
    for step in range(6):
        for mm, o in ((m, opt), (ref, twin)):
            for p in mm[0].parameters():
                p.requires_grad_(not 1 <= step < 3)
            loss = _loss(mm, 10 * step)
            if step % 2 == 0:
                loss = loss + mm.unused.square().sum() * 1e-2
            loss.backward()
            o.step()
            o.zero_grad()
    _equal(m, ref)
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]


@pytest.mark.parametrize("in_backward", [False, True])
def test_tied_weights(in_backward):
    """A weight used twice (GPT-2's embedding and head): its hook fires once a backward,
    after both uses' gradients are summed, and its bucket steps once."""
    def model():
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16),
                                torch.nn.Tanh())
        return m

    def loss(m, step):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 50, (4, 7), generator=g)
        return (m(idx) @ m[0].weight.t()).logsumexp(-1).mean()

    m, ref = model(), model()
    opt = fot.CPUOffload(m.parameters(), "AdamW", lr=1e-2, bucket_elements=300,
                         step_in_backward=in_backward, _transfers=FakeTransfers())
    twin = fot.AdamW(ref.parameters(), lr=1e-2)
    for step in range(4):
        for mm, o in ((m, opt), (ref, twin)):
            loss(mm, step).backward()
            o.step()
            o.zero_grad()
    _equal(m, ref)


def test_a_param_changed_on_the_device_leaves_the_others_masters():
    """bfloat16 params: one changed in place on the device gets its master from the new
    values; the others keep their float32 masters (not reset to their bfloat16 rounding)."""
    m = _model(torch.bfloat16)
    opt = _offload(m, lr=1e-2, bucket_elements=1 << 20)
    _run(m, opt, 2)
    (b,) = opt._buckets[0]
    masters = [opt.state[p]["master_param"].clone() for p in m.parameters() if p in opt.state]
    with torch.no_grad():
        m[0].bias.mul_(0.5)
    changed = b.changed_on_device()
    assert [b.params[i] for i in changed] == [m[0].bias]
    b.take_device_params(changed)
    for p, before in zip([p for p in m.parameters() if p in opt.state], masters, strict=True):
        now = opt.state[p]["master_param"]
        if p is m[0].bias:
            assert torch.equal(now, p.detach().float())
        else:
            assert torch.equal(now, before)
    assert not b.changed_on_device()


def _steps(m, opt, first, stop):
    for step in range(first, stop):
        _loss(m, 10 * step).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype,master_weights", [
    (torch.float32, "fp32"), (torch.bfloat16, "fp32"), (torch.bfloat16, "remainder"),
    (torch.bfloat16, "none")])
@pytest.mark.parametrize("model_first", [True, False])
def test_a_resume_into_a_new_model_and_optimizer(dtype, master_weights, model_first):
    """The usual resume: a new model (another init) and a new CPUOffload, the model's and the
    optimizer's state dicts loaded in either order, then more steps: the same params as the
    run that went on, bit for bit. (Found by a review: the model's loaded params were
    overwritten by the host's stale copies, or the host stepped from them, or a float32
    master was reset from the params.)"""
    kwargs = dict(lr=1e-2, weight_decay=0.1, master_weights=master_weights)
    straight = _model(dtype)
    _steps(straight, _offload(straight, bucket_elements=1 << 20, **kwargs), 0, 6)
    m = _model(dtype)
    opt = _offload(m, bucket_elements=1 << 20, **kwargs)
    _steps(m, opt, 0, 3)
    saved = copy.deepcopy((m.state_dict(), opt.state_dict()))
    fresh = _model(dtype)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(-0.5)
    opt2 = _offload(fresh, bucket_elements=1 << 20, **kwargs)
    if model_first:
        fresh.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
    else:
        opt2.load_state_dict(saved[1])
        fresh.load_state_dict(saved[0])
    for (name, p), value in zip(fresh.named_parameters(), saved[0].values(), strict=True):
        assert torch.equal(p, value), name  # (the load left the model's params alone)
    _steps(fresh, opt2, 3, 6)
    _equal(fresh, straight)


@pytest.mark.parametrize("option", [dict(skip_if_nonfinite=True), dict(max_grad_norm=1e9)])
def test_a_loss_scaled_float16_norm_does_not_overflow(option):
    """float16 params and a loss scale of 2**18 (GradScaler's scale grows so far): every
    gradient is finite but the scaled gradients' norm is over float16's 65504. The norm is
    taken in float32: the steps are not skipped nor clipped (a review found every step
    skipped, or the gradients zeroed by a coefficient of max / inf)."""
    m, ref = _model(torch.float16), _model(torch.float16)
    opt = _offload(m, lr=1e-3, **option)
    twin = fot.AdamW(ref.parameters(), lr=1e-3)
    scale = 2.0 ** 18
    for step in range(3):
        _loss(m, step, scale).backward()
        _loss(ref, step, scale).backward()
        assert float(torch.cat([p.grad.float().flatten() for p in m.parameters()
                                if p.grad is not None]).norm()) > 65504
        opt.step(grad_scale=scale)
        for p in ref.parameters():
            if p.grad is not None:
                p.grad.div_(scale)
        twin.step()
        assert not opt.last_step_skipped
        opt.zero_grad()
        twin.zero_grad()
    _equal(m, ref)
