"""fastopt.torch: real torch.optim.Optimizer subclasses with torch's numbers and state dicts."""

import copy

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

import fastopt.torch as fot
from fastopt import schedules as S


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 4))


def data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(steps)]


def train(model, opt, batches, sched=None, set_to_none=True):
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=set_to_none)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_allclose(pa.detach().numpy(), pb.detach().numpy(), rtol=rtol,
                                   atol=atol, err_msg=na)


CASES = [
    ("Adam", dict(lr=3e-3, weight_decay=0.01, amsgrad=True)),
    ("Adam", dict(lr=3e-3, maximize=False, betas=(0.8, 0.99))),
    ("AdamW", dict(lr=3e-3, weight_decay=0.1)),
    ("AdamW", dict(lr=3e-3, amsgrad=True, maximize=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1,
                     weight_decay=0.01)),
    ("Adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.01)),
]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name,kw", CASES)
def test_matches_torch_with_scheduler(name, kw, set_to_none):
    kw = dict(kw)
    ref, ours = make_model(), make_model()
    steps = 220
    topt = getattr(torch.optim, name)(ref.parameters(), **kw)
    tsched = L.SequentialLR(topt, [L.LinearLR(topt, 0.1, 1.0, 20),
                                   L.CosineAnnealingLR(topt, steps - 20)], [20])
    lr = kw.pop("lr")
    sched = S.warmup(S.cosine(lr, steps - 20), 20, start_lr=lr * 0.1)
    opt = getattr(fot, name)(ours.parameters(), lr=sched, **kw)
    batches = data(steps)
    train(ref, topt, batches, tsched)
    train(ours, opt, batches, set_to_none=set_to_none)
    assert_models_close(ours, ref)
    assert isinstance(opt, torch.optim.Optimizer)


def test_param_groups_own_hyperparameters_and_torch_schedulers_drive_lr():
    ref, ours = make_model(), make_model()

    def groups(model):
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0,
                                                         "lr": 1e-2}]

    topt = torch.optim.AdamW(groups(ref), lr=3e-3)
    opt = fot.AdamW(groups(ours), lr=3e-3)
    # a torch scheduler driving group['lr'] of a fastopt optimizer works too
    tsched, osched = L.StepLR(topt, 30, 0.5), L.StepLR(opt, 30, 0.5)
    batches = data(100)
    train(ref, topt, batches, tsched)
    train(ours, opt, batches, osched)
    assert_models_close(ours, ref)


