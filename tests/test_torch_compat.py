"""fastopt.torch against torch.optim where PyTorch's own optimizer tests probe: state dicts of
older torch versions, load/state-dict hooks, non-tensor state, tensor lr and betas, two
optimizers over one param, capturable on CPU, deepcopy and pickle, named parameters, lazy
state, torch.distributed.checkpoint's dummy step, torch.compile. Every check compares with
the real torch.optim optimizer."""

import copy
import functools
import gc
import os
import pickle
import socket

import pytest
import torch

import fastopt.torch as fot
from fastopt import schedules as S

NAMES = ["Adam", "AdamW", "Adagrad", "Adadelta"]


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def grads(model, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()]
            for _ in range(steps)]


def run(model, opt, gs):
    """Steps with the given gradients, set as new tensors (as autograd after zero_grad())."""
    for step_grads in gs:
        opt.zero_grad()
        for p, g in zip(model.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def batches(steps, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(steps)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def assert_close(a, b, rtol=1e-5, atol=1e-7):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=atol, msg=name)


def assert_state_dicts_equal(ours, theirs, rtol=1e-5, atol=1e-7, groups="all"):
    assert ours["state"].keys() == theirs["state"].keys()
    for k, st in theirs["state"].items():
        assert ours["state"][k].keys() == st.keys(), k
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(ours["state"][k][name], v, rtol=rtol, atol=atol,
                                           msg=f"{k} {name}")
            else:
                assert ours["state"][k][name] == v
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for g, tg in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        skip = ("schedule", "lr", "initial_lr") if groups == "no lr" else ("schedule",)
        assert {k: v for k, v in g.items() if k not in skip} == \
            {k: v for k, v in tg.items() if k not in skip}


def pair(name, seed=0, named=False, fot_kw=None, **kw):
    """The same model twice: one with the torch.optim optimizer, one with fastopt's (given
    ``fot_kw`` instead of ``kw`` if set)."""
    ref, ours = make_model(seed), make_model(seed)
    params = (lambda m: m.named_parameters()) if named else (lambda m: m.parameters())
    return (ref, getattr(torch.optim, name)(params(ref), **kw),
            ours, getattr(fot, name)(params(ours), **(kw if fot_kw is None else fot_kw)))


# ---------------------------------------------------------------- 1. old state dicts

def _old_dict(source, kw, drop, edit=None, steps=5):
    """A torch ``source`` state dict after a few steps, made to look like an older torch's:
    the ``drop`` keys removed from the groups, python-number steps."""
    model = make_model(3)
    opt = getattr(torch.optim, source)(model.parameters(), **kw)
    run(model, opt, grads(model, steps, seed=4))
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for key in drop:
            g.pop(key, None)
        g.update(edit or {})
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    return sd


ADAM_KEYS = ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
             "decoupled_weight_decay"]
OLD_CASES = [
    # AdamW checkpoints from before torch put decoupled_weight_decay into the groups
    ("AdamW", "AdamW", dict(weight_decay=0.1), ["decoupled_weight_decay"], None, {}),
    # an Adam dict (decoupled_weight_decay False) loaded into AdamW: AdamW still decouples
    ("AdamW", "Adam", dict(weight_decay=0.1), [], None, {}),
    ("AdamW", "Adam", dict(weight_decay=0.1), ADAM_KEYS, None, {}),
    # the optimizer's own arguments do not fill the holes: torch's class defaults do
    ("Adam", "Adam", dict(weight_decay=0.05), ADAM_KEYS, None,
     dict(amsgrad=True, maximize=True)),
    ("Adam", "Adam", dict(amsgrad=True), ["maximize"], None, dict(amsgrad=True)),
    ("Adagrad", "Adagrad", dict(lr_decay=0.01, initial_accumulator_value=0.1),
     ["maximize", "foreach", "differentiable", "fused"], None, dict(maximize=True)),
    ("Adadelta", "Adadelta", dict(rho=0.8, weight_decay=0.01),
     ["maximize", "foreach", "differentiable", "capturable"], None, dict(maximize=True)),
]


@pytest.mark.parametrize("name,source,kw,drop,edit,target_kw", OLD_CASES)
def test_old_state_dicts_load_like_torch(name, source, kw, drop, edit, target_kw):
    sd = _old_dict(source, kw, drop, edit)
    ref, topt, ours, opt = pair(name, seed=3, **{**kw, **target_kw})
    topt.load_state_dict(copy.deepcopy(sd))
    opt.load_state_dict(copy.deepcopy(sd))
    assert [dict(g, params=None) for g in opt.param_groups] == \
        [dict(g, params=None) for g in topt.param_groups]
    gs = grads(ref, 20, seed=5)
    run(ref, topt, gs)
    run(ours, opt, gs)
    assert_close(ours, ref)


# ---------------------------------------------------------------- 2. load_state_dict hooks

@pytest.mark.parametrize("edit,error,match", [
    (lambda st: st.update(step=torch.tensor(-1.0)), ValueError, "'step' must be a step count"),
    (lambda st: st.update(step=torch.tensor(1.5)), ValueError, "'step' must be a step count"),
    (lambda st: st.update(step=torch.tensor(float("nan"))), ValueError, "must be a step count"),
    (lambda st: st.update(step="3"), ValueError, "'step' must be a step count"),
    (lambda st: st.update(step=torch.tensor(2.0 ** 70)), ValueError, "must be a step count"),
    (lambda st: st.pop("exp_avg"), KeyError, "no 'exp_avg', which AdamW always keeps"),
    (lambda st: st["exp_avg_sq"].neg_(), ValueError, "'exp_avg_sq' .* negative values")])
def test_a_corrupt_param_state_is_refused_at_load(edit, error, match):
    """A step count that is not one (a negative one made every param NaN at the next step,
    1.5 was stored as is) or a missing state buffer (it started at zeros, silently) is
    refused by the load, which changes nothing."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = fot.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    d = copy.deepcopy(opt.state_dict())
    edit(d["state"][0])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(d)
    after = opt.state_dict()
    assert int(after["state"][0]["step"]) == 1
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    opt.step()
    assert torch.isfinite(p).all()


def test_load_pre_hook_result_is_what_loads():
    """A pre-hook's returned dict (here: step 7, other moments, another lr) loads entirely."""
    def hook(optimizer, sd):
        new = copy.deepcopy(sd)
        for st in new["state"].values():
            st["step"] = torch.tensor(7.0)
            st["exp_avg"] = st["exp_avg"] * 0.5
        new["param_groups"][0]["lr"] = 3e-3
        return new

    src_model = make_model(1)
    src = torch.optim.Adam(src_model.parameters(), lr=1e-3)
    run(src_model, src, grads(src_model, 3))
    sd = src.state_dict()
    ref, topt, ours, opt = pair("Adam", lr=1e-3)
    for o in (topt, opt):
        o.register_load_state_dict_pre_hook(hook)
        o.load_state_dict(sd)
    assert float(opt.state_dict()["state"][0]["step"]) == 7
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    gs = grads(ref, 10)
    run(ref, topt, gs)
    run(ours, opt, gs)
    assert_close(ours, ref)


def test_load_post_hook_sees_and_keeps_the_loaded_state():
    """Post-hooks run after fastopt's own state rebuild: what they add or change stays."""
    def hook(optimizer):
        for st in optimizer.state.values():
            st["exp_avg_sq"].mul_(4.0)
            st["note"] = torch.tensor([1.0, 2.0])
            st["loads"] = st.get("loads", 0) + 1

    src_model = make_model(1)
    src = torch.optim.AdamW(src_model.parameters())
    run(src_model, src, grads(src_model, 3))
    sd = src.state_dict()
    ref, topt, ours, opt = pair("AdamW")
    for o in (topt, opt):
        o.register_load_state_dict_post_hook(hook)
        o.load_state_dict(copy.deepcopy(sd))  # torch's loaded state aliases the dict's
    assert opt.state_dict()["state"][0]["loads"] == 1
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    gs = grads(ref, 10)
    run(ref, topt, gs)
    run(ours, opt, gs)
    assert_close(ours, ref)


# ---------------------------------------------------------------- 3. non-tensor state

def test_a_schedule_in_saved_param_groups_loads_with_weights_only(tmp_path):
    """A schedule kept in param groups (ZeroRedundancyOptimizer's state_dict keeps its groups
    as they are) loads with torch.load's default weights_only=True, equal and read-only; a
    pickle of the former form (the table as a numpy array) still loads with pickle."""
    import numpy as np

    sched = S.warmup(S.cosine(1e-2, 100, end_lr=1e-4), 10)
    path = tmp_path / "groups.pt"
    torch.save({"param_groups": [{"lr": 1e-2, "schedule": sched}]}, path)
    back = torch.load(path)["param_groups"][0]["schedule"]
    assert back == sched and repr(back) == repr(sched) and not back.table.flags.writeable
    np.testing.assert_array_equal(back.at(np.arange(120)), sched.at(np.arange(120)))

    class FormerForm:
        def __reduce__(self):
            return S.Schedule, (sched.table.copy(), repr(sched))

    assert pickle.loads(pickle.dumps(FormerForm())) == sched


def test_a_step_from_a_second_thread_is_refused_and_a_load_waits():
    """One optimizer stepped from two threads at once: the second step raises (torch.optim's
    race and lose steps: a review measured step 50 after 2 x 50 steps); a load_state_dict
    from another thread waits for the running step, then loads whole. The closure runs
    inside the step, so the other thread meets a step in progress every time."""
    import threading

    p = torch.nn.Parameter(torch.ones(1000))
    opt = fot.AdamW([p], lr=0.1)
    p.grad = torch.ones(1000)
    opt.step()
    saved = opt.state_dict()
    outcome = {}

    def second_step():
        try:
            opt.step()
        except RuntimeError as e:
            outcome["step"] = str(e)

    def load():
        outcome["copy"] = copy.deepcopy(opt)  # (a copy waits too: never half-updated)
        opt.load_state_dict(saved)
        outcome["loaded"] = True

    def closure():
        other = threading.Thread(target=second_step)
        other.start()
        other.join()
        loader = threading.Thread(target=load)
        loader.start()
        loader.join(0.3)
        outcome["load_waited"] = loader.is_alive() and "copy" not in outcome
        outcome["loader"] = loader
        with pytest.raises(RuntimeError, match="or in this one"):  # (a nested step)
            opt.step()
        assert opt.state_dict()["state"][0]["step"] == 1  # (the stepping thread may)
        return torch.tensor(0.0)

    opt.step(closure)
    outcome["loader"].join(10)
    assert "already running" in outcome["step"]
    assert outcome["load_waited"] and outcome["loaded"]
    assert float(opt.state[p]["step"]) == 1  # the load came after the step, whole
    assert float(next(iter(outcome["copy"].state.values()))["step"]) == 2  # (after it too)
    torch.testing.assert_close(opt.state[p]["exp_avg"], saved["state"][0]["exp_avg"])


def test_state_dict_keeps_non_tensor_state_entries():
    ref, topt, ours, opt = pair("Adagrad")
    gs = grads(ref, 3)
    run(ref, topt, gs)
    run(ours, opt, gs)
    for o, model in ((topt, ref), (opt, ours)):
        first = next(iter(model.parameters()))
        o.state[first]["count"] = 3
        o.state[first]["scale"] = 0.5
        o.state[first]["tags"] = [1, 2.5]  # (not strings: torch's loader turns a string
        # inside a list into the text of a generator object, its address varying)
    sd = opt.state_dict()
    assert_state_dicts_equal(sd, topt.state_dict())
    assert sd["state"][0]["count"] == 3 and sd["state"][0]["scale"] == 0.5
    # and they load: into torch, and back into a fastopt optimizer
    back_model = make_model()
    back = fot.Adagrad(back_model.parameters())
    back.load_state_dict(sd)
    torch_model = make_model()
    tback = torch.optim.Adagrad(torch_model.parameters())
    tback.load_state_dict(sd)
    assert_state_dicts_equal(back.state_dict(), tback.state_dict())