def test_grads_land_in_the_flat_buffer():
    model = make_model()
    opt = fot.Adam(model.parameters())
    bucket = opt._buckets[0][0]
    x, y = data(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # takes the first grads in: from now on p.grad is a view of the flat buffer
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        assert p.data_ptr() >= bucket.flat.data_ptr()
        assert p.grad.untyped_storage().data_ptr() == bucket.grad.untyped_storage().data_ptr()
    assert bucket.grad.abs().sum() > 0


def test_state_dict_interop_both_ways():
    steps, k = 120, 50
    batches = data(steps, seed=5)
    kw = dict(lr=2e-3, weight_decay=0.05, amsgrad=True)
    # reference: torch all the way
    ref = make_model()
    topt = torch.optim.AdamW(ref.parameters(), **kw)
    train(ref, topt, batches)
    # torch for k steps, then fastopt from torch's state dict
    a = make_model()
    a_opt = torch.optim.AdamW(a.parameters(), **kw)
    train(a, a_opt, batches[:k])
    b = copy.deepcopy(a)
    b_opt = fot.AdamW(b.parameters(), **kw)
    b_opt.load_state_dict(a_opt.state_dict())
    train(b, b_opt, batches[k:])
    assert_models_close(b, ref)
    # fastopt for k steps, then torch from fastopt's state dict
    c = make_model()
    c_opt = fot.AdamW(c.parameters(), **kw)
    train(c, c_opt, batches[:k])
    sd = c_opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert float(sd["state"][0]["step"]) == k
    d = copy.deepcopy(c)
    d_opt = torch.optim.AdamW(d.parameters(), **kw)
    d_opt.load_state_dict(sd)
    train(d, d_opt, batches[k:])
    train(c, c_opt, batches[k:])  # the fastopt run continues untouched by torch's steps
    assert_models_close(d, ref)
    assert_models_close(c, ref)


@pytest.mark.parametrize("multi_tensor", [False, True])
def test_a_gradient_stays_the_users_tensor_after_the_step(multi_tensor):
    """After step() p.grad is still the tensor autograd made (or the user assigned), as in
    torch: gradients kept for logging keep their values (they all became the last step's
    when p.grad was replaced by fastopt's reused view), and a buffer refilled in place is
    read again at the next step."""
    kept = {}
    for name, make in (("torch", torch.optim.SGD),
                       ("ours", lambda ps, **kw: fot.SGD(ps, multi_tensor=multi_tensor, **kw))):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = make([p], lr=1.0)
        kept[name] = []
        for k in range(3):
            opt.zero_grad()
            (p.sum() * (k + 1)).backward()
            opt.step()
            kept[name].append(p.grad)
        buf = torch.ones(3)
        p.grad = buf
        opt.step()
        buf.fill_(10.0)
        opt.step()
        kept[name].append(p.detach().clone())
    for a, b in zip(kept["ours"], kept["torch"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("drop", ["none", "del"])
def test_a_dropped_schedule_leaves_group_lr_in_charge(drop):
    """group['schedule'] set to None or deleted mid-run: the steps take group['lr'] as it
    stands (it failed after the kernel ran, so a retry stepped twice)."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = fot.SGD([p], lr=S.cosine(0.1, 20))
    for _ in range(3):
        p.grad = torch.ones(8)
        opt.step()
    group = opt.param_groups[0]
    if drop == "none":
        group["schedule"] = None
    else:
        del group["schedule"]
    lr = group["lr"]
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(8)
        opt.step()
        torch.testing.assert_close(before - p.detach(), torch.full((8,), lr), rtol=1e-6,
                                   atol=0)
    assert group["lr"] == lr


def test_state_dict_round_trip_keeps_schedule_position():
    sched = S.warmup(S.cosine(1e-2, 80), 10)
    batches = data(80, seed=3)
    full = make_model()
    full_opt = fot.Adagrad(full.parameters(), lr=sched)
    train(full, full_opt, batches)
    part = make_model()
    part_opt = fot.Adagrad(part.parameters(), lr=sched)
    train(part, part_opt, batches[:33])
    resumed = copy.deepcopy(part)
    resumed_opt = fot.Adagrad(resumed.parameters(), lr=sched)
    resumed_opt.load_state_dict(part_opt.state_dict())
    train(resumed, resumed_opt, batches[33:])
    assert_models_close(resumed, full, rtol=0, atol=0)


def test_params_without_grad_are_skipped_like_torch():
    ref, ours = make_model(), make_model()
    topt, opt = torch.optim.Adam(ref.parameters(), lr=1e-2), fot.Adam(ours.parameters(), lr=1e-2)
    batches = data(30)
    for i, (x, y) in enumerate(batches):
        for model, o in ((ref, topt), (ours, opt)):
            o.zero_grad()
            # every third step the first layer takes no part: its grads stay None
            out = model(x) if i % 3 else model[2:](torch.ones(16, 32))
            torch.nn.functional.cross_entropy(out, y).backward()
            o.step()
    assert_models_close(ours, ref)


def test_grad_scaler_skips_nonfinite_steps():
    ref, ours = make_model(), make_model()
    topt, opt = torch.optim.Adam(ref.parameters(), lr=1e-2), fot.Adam(ours.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    for i, (x, y) in enumerate(data(20)):
        for model, o, scaler in ((ref, topt, scalers[0]), (ours, opt, scalers[1])):
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if i == 7:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    assert_models_close(ours, ref)
    assert scalers[1].get_scale() < 256.0  # the inf step was seen and skipped


def test_closure_and_add_param_group():
    model = make_model()
    opt = fot.AdamW(list(model.parameters())[:2], lr=1e-3)
    opt.add_param_group({"params": list(model.parameters())[2:], "lr": S.cosine(1e-2, 10)})
    x, y = data(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    assert opt.step(lambda: None) is None
    assert opt.param_groups[1]["lr"] == pytest.approx(S.cosine(1e-2, 10).at(2))


@pytest.mark.parametrize("multi", [False, True])
def test_sgd_checks_nesterov_at_construction_only_as_torch(multi):
    """torch.optim.SGD refuses nesterov with dampening only among its constructor's
    arguments: a param group's own values, or values changed between steps, step with
    torch's numbers (fastopt raised at the step, found by a review)."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        fot.SGD(make_model().parameters(), lr=0.1, momentum=0.9, nesterov=True, dampening=0.1)
    ours, theirs = make_model(), make_model()
    opts = []
    for model, cls in ((ours, fot.SGD), (theirs, torch.optim.SGD)):
        first, *rest = model.parameters()
        kw = dict(multi_tensor=multi) if cls is fot.SGD else {}
        opts.append(cls([{"params": [first], "nesterov": True, "dampening": 0.5},
                         {"params": rest}], lr=0.1, momentum=0.9, **kw))
    for step in range(6):
        if step == 2:
            for opt in opts:
                opt.param_groups[1]["nesterov"] = True
                opt.param_groups[1]["dampening"] = 0.25
        for model, opt in zip((ours, theirs), opts, strict=True):
            opt.zero_grad()
            model(torch.full((2, 12), 0.1 * (step + 1))).square().sum().backward()
            opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_errors():
    with pytest.raises(TypeError, match="complex"):
        fot.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="differentiable"):
        fot.Adam(make_model().parameters(), differentiable=True)
    with pytest.raises(ValueError, match="differentiable"):  # (a group's own, as torch takes)
        fot.Adam([{"params": list(make_model().parameters()), "differentiable": True}])
    opt = fot.Adam(make_model().parameters())
    with pytest.raises(ValueError, match="differentiable"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))],
                             "differentiable": True})
    with pytest.raises(RuntimeError, match="cannot be `True` together"):  # (torch's check)
        fot.Adam(make_model().parameters(), foreach=True, fused=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fot.AdamW(make_model().parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="one device"):
        fot.Adam([torch.nn.Parameter(torch.zeros(3)),
                  torch.nn.Parameter(torch.zeros(3, device="meta"))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fot.Adam(emb.parameters())
    opt.zero_grad()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_replaced_param_data_is_refused():
    """model.to()/half() after building the optimizer replaces p.data: stepping would update a
    buffer the model no longer uses, so the step refuses with a clear error."""
    model = make_model()
    opt = fot.AdamW(model.parameters())
    x, y = data(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model.double()
    torch.nn.functional.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(RuntimeError, match="build the optimizer after"):
        opt.step()


def test_optimizer_hooks_run():
    model = make_model()
    opt = fot.Adadelta(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict") or sd)
    x, y = data(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.state_dict()
    assert calls == ["pre", "post", "state_dict"]


def test_step_hooks_and_the_profiler_event_as_torch():
    """fastopt.torch wraps its step itself (torch's wrapper enters a profiler range at every
    step, ~10 µs): the same hooks in the same order, a pre-hook's new arguments used, its
    bad return refused as torch does, and the profiler's "Optimizer.step#<class>.step" range
    while a profiler records."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    x, y = data(1)[0]
    seen = {}
    for cls in (torch.optim.Adam, fot.Adam):
        model = make_model()
        opt = cls(model.parameters())
        calls = []

        def closure(model=model, calls=calls):
            calls.append("closure")
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
            return loss

        def logger(what, calls=calls):
            return lambda o, a, k: calls.append(what)

        handles = [register_optimizer_step_pre_hook(logger("global-pre")),
                   register_optimizer_step_post_hook(logger("global-post")),
                   opt.register_step_pre_hook(logger("pre")),
                   opt.register_step_post_hook(logger("post")),
                   opt.register_step_pre_hook(lambda o, a, k, f=closure: ((o, f), {}))]
        try:
            loss = opt.step()  # (the last pre-hook passes the closure)
            assert loss is not None
            with torch.profiler.profile() as prof:
                opt.step(closure)
            names = {e.name for e in prof.events()}
            assert f"Optimizer.step#{cls.__name__}.step" in names
            bad = opt.register_step_pre_hook(lambda o, a, k: 1)
            with pytest.raises(RuntimeError, match="must return None or a tuple"):
                opt.step(closure)
            bad.remove()
        finally:
            for h in handles:
                h.remove()
        seen[cls] = calls
    assert seen[fot.Adam] == seen[torch.optim.Adam]
    assert seen[fot.Adam][:6] == ["global-pre", "pre", "closure", "post", "global-post",
                                  "global-pre"]


def test_zero_grad_set_to_none_like_torch():
    x, y = data(1)[0]
    for cls in (torch.optim.Adam, fot.Adam):
        model = make_model()
        opt = cls(model.parameters())
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        opt.zero_grad(set_to_none=False)  # a grad that is None stays None, as in torch
        assert all(p.grad is None for p in model.parameters())


def test_a_state_dict_with_a_schedule_loads_with_torchs_default_weights_only():
    """torch.load's default (weights_only=True) unpickles tensors and plain values only: the
    group's schedule is saved as its table (a tensor) and description, and resumes
    exactly; a malformed one raises ValueError."""
    import io

    schedule = S.warmup(S.cosine(1e-2, 20), 3)
    batches = [torch.randn(2, 4, generator=torch.Generator().manual_seed(k)) for k in range(8)]

    def run(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 3)

    straight = model()
    run(straight, fot.AdamW(straight.parameters(), lr=schedule), batches)
    first = model()
    opt = fot.AdamW(first.parameters(), lr=schedule)
    run(first, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # (weights_only=True: torch's default)
    second = model()
    second.load_state_dict(saved["model"])
    resumed = fot.AdamW(second.parameters(), lr=1e-3)
    resumed.load_state_dict(saved["optim"])
    assert resumed.param_groups[0]["schedule"] == schedule
    run(second, resumed, batches[3:])
    for p, q in zip(second.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    saved["optim"]["param_groups"][0]["schedule"] = {"table": [1.0]}
    with pytest.raises(ValueError, match="param group 'schedule' must be"):
        resumed.load_state_dict(saved["optim"])


@pytest.mark.parametrize("change", ["replace", "tensor in place"])
def test_a_group_value_changed_between_steps_takes_effect(change):
    """The group's hyperparameters are re-checked only when a value changes: a value replaced
    by another object and a tensor changed in place both reach the next step, as in torch."""
    betas = {"replace": (0.9, 0.999), "tensor in place": (torch.tensor(0.9),
                                                         torch.tensor(0.999))}[change]
    ours, theirs = make_model(), make_model()
    opt = fot.Adam(ours.parameters(), lr=1e-2, betas=copy.deepcopy(betas))
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2, betas=copy.deepcopy(betas))
    batches = data(6)
    train(ours, opt, batches[:3])
    train(theirs, ref, batches[:3])
    for o in (opt, ref):
        group = o.param_groups[0]
        if change == "replace":
            group["betas"] = (0.5, 0.9)
        else:
            group["betas"][0].fill_(0.5)
            group["betas"][1].fill_(0.9)
    train(ours, opt, batches[3:])
    train(theirs, ref, batches[3:])
    assert_models_close(ours, theirs)
    unchanged = make_model()  # (the change matters: without it the params differ)
    other = fot.Adam(unchanged.parameters(), lr=1e-2, betas=copy.deepcopy(betas))
    train(unchanged, other, batches)
    with pytest.raises(AssertionError):
        assert_models_close(ours, unchanged)


@pytest.mark.parametrize("name", ["Adam", "SGD", "NAdam"])
def test_a_parameter_listed_twice_is_updated_once_per_listing_like_torch(name):
    """torch warns and updates such a param once per listing (its step count too), at the
    group's lr; so does fastopt.torch. With an in-kernel schedule it is refused."""
    kw = {"SGD": dict(momentum=0.9)}.get(name, {})
    ref_model, our_model = make_model(), make_model()
    twice = [*ref_model.parameters(), next(ref_model.parameters())]
    ours_twice = [*our_model.parameters(), next(our_model.parameters())]
    twin = getattr(torch.optim, name)
    with pytest.warns(UserWarning, match="duplicate"):
        ref = twin(twice, lr=1e-2, **kw)
    with pytest.warns(UserWarning, match="duplicate"):
        opt = getattr(fot, name)(ours_twice, lr=1e-2, **kw)
    batches = data(5)
    train(ref_model, ref, batches)
    train(our_model, opt, batches)
    assert_models_close(our_model, ref_model)
    first, ref_first = next(our_model.parameters()), next(ref_model.parameters())
    if "step" in ref.state[ref_first]:  # (counted once per listing)
        assert float(opt.state[first]["step"]) == float(ref.state[ref_first]["step"]) == 10
    with pytest.warns(UserWarning, match="duplicate"), \
            pytest.raises(ValueError, match="listed more than once"):
        getattr(fot, name)([*make_model().parameters(), *make_model(1).parameters()][:1] * 2,
                           lr=S.cosine(1e-2, 10))


def test_step_in_backward_refuses_a_parameter_listed_twice():
    model = make_model()
    with pytest.warns(UserWarning, match="duplicate"):
        opt = fot.Adam([*model.parameters(), next(model.parameters())], lr=1e-2)
    with pytest.raises(ValueError, match="listed more than once"):
        fot.step_in_backward(model, opt)


def test_the_host_counts_follow_replays_of_a_captured_step_simulated():
    """The GPU bookkeeping of a captured step, played on the CPU (no GPU here; the card runs
    the real thing in tests/test_gpu_torch.py): the device counter is faked as a CPU tensor
    holding what the kernel would. Replays advance every param of the bucket by their count,
    per-param steps after them start from there, and a failed load does not wind them back."""
    p0, p1 = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = fot.Adam([p0, p1], lr=1e-2)
    for _ in range(2):
        p0.grad, p1.grad = torch.randn(4), torch.randn(4)
        opt.step()
    b = opt._buckets[0][0]
    b.counter, b.captured, b.device_step = torch.tensor([2, 0]), True, 2  # eager steps, capture
    b.counter[0] = 5  # three replays
    p0.grad, p1.grad = torch.randn(4), None  # an eager step, p1 without a gradient
    opt.step()
    assert b.steps.tolist() == [6.0, 5.0] and b.device_step == 5
    assert {k: float(v["step"]) for k, v in opt.state_dict()["state"].items()} == {0: 6, 1: 5}
    b.counter[0] = 7  # two more replays of the whole bucket
    saved = opt.state_dict()
    saved["param_groups"][0]["betas"] = (2.0, 0.5)  # a bad dict: refused, nothing changes
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    assert b.steps.tolist() == [8.0, 7.0] and b.device_step == int(b.counter[0])


def test_a_per_param_scalar_changed_in_place_reaches_the_next_step():
    """NAdam's mu_product is per param, as torch's: an in-place change is honoured (the
    whole-bucket step is taken only while the params' values agree)."""
    ours, theirs = make_model(), make_model()
    opt, ref = fot.NAdam(ours.parameters(), lr=1e-2), torch.optim.NAdam(theirs.parameters(),
                                                                          lr=1e-2)
    batches = data(6)
    train(ours, opt, batches[:3])
    train(theirs, ref, batches[:3])
    for o, model in ((opt, ours), (ref, theirs)):
        o.state[next(model.parameters())]["mu_product"].mul_(0.5)
    train(ours, opt, batches[3:])
    train(theirs, ref, batches[3:])
    assert_models_close(ours, theirs)


def test_schedule_free_refuses_a_parameter_listed_twice():
    """schedulefree counts k once a step per group: once-per-listing updates cannot match."""
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate"), \
            pytest.raises(ValueError, match="counts its steps per param group"):
        fot.AdamWScheduleFree([w, w])


def test_a_subclass_overriding_step_runs_the_hooks_as_torch():
    """The hooks wrap the class's step when an optimizer of it is built, as torch's do: a
    subclass whose step calls super().step() halves the gradient once, not twice."""
    out = {}
    for base in (torch.optim.SGD, fot.SGD):
        class Mine(base):
            def step(self, closure=None):
                return super().step(closure)

        p = torch.nn.Parameter(torch.zeros(3))
        opt = Mine([p], lr=1.0)
        def halve(o, a, k, p=p):
            p.grad.mul_(0.5)

        opt.register_step_pre_hook(halve)
        p.grad = torch.ones(3)
        opt.step()
        out[base] = p.detach().clone()
    torch.testing.assert_close(out[fot.SGD], out[torch.optim.SGD])


def _layout_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3)).to(dtype)
    model = model.to(memory_format=torch.channels_last)
    model.register_parameter("t", torch.nn.Parameter(torch.randn(5, 7).t().to(dtype)))
    # (size-1 dims: torch calls it contiguous, but keeps its strides (8, 1, 8, 8), as now we)
    model.register_parameter("u", torch.nn.Parameter(
        torch.randn(1, 8, 1, 1).to(dtype).to(memory_format=torch.channels_last)))
    return model


def _used_strides(t):
    return tuple(s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1)


def _layout_loss(model, x):
    return model(x).float().pow(2).mean() + model.t.float().pow(2).sum() \
        + (model.u.float() * torch.arange(8.).view(1, 8, 1, 1)).pow(2).sum()


@pytest.mark.parametrize("name,kw", [("AdamW", {"weight_decay": 0.1}),
                                     ("SGD", {"momentum": 0.9, "nesterov": True}),
                                     ("RMSprop", {"centered": True, "momentum": 0.5})])
def test_params_keep_their_memory_layout(name, kw):
    """The flat mode packs channels_last and transposed params in their own memory order:
    they stay so, as with torch.optim (they came out row-major before); their state has
    their strides, as torch's zeros_like(p) gives it; the numbers and the state dicts, both
    ways, are torch's."""
    a, b = _layout_model(), _layout_model()
    strides = [p.stride() for p in a.parameters()]
    assert {(27, 1, 9, 3), (1, 7), (8, 1, 8, 8)} <= set(strides)
    ours = getattr(fot, name)(a.parameters(), lr=1e-2, **kw)
    theirs = getattr(torch.optim, name)(b.parameters(), lr=1e-2, **kw)
    assert [p.stride() for p in a.parameters()] == strides
    x = torch.randn(2, 3, 10, 10).to(memory_format=torch.channels_last)
    for k in range(6):
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad(set_to_none=k % 2 == 0)
            _layout_loss(model, x).backward()
            opt.step()
        assert [_used_strides(p.grad) for p in a.parameters()] \
            == [_used_strides(p) for p in a.parameters()]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [p.stride() for p in a.parameters()] == strides
    mine, torchs = ours.state_dict(), theirs.state_dict()
    for i, st in torchs["state"].items():
        for key, value in st.items():
            if value.dim() > 1:  # (the strides of dims of size > 1: torch's own state
                # is not consistent in the others, SGD's momentum cloning the gradient's)
                assert _used_strides(mine["state"][i][key]) == _used_strides(value), key
            # (centered RMSprop's momentum divides by sqrt(v - avg^2): 1e-5 of its largest
            # value apart from torch's, in either layout)
            torch.testing.assert_close(mine["state"][i][key], value, rtol=1e-4, atol=1e-4)
    c = _layout_model()  # torch's dict into ours (its tensors copied into our layout)
    with torch.no_grad():
        for p, q in zip(c.parameters(), b.parameters(), strict=True):
            p.copy_(q)
    again = getattr(fot, name)(c.parameters(), lr=1e-2, **kw)
    again.load_state_dict(torchs)
    theirs.load_state_dict(mine)  # and ours into torch
    for model, opt in ((a, ours), (b, theirs), (c, again)):
        opt.zero_grad()
        _layout_loss(model, x).backward()
        opt.step()
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)
        assert r.stride() == p.stride()


@pytest.mark.parametrize("master_weights", ["fp32", "remainder"])
def test_bfloat16_params_keep_their_layout_with_their_master(master_weights):
    """bfloat16 channels_last params, with a float32 master or remainders: the same numbers
    as row-major copies of the same params, and state dicts that load across layouts."""
    a = _layout_model(torch.bfloat16)
    b = _layout_model(torch.bfloat16)
    b.t = torch.nn.Parameter(b.t.detach().contiguous())
    b = b.to(memory_format=torch.contiguous_format)
    ours = fot.AdamW(a.parameters(), lr=1e-2, master_weights=master_weights)
    rows = fot.AdamW(b.parameters(), lr=1e-2, master_weights=master_weights)
    assert a[0].weight.stride() == (27, 1, 9, 3) and b[0].weight.is_contiguous()
    x = torch.randn(2, 3, 10, 10).to(torch.bfloat16)
    for _ in range(4):
        for model, opt in ((a, ours), (b, rows)):
            opt.zero_grad()
            _layout_loss(model, x.to(memory_format=torch.channels_last)
                         if model is a else x).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    sd = ours.state_dict()
    assert [sd["state"][i]["master_param"].stride() for i in sorted(sd["state"])] == \
        [p.stride() for p in a.parameters()]
    rows_sd = rows.state_dict()
    rows.load_state_dict(sd)  # each layout's dict into the other's
    ours.load_state_dict(rows_sd)
    for dest, source in ((rows, sd), (ours, rows_sd)):
        st = dest.state_dict()["state"]
        for i in source["state"]:
            torch.testing.assert_close(st[i]["master_param"], source["state"][i]
                                       ["master_param"], rtol=0, atol=0)