# ---------------------------------------------------------------- 4. tensor lr and betas

@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_like_torch(name):
    lr = 0.05 if name in ("Adagrad", "Adadelta") else 3e-3
    t_lr, o_lr = torch.tensor(lr), torch.tensor(lr)
    ref, topt, ours, opt = pair(name, lr=t_lr, fot_kw=dict(lr=o_lr))
    gs = grads(ref, 24)
    run(ref, topt, gs[:8])
    run(ours, opt, gs[:8])
    t_lr.mul_(0.5)  # changed in place after construction: read at every step
    o_lr.mul_(0.5)
    run(ref, topt, gs[8:16])
    run(ours, opt, gs[8:16])
    for o in (topt, opt):  # a tensor lr set on the group
        o.param_groups[0]["lr"] = torch.tensor(lr * 2)
    run(ref, topt, gs[16:])
    run(ours, opt, gs[16:])
    assert_close(ours, ref)


def test_tensor_lr_state_dict_from_torch_loads_and_steps():
    src_model = make_model(1)
    src = torch.optim.AdamW(src_model.parameters(), lr=torch.tensor(2e-3), weight_decay=0.1)
    run(src_model, src, grads(src_model, 4))
    sd = src.state_dict()
    ref, topt, ours, opt = pair("AdamW", weight_decay=0.1)
    topt.load_state_dict(sd)
    opt.load_state_dict(sd)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    gs = grads(ref, 10)
    run(ref, topt, gs)
    run(ours, opt, gs)
    assert_close(ours, ref)


def test_multi_element_tensor_lr_is_refused_like_torch():
    lr = torch.tensor([1e-3, 2e-3])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        torch.optim.Adam(make_model().parameters(), lr=lr)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        fot.Adam(make_model().parameters(), lr=lr)
    model = make_model()
    opt = fot.Adagrad(model.parameters())
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        run(model, opt, grads(model, 1))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_tensor_betas_like_torch(name, shape):
    betas = (torch.full(shape, 0.8), torch.full(shape, 0.95))
    ref, topt, ours, opt = pair(name, lr=1e-2, betas=betas, weight_decay=0.01)
    assert opt.param_groups[0]["betas"][0].shape == topt.param_groups[0]["betas"][0].shape
    gs = grads(ref, 30)
    run(ref, topt, gs)
    run(ours, opt, gs)
    assert_close(ours, ref)
    with pytest.raises(ValueError, match=r"Tensor betas\[0\] must be 1-element"):
        fot.Adam(make_model().parameters(), betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.9)))


# ---------------------------------------------------------------- 5. two optimizers

def test_second_optimizer_over_the_same_params_is_refused():
    ref, topt, ours, opt = pair("AdamW", lr=1e-2)
    gs = grads(ref, 10)
    run(ref, topt, gs[:5])
    run(ours, opt, gs[:5])
    with pytest.raises(RuntimeError, match="already belong to another fastopt optimizer"
                       r"(.|\n)*any LR scheduler holding it(.|\n)*multi_tensor=True"):
        fot.Adam(ours.parameters())
    with pytest.raises(RuntimeError, match="another fastopt optimizer"):  # a partial overlap
        fot.Adagrad([torch.nn.Parameter(torch.zeros(2)), ours[0].weight])
    run(ref, topt, gs[5:])  # the first optimizer is untouched by the refusals
    run(ours, opt, gs[5:])
    assert_close(ours, ref)
    # once the first optimizer is gone, its params may get a new one
    del opt
    gc.collect()
    again = fot.Adam(ours.parameters())
    run(ours, again, gs[:1])


# ---------------------------------------------------------------- 6. capturable on CPU

@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adadelta"])
def test_capturable_on_cpu_raises_at_step_like_torch(name):
    ref, topt, ours, opt = pair(name, capturable=True)
    gs = grads(ref, 1)
    with pytest.raises(AssertionError) as theirs:
        run(ref, topt, gs)
    with pytest.raises(AssertionError) as mine:
        run(ours, opt, gs)
    assert str(mine.value) == str(theirs.value)
    assert_close(ours, make_model())  # nothing moved


# ---------------------------------------------------------------- 7. deepcopy and pickle

@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_copies_public_attributes_and_state(name):
    ref, topt, ours, opt = pair(name)
    gs = grads(ref, 3)
    run(ref, topt, gs)
    run(ours, opt, gs)

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    for o in (topt, opt):
        assert public(copy.deepcopy(o)) == public(o)
    dup = copy.deepcopy(opt)
    assert_state_dicts_equal(dup.state_dict(), opt.state_dict(), rtol=0, atol=0)
    # the copy's params are new tensors in a new flat buffer; the original is untouched
    p, q = opt.param_groups[0]["params"][0], dup.param_groups[0]["params"][0]
    assert q is not p and q.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    before = [t.detach().clone() for t in ours.parameters()]
    for t in dup.param_groups[0]["params"]:
        t.grad = torch.ones_like(t)
    dup.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters(), strict=True))


def test_deepcopy_of_model_and_optimizer_together_trains_like_torch():
    ref, topt, ours, opt = pair("Adam", lr=1e-2, amsgrad=True, named=True)
    opt.add_param_group({"params": [("extra", torch.nn.Parameter(torch.ones(3)))],
                         "lr": S.cosine(1e-2, 20)})
    data = batches(20)
    train(ref, topt, data[:6])
    train(ours, opt, data[:6])
    for order in ("model first", "optimizer first"):
        if order == "model first":
            model2, opt2 = copy.deepcopy((ours, opt))
        else:
            opt2, model2 = copy.deepcopy((opt, ours))
        assert [id(p) for p in opt2.param_groups[0]["params"]] == \
            [id(p) for p in model2.parameters()]
        assert opt2.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
        assert opt2.param_groups[1]["schedule"] == opt.param_groups[1]["schedule"]
        flat = opt2._buckets[0][0].flat.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == flat for p in model2.parameters())
        ref2 = copy.deepcopy(ref)
        topt2 = torch.optim.Adam(ref2.named_parameters(), lr=1e-2, amsgrad=True)
        topt2.load_state_dict(copy.deepcopy(topt.state_dict()))  # torch would alias it
        train(ref2, topt2, data[6:])
        train(model2, opt2, data[6:])
        assert_close(model2, ref2)
    assert_close(ours, ref)  # the originals did not move


def test_pickle_round_trip():
    model = make_model()
    opt = fot.AdamW(model.named_parameters(), lr=S.cosine(1e-2, 20), weight_decay=0.1)
    run(model, opt, grads(model, 4))
    back = pickle.loads(pickle.dumps(opt))
    assert_state_dicts_equal(back.state_dict(), opt.state_dict(), rtol=0, atol=0)
    params = back.param_groups[0]["params"]
    flat = back._buckets[0][0].flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == flat for p in params)
    gs = grads(model, 5, seed=9)
    run(model, opt, gs)
    for step_grads in gs:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        back.step()
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- 8. named parameters

@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_like_torch(name):
    ref, topt, ours, opt = pair(name, named=True)
    assert opt.param_groups[0]["param_names"] == topt.param_groups[0]["param_names"]
    data = batches(12)
    train(ref, topt, data[:6])
    train(ours, opt, data[:6])
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    # named state dicts both ways, mid-training
    ref2, ours2 = copy.deepcopy(ref), copy.deepcopy(ours)
    topt2 = getattr(torch.optim, name)(ref2.named_parameters())
    opt2 = getattr(fot, name)(ours2.named_parameters())
    topt2.load_state_dict(opt.state_dict())
    opt2.load_state_dict(topt.state_dict())
    train(ref2, topt2, data[6:])
    train(ours2, opt2, data[6:])
    train(ref, topt, data[6:])
    assert_close(ours2, ref)
    assert_close(ref2, ref)
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


# ---------------------------------------------------------------- 9. lazy state

@pytest.mark.parametrize("name", NAMES)
def test_state_appears_when_params_step_like_torch(name):
    ref, topt, ours, opt = pair(name)
    # fresh: empty state (but torch's Adagrad makes it at construction)
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    assert len(opt.state) == (4 if name == "Adagrad" else 0)
    for o in (topt, opt):  # no grads at all: a no-op that creates no state
        o.step()
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    # the first layer's params only (the last layer never gets a grad)
    for model, o in ((ref, topt), (ours, opt)):
        x, _ = batches(1)[0]
        model[1](model[0](x)).sum().backward()
        o.step()
    assert set(opt.state_dict()["state"]) == ({0, 1, 2, 3} if name == "Adagrad" else {0, 1})
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    data = batches(5)
    train(ref, topt, data)
    train(ours, opt, data)
    assert_state_dicts_equal(opt.state_dict(), topt.state_dict())
    assert_close(ours, ref)


def test_params_never_given_a_grad_do_not_move_like_torch():
    """A param outside the loss keeps grad None, so AdamW does not decay it (as torch)."""
    ref, topt, ours, opt = pair("AdamW", weight_decay=0.5, lr=0.1)
    for model, o in ((ref, topt), (ours, opt)):
        for x, y in batches(5):
            o.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model[1](model[0](x))[:, :3], y).backward()
            o.step()
    assert ours[2].weight.grad is None
    assert torch.equal(ours[2].weight, make_model()[2].weight)
    assert_close(ours, ref)


# ---------------------------------------------------------------- 10. DCP's dummy step

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("schedule", [None, 0.1, 0.0])
def test_dcp_state_dict_of_a_fresh_optimizer_moves_nothing(schedule, gloo_world_of_one):
    """get_optimizer_state_dict steps a fresh optimizer with zero grads at lr 0: params stay,
    the state is torch's, and an in-kernel schedule is not advanced (a torch scheduler is not).
    A warm-up from 0 (``schedule`` 0.0: the start lr's factor) used to take DCP's 0 for its
    own, so the schedule advanced and the restored lr then held at 0 for good."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.optim import lr_scheduler as L

    from fastopt.schedules import host_lr

    steps, lr = 30, 1e-2
    fot_lr = lr if schedule is None else S.warmup(S.cosine(lr, steps - 10), 10,
                                                  start_lr=lr * schedule)
    ref, topt, ours, opt = pair("AdamW", lr=lr, weight_decay=0.1,
                                fot_kw=dict(lr=fot_lr, weight_decay=0.1))
    tsched = None
    if schedule is not None:
        tsched = L.LambdaLR(topt, lambda t: host_lr(fot_lr, t) / lr)
    start = make_model()
    theirs = get_optimizer_state_dict(ref, topt)
    mine = get_optimizer_state_dict(ours, opt)
    assert_close(ours, start, rtol=0, atol=0)
    assert_state_dicts_equal(mine, theirs, rtol=0, atol=0,
                             groups="all" if schedule is None else "no lr")
    for x, y in batches(steps):
        for model, o, sched in ((ref, topt, tsched), (ours, opt, None)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            o.step()
            if sched is not None:
                sched.step()
    assert_close(ours, ref)
    assert opt.param_groups[0]["lr"] == pytest.approx(topt.param_groups[0]["lr"], rel=1e-6)


@pytest.mark.parametrize("how", ["full", "dcp"])
@pytest.mark.parametrize("start", [0.0, 0.1])
def test_dcp_resume_into_a_fresh_optimizer_keeps_the_schedule(how, start, gloo_world_of_one,
                                                              tmp_path):
    """A fresh optimizer loaded through DCP (set_state_dict with a full dict, or dcp.load of
    a sharded one) resumes bit for bit. DCP first steps the fresh optimizer (a held step:
    its schedule's table gains a row), and then loaded the saved table into it: a tensor
    table of the other size failed to load, a table in lists kept the extra row."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    schedule = S.warmup(S.cosine(1e-2, 20), 4, start_lr=1e-2 * start)
    gs = batches(8)

    def make():
        model = make_model()
        return model, fot.AdamW(model.parameters(), lr=schedule, weight_decay=0.1)

    def train(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    straight, opt = make()
    train(straight, opt, gs)
    model, opt = make()
    train(model, opt, gs[:4])
    options = StateDictOptions(full_state_dict=how == "full")
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    if how == "dcp":
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    model, opt = make()
    if how == "dcp":
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(tmp_path))
        model_sd, optim_sd = state["model"], state["optim"]
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=options)
    assert opt.param_groups[0]["schedule"] == schedule
    train(model, opt, gs[4:])
    assert_close(model, straight, rtol=0, atol=0)


def test_zero_resume_keeps_the_in_kernel_schedule(gloo_world_of_one):
    """ZeroRedundancyOptimizer over a fastopt optimizer with an in-kernel schedule, resumed
    from its consolidated state dict (through torch.save): ZeRO's load puts the state into
    its local optimizer's ``state`` and copies the loaded group values (a float lr equal to
    the schedule's) into its groups, never calling the local load_state_dict. The lr was
    then a hold for good (5.8e-3 off the uninterrupted run); it is taken as a load takes
    it now, and the resumed run equals the uninterrupted one bit for bit."""
    import io

    from torch.distributed.optim import ZeroRedundancyOptimizer

    from fastopt.schedules import host_lr

    schedule = S.warmup(S.cosine(1e-2, 20, end_lr=1e-4), 4)
    data = batches(12)

    def make(model):
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fot.AdamW,
                                       lr=schedule, weight_decay=0.1)

    straight = make_model()
    train(straight, make(straight), data)
    model = make_model()
    opt = make(model)
    train(model, opt, data[:6])
    opt.consolidate_state_dict(to=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt = make(resumed)
    opt.load_state_dict(saved["optim"])
    train(resumed, opt, data[6:])
    assert_close(resumed, straight, rtol=0, atol=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(host_lr(schedule, 12))


def test_zero_with_parameters_as_bucket_views(gloo_world_of_one):
    """ZeRO's parameters_as_bucket_view=True moves the params into its buckets after the
    local optimizer is built: the flat mode refuses that at the first step (nothing moved),
    the multi-tensor mode steps them where they now live, as torch.optim does."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    data = batches(6)
    straight = make_model()
    train(straight, torch.optim.AdamW(straight.parameters(), lr=1e-2), data)
    flat = make_model()
    opt = ZeroRedundancyOptimizer(flat.parameters(), optimizer_class=fot.AdamW, lr=1e-2,
                                  parameters_as_bucket_view=True)
    with pytest.raises(RuntimeError, match="no longer lives in this optimizer's flat buffer"):
        train(flat, opt, data[:1])
    assert_close(flat, make_model(), rtol=0, atol=0)
    model = make_model()
    train(model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fot.AdamW,
                                         lr=1e-2, multi_tensor=True,
                                         parameters_as_bucket_view=True), data)
    assert_close(model, straight)


def test_a_hold_at_the_schedules_own_value_is_a_hold():
    """group['lr'] set to the value fastopt wrote there (0 at a warm-up's start) holds the
    lr as any other value does: the held steps do not advance the schedule, and writing
    back the lr read from the group (or the schedule itself) resumes it. fastopt told its
    own lr by value: the hold was ignored, and the write-back then held the lr at 0 for
    good (the params never moved again)."""
    schedule = S.warmup(S.cosine(1e-2, 20), 3)
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=schedule)
    group = opt.param_groups[0]
    saved = group["lr"]
    used = []
    for step, (x, y) in enumerate(batches(8)):
        if step == 0:
            group["lr"] = 0.0
        if step == 2:
            group["lr"] = saved
        used.append(group["lr"])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert used == pytest.approx([0.0, 0.0] + [float(schedule.at(k)) for k in range(6)])
    # a hold goes on through a copy, a pickle or a state dict (a hold at the schedule's own
    # value too, where the dict can: a pickle), and putting the schedule back ends it
    for how in ("live", "deepcopy", "pickle", "state_dict"):
        for hold in (0.5, group["lr"] + 0.0):  # (+ 0.0: an equal float, another object)
            if how == "state_dict" and hold != 0.5:
                continue  # (a state dict holds values: one equal to the schedule's is its own)
            group["lr"] = hold
            opt.step()
            if how == "deepcopy":
                model, opt = copy.deepcopy((model, opt))
            elif how == "pickle":
                model, opt = pickle.loads(pickle.dumps((model, opt)))
            elif how == "state_dict":
                saved = opt.state_dict()
                del opt
                opt = fot.Adam(model.parameters(), lr=schedule)
                opt.load_state_dict(saved)
            group = opt.param_groups[0]
            before = group["lr"]
            opt.step()
            assert group["lr"] == before == hold, how  # (the hold goes on)
            group["lr"] = group["schedule"]
            opt.step()
            assert group["lr"] is opt._lr_written[0], how  # (resumed)


def test_lr_set_on_a_scheduled_group_overrides_it_while_it_holds():
    """group['lr'] written by someone else wins over the in-kernel schedule for those steps,
    which do not advance it; writing back the value fastopt left resumes the schedule."""
    ref, topt, ours, opt = pair("Adam", lr=1e-2, fot_kw=dict(lr=S.constant(1e-2)))
    gs = grads(ref, 12)
    run(ref, topt, gs[:4])
    run(ours, opt, gs[:4])
    saved = opt.param_groups[0]["lr"]
    for o in (topt, opt):
        o.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in ours.parameters()]
    run(ref, topt, gs[4:7])
    run(ours, opt, gs[4:7])
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters(), strict=True))
    for o in (topt, opt):
        o.param_groups[0]["lr"] = saved
    run(ref, topt, gs[7:])
    run(ours, opt, gs[7:])
    assert_close(ours, ref)
    # a schedule overridden for 3 steps runs 3 steps later
    cos = S.cosine(1e-2, 40)
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=cos)
    opt.param_groups[0]["lr"] = 0.0
    run(model, opt, gs[:3])
    assert opt.param_groups[0]["lr"] == 0.0  # still the user's
    opt.param_groups[0]["lr"] = opt.param_groups[0]["schedule"]  # back to the schedule
    run(model, opt, gs[3:5])
    assert opt.param_groups[0]["lr"] == pytest.approx(cos.at(2))
    assert opt.state[model[0].weight]["step"] == 5
    assert opt.param_groups[0]["schedule"].at(range(3, 40)) == \
        pytest.approx(cos.at(range(0, 37)))


# ---------------------------------------------------------------- 11. torch.compile

def _wide_model(seed=0):
    """Big enough (> PARALLEL_MIN_SIZE elements) for the parallel Numba kernels."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 200), torch.nn.Tanh(),
                               torch.nn.Linear(200, 100), torch.nn.Tanh(),
                               torch.nn.Linear(100, 3))


@pytest.mark.parametrize("name,backend", [(n, "eager") for n in NAMES]
                         + [("Adam", "inductor"), ("AdamW", "inductor")])
def test_compiled_step_like_torch(name, backend):
    """torch.compile(opt.step): the fused kernel call runs outside the graph (inductor has
    nothing left to compile here: 2 s on 2 cores)."""
    torch._dynamo.reset()
    kw = dict(lr=0.0123, weight_decay=0.01)
    ref, ours = _wide_model(), _wide_model()
    topt = getattr(torch.optim, name)(ref.parameters(), **kw)
    opt = getattr(fot, name)(ours.parameters(), **kw)
    step = torch.compile(opt.step, backend=backend)
    data = batches(4)
    train(ref, topt, data)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ours(x), y).backward()
        step()
    assert_close(ours, ref)


@pytest.mark.parametrize("multi_tensor", [False, True])
def test_a_step_raises_the_params_versions_like_torch(multi_tensor):
    """torch's in-place update raises each stepped param's version counter, so a retained
    graph that saved a param refuses a second backward after the step; the kernel's writes
    must count too, or that backward silently uses the new values."""
    for make in (torch.optim.SGD, functools.partial(fot.SGD,
                                                    multi_tensor=multi_tensor)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        model[1].weight.requires_grad_(False)  # (not stepped: its version stays)
        opt = make(model.parameters(), lr=0.5)
        before = [p._version for p in model.parameters()]
        loss = model(torch.randn(3, 4, requires_grad=True)).sum()
        loss.backward(retain_graph=True)
        opt.step()
        assert [p._version - v for p, v in zip(model.parameters(), before, strict=True)] \
            == [1, 1, 0, 1]
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_fullgraph_compile_names_the_reason():
    """fullgraph=True cannot hold a Numba kernel call: the error says so and what to do, rather
    than naming the first thing Dynamo met inside the step (the profiler check)."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.ones(4))
    opt = fot.AdamW([p])
    p.grad = torch.ones(4)
    with pytest.raises(Exception, match="without fullgraph=True"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert torch.equal(p.detach(), torch.ones(4))  # (nothing stepped)


def test_replaced_param_groups_are_refused_not_silently_ignored():
    """DeepSpeed's ZeRO hands a client optimizer its own flat partitions by replacing
    param_groups[i]['params'] (or narrows param_groups around step()): fastopt.torch steps
    the params it was built over, so it must say so rather than train nothing."""
    m = torch.nn.Linear(4, 3)
    opt = fot.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    partition = torch.nn.Parameter(torch.zeros(15))
    partition.grad = torch.ones(15)
    saved = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = [partition]
    with pytest.raises(RuntimeError, match="param group 0 were replaced"):
        opt.step()
    opt.param_groups[0]["params"] = list(saved)  # (a new list of the same params: fine)
    opt.step()
    opt.param_groups = []
    with pytest.raises(RuntimeError, match="param_groups was replaced"):
        opt.step()


def test_a_bad_value_in_a_later_group_steps_no_group():
    """Every group's lr and hyperparameters are checked before any group steps (torch.optim
    checks inside its per-group loop; fastopt steps none of them: nothing half-stepped)."""
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt = fot.AdamW([{"params": a.parameters()}, {"params": b.parameters()}], lr=1e-2)
    b(a(torch.randn(4, 3))).sum().backward()
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):  # (as at
        opt.step()  # construction: one message and one error type for one mistake)
    opt.param_groups[1]["lr"] = "0.1"
    with pytest.raises(TypeError, match="Invalid learning rate: 0.1 .a str"):
        opt.step()
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert not opt.state


def test_adagrad_sum_starts_at_the_constructors_value_in_every_group():
    """torch's Adagrad fills every group's ``sum`` with the constructor's
    initial_accumulator_value (a group's own value is kept but not read), in later groups
    too; fastopt used each group's value."""
    def run(make, **kw):
        a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
        opt = make([dict(params=[a], initial_accumulator_value=0.5), dict(params=[b])],
                   lr=0.1, initial_accumulator_value=0.3, **kw)
        opt.add_param_group(dict(params=[c], initial_accumulator_value=0.7))
        for p in (a, b, c):
            p.grad = torch.ones(2)
        opt.step()
        return [p.detach().clone() for p in (a, b, c)], [opt.state[p]["sum"].clone()
                                                         for p in (a, b, c)]
    want = run(torch.optim.Adagrad)
    for multi in (False, True):
        torch.testing.assert_close(run(fot.Adagrad, multi_tensor=multi), want)


@pytest.mark.parametrize("multi", [False, True])
def test_grad_data_replaced_is_read(multi):
    """``p.grad.data = x`` (what Module._apply does to existing grads, e.g. a
    model.to(float64).to(float32) round trip) left fastopt's gradient buffer behind: every
    later step reused the last gradient it held (the multi-tensor mode follows the params
    that round trip moves)."""
    results = []
    for make in (torch.optim.Adam, lambda ps, **kw: fot.Adam(ps, multi_tensor=multi, **kw)):
        model = make_model()
        opt = make(model.parameters(), lr=0.1)
        for s in range(5):
            if s == 2 and multi:  # (the flat mode refuses params moved by model.to())
                model.to(torch.float64)
                model.to(torch.float32)
            if s == 3:
                p = next(model.parameters())
                p.grad.data = p.grad.data.clone()
            torch.manual_seed(10 + s)
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        results.append([p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("key,value", [("state_dtype", "int8"), ("master_weights", "none"),
                                       ("multi_tensor", True)])
def test_optimizer_wide_keywords_in_a_param_group_are_refused(key, value):
    """They hold for the whole optimizer; in a group another value was kept and never read
    (the group said int8, the state was float32)."""
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=key):
        fot.AdamW([{"params": [a], key: value}])
    opt = fot.AdamW([a])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [b], key: value})
    assert len(opt.param_groups) == 1
    # the optimizer's own value is accepted (ZeroRedundancyOptimizer passes its keywords in
    # every group it builds)
    same = fot.AdamW([{"params": [b], key: value}], **{key: value})
    assert getattr(same, key) == value


def test_reduce_on_plateau_refuses_a_fastopt_torch_optimizer():
    """fastopt.ReduceOnPlateau scales the core classes' in-kernel lr; a fastopt.torch
    optimizer has none (it raised AttributeError at the first reduction), and torch's
    ReduceLROnPlateau works on it as on torch's."""
    import fastopt

    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        fastopt.ReduceOnPlateau(fot.Adam([torch.nn.Parameter(torch.zeros(2))]))
    results = []
    for make in (torch.optim.Adam, fot.Adam):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make([p], lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        for s in range(4):
            p.grad = torch.full((3,), float(s + 1))
            opt.step()
            plateau.step(1.0)
        results.append((p.detach().clone(), opt.param_groups[0]["lr"]))
    torch.testing.assert_close(results[1], results[0])


HOGWILD = r"""
import sys, torch, torch.multiprocessing as mp
import fastopt.torch as fot

def train(model, kind):
    make = torch.optim.SGD if kind == "torch" else fot.SGD
    opt = make(model.parameters(), lr=0.1, momentum=0.9)
    for s in range(5):
        opt.zero_grad()
        model(torch.full((1, 4), float(s + 1))).sum().backward()
        opt.step()

moved = {}
for kind in ("torch", "fastopt"):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model.share_memory()
    before = [p.detach().clone() for p in model.parameters()]
    worker = mp.get_context("fork").Process(target=train, args=(model, kind))
    worker.start()
    worker.join(120)
    assert worker.exitcode == 0, worker.exitcode
    moved[kind] = [p.detach() - b for p, b in zip(model.parameters(), before)]
for a, b in zip(moved["torch"], moved["fastopt"]):
    torch.testing.assert_close(b, a)
assert float(moved["torch"][0].abs().max()) > 0.1
print("ok")
"""


@pytest.mark.parametrize("mode", ["flat", "multi_tensor", "step_in_backward", "bfloat16"])
def test_share_memory_after_the_optimizer_was_built(mode):
    """model.share_memory() after the flat mode packed the params moves the flat buffers'
    storage into shared memory in place (every param and gradient view with it) and frees
    the old memory: the optimizer follows (its kernel arrays are made again), and the
    params stay in the shared buffer. It raised at the next step before."""
    results = []
    for kind in ("torch", mode):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 2))
        if kind == "bfloat16":
            model = model.bfloat16()
        if kind == "torch":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        else:
            opt = fot.AdamW(model.parameters(), lr=1e-2, multi_tensor=kind == "multi_tensor")
        handle = fot.step_in_backward(model, opt) if kind == "step_in_backward" else None
        for s in range(6):
            if s == 2:
                model.share_memory()
                assert all(p.is_shared() for p in model.parameters())
            x = torch.full((3, 4), 0.1 * (s + 1), dtype=next(model.parameters()).dtype)
            model(x).float().square().sum().backward()
            if handle is None:
                opt.step()
                opt.zero_grad()
        results.append([p.detach().float() for p in model.parameters()])
        if kind == "flat":  # (the params are still the flat buffer's views)
            b = opt._buckets[0][0]
            assert b.flat.is_shared()
            assert all(p.data_ptr() == a for p, a in zip(model.parameters(), b.addresses,
                                                         strict=True))
    tol = dict(rtol=2e-2, atol=2e-2) if mode == "bfloat16" else {}
    torch.testing.assert_close(results[1], results[0], **tol)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_a_shared_memory_model_is_stepped_where_it_lies():
    """torch's Hogwild recipe: model.share_memory(), then worker processes build their
    optimizers and step the shared params. The flat mode packed them into the worker's own
    memory, so the parent's model never moved; params in shared memory are now stepped in
    place."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HOGWILD], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("mode", ["flat", "multi_tensor", "step_in_backward", "offload"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_a_param_without_gradient_on_some_steps_takes_the_groups_lr(name, mode):
    """An in-kernel schedule gives every param its group's lr, as a torch scheduler does: a
    layer frozen for its first steps (or unused on some) used to restart the schedule at
    its own count when it came back (warm-up again: 0.06 off torch after 12 steps). Its
    bias corrections still count its own steps, as in torch."""
    import sys

    from fastopt.schedules import host_lr

    schedule = S.warmup(S.cosine(1e-2, 20), 5)
    kw = dict(momentum=0.9) if name == "SGD" else {}
    results = []
    for kind in ("torch", mode):
        model = make_model()
        params = list(model.parameters())
        handle = None
        if kind == "torch":
            opt = getattr(torch.optim, name)(params, lr=1.0, **kw)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: host_lr(schedule, t))
        elif kind == "offload":
            sys.path.insert(0, os.path.dirname(__file__))
            from test_offload import FakeTransfers

            opt = fot.CPUOffload(params, name, lr=schedule, bucket_elements=30,
                                 _transfers=FakeTransfers(), **kw)
        else:
            opt = getattr(fot, name)(params, lr=schedule, multi_tensor=kind == "multi_tensor",
                                     **kw)
            if kind == "step_in_backward":
                handle = fot.step_in_backward(model, opt)
        for s in range(12):
            for p in model[0].parameters():  # frozen for 6 steps, then on odd steps only
                p.requires_grad_(s >= 6 and s % 2 == 1)
            torch.manual_seed(100 + s)
            model(torch.randn(5, 6)).square().mean().backward()
            if handle is None:
                opt.step()
                opt.zero_grad()
            if kind == "torch":
                scheduler.step()
        results.append([p.detach().clone() for p in params])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("mode", ["flat", "multi_tensor", "step_in_backward", "offload",
                                  "offload_in_backward"])
def test_a_group_without_any_gradient_still_moves_its_lr(mode):
    """A step where no param of a group has a gradient moves the group's lr on, as torch's
    scheduler does for every group: the group's schedule is advanced by the step (and kept
    so in its state dict). It used to stay behind: 0.0079 against torch's 0.0050 after a
    group was frozen for 6 of 20 steps, 4.2e-3 off in the params. Under step in backward,
    a backward that gives none of a group's params a gradient is such a step."""
    import sys

    from fastopt.schedules import host_lr

    schedule = S.warmup(S.cosine(1e-2, 30), 5)
    results = []
    for kind in ("torch", mode):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]

        def make(kind=kind, ps=ps):
            groups = [{"params": [ps[0]]}, {"params": [ps[1]]}]
            if kind.startswith("offload"):
                sys.path.insert(0, os.path.dirname(__file__))
                from test_offload import FakeTransfers

                return fot.CPUOffload(groups, "Adam", lr=schedule, _transfers=FakeTransfers(),
                                      step_in_backward=kind == "offload_in_backward"), None
            opt = fot.Adam(groups, lr=schedule, multi_tensor=kind == "multi_tensor")
            handle = fot.step_in_backward(ps, opt) if kind == "step_in_backward" else None
            return opt, handle

        if kind == "torch":
            opt = torch.optim.Adam([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=1.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: host_lr(schedule, t))
        else:
            opt, handle = make()
        for t in range(20):
            torch.manual_seed(100 + t)
            grads = [None if i == 1 and 3 <= t < 9 else torch.randn(4) for i in range(2)]
            if kind.endswith("in_backward"):
                sum((p * g).sum() for p, g in zip(ps, grads, strict=True)
                    if g is not None).backward()
                if kind == "step_in_backward":
                    continue
            else:
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g
            opt.step()
            opt.zero_grad()
            if kind == "torch":
                scheduler.step()
            elif t == 12:  # (a resume keeps the group's place in its schedule)
                saved = opt.state_dict()
                del opt
                opt, handle = make()
                opt.load_state_dict(saved)
        results.append(([p.detach().clone() for p in ps], opt.param_groups[1]["lr"]))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-12)


NONFINITE_CASES = [("Adam", {}), ("Adam", dict(amsgrad=True, weight_decay=0.1)), ("AdamW", {}),
                   ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                   ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
                   ("RMSprop", {}), ("RMSprop", dict(momentum=0.9, centered=True)),
                   ("Adagrad", {}), ("Adadelta", {}), ("Adamax", {}), ("NAdam", {}),
                   ("RAdam", {}), ("Rprop", {}), ("ASGD", {})]


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("name,kw", NONFINITE_CASES)
def test_a_nan_gradient_entry_as_torch(name, kw, multi):
    """A NaN gradient entry spreads as in torch. Rprop's sign of it was NaN where torch's
    sign gives 0, so the param stayed NaN for good where torch leaves it and recovers."""
    init = torch.randn(8, generator=torch.Generator().manual_seed(0))
    ps = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [getattr(torch.optim, name)([ps[0]], **kw),
            getattr(fot, name)([ps[1]], multi_tensor=multi, **kw)]
    for s in range(6):
        g = torch.randn(8, generator=torch.Generator().manual_seed(s + 1))
        g[2] = float("nan") if s == 2 else g[2]
        for p, o in zip(ps, opts, strict=True):
            p.grad = g.clone()
            o.step()
        torch.testing.assert_close(ps[1], ps[0], rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m, s=s: f"step {s}: {m}")
    if name == "Rprop":
        assert bool(ps[1][2].isfinite())


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("name,kw", [*NONFINITE_CASES, ("AdamW", dict(weight_decay=0.1)),
                                     ("NAdam", dict(weight_decay=0.1,
                                                    decoupled_weight_decay=True)),
                                     ("RAdam", dict(weight_decay=0.1,
                                                    decoupled_weight_decay=True))])
def test_an_inf_param_as_torch(name, kw, multi):
    """An inf param (a learnable mask's -inf) stays as torch leaves it. The CPU kernels
    added weight_decay * p at weight decay 0 and with decoupled decay too, where torch adds
    no term, and 0 * inf made the param NaN at its first step (the kernels now compile no
    term where there is none: fastopt.engine.l2_term)."""
    init = torch.randn(8, generator=torch.Generator().manual_seed(0))
    init[3], init[5] = float("-inf"), float("inf")
    ps = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [getattr(torch.optim, name)([ps[0]], **kw),
            getattr(fot, name)([ps[1]], multi_tensor=multi, **kw)]
    for s in range(4):
        g = torch.randn(8, generator=torch.Generator().manual_seed(s + 1))
        for p, o in zip(ps, opts, strict=True):
            p.grad = g.clone()
            o.step()
        torch.testing.assert_close(ps[1], ps[0], rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m, s=s: f"step {s}: {m}")
    if not kw.get("weight_decay") or kw.get("decoupled_weight_decay") or name == "AdamW":
        assert ps[1][3] == float("-inf") or name in ("ASGD",), ps[1]
