"""fastopt.torch against torch's own optimizer test database (``optim_db`` in
torch/testing/_internal/common_optimizers.py, shipped in the wheel): every CPU config of each
optimizer fastopt has is stepped side by side with torch and compared after every step; every
CPU error input must raise the same kind of error; and the behaviours torch's test_optim.py
checks (state-dict round trips, hooks, param groups, LR schedulers, zero_grad, deepcopy and
pickling, steps on zero gradients, printing) hold for each of them.

Muon's configs run on models without biases (torch's Muon takes matrices only). Out of scope,
skipped with the reason: optimizers fastopt does not have (LBFGS, SparseAdam, Adafactor),
complex params, ``differentiable=True``, and error inputs that exist
only because of torch's foreach/capturable implementations (a tensor lr or tensor betas with
``foreach=True``): fastopt accepts and ignores ``foreach`` and ``fused``, and its one kernel
has no such limit.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest

torch = pytest.importorskip("torch")
common = pytest.importorskip("torch.testing._internal.common_optimizers",
                             reason="torch's optimizer test database needs expecttest")
import fastopt.torch as fot  # noqa: E402

OptimizerErrorEnum = common.OptimizerErrorEnum
INFOS = {info.optim_cls.__name__: info for info in common.optim_db
         if hasattr(fot, info.optim_cls.__name__)}
OUT_OF_SCOPE = sorted(info.optim_cls.__name__ for info in common.optim_db
                      if info.optim_cls.__name__ not in INFOS)
CONFIGS = [(name, i) for name, info in INFOS.items()
           for i in range(len(info.optim_inputs_func("cpu", torch.float32)))]
ERRORS = [(name, i) for name, info in INFOS.items()
          for i in range(len(info.optim_error_inputs_func("cpu", torch.float32)))]
#: error inputs of torch's foreach/capturable implementations only
IMPLEMENTATION_ONLY = ("is not supported for capturable=False and foreach=True",)


def _config(name: str, index: int):
    return INFOS[name].optim_inputs_func("cpu", torch.float32)[index]


def _model(seed: int = 0, name: str = "") -> torch.nn.Module:
    """A small MLP; without biases for an optimizer of matrices only (Muon), as torch's own
    tests give it."""
    torch.manual_seed(seed)
    bias = not (name and getattr(fot, name).definition.matrix is not None)
    return torch.nn.Sequential(torch.nn.Linear(6, 5, bias=bias), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3, bias=bias))


def _copy_kwargs(kwargs: dict) -> dict:
    """Each optimizer its own tensors (a tensor lr is read, and may be changed, in place)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else
            tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in v)
            if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _pair(name: str, kwargs: dict, seed: int = 0):
    ref, ours = _model(seed, name), _model(seed, name)
    return (ref, INFOS[name].optim_cls(ref.parameters(), **_copy_kwargs(kwargs)),
            ours, getattr(fot, name)(ours.parameters(), **_copy_kwargs(kwargs)))


def _step(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _assert_close(ours, ref, rel=1e-5):
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        scale = max(float(q.detach().abs().max()), 1e-12)
        assert float((p.detach() - q.detach()).abs().max()) <= rel * scale


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen))
            for _ in range(n)]


def test_what_is_out_of_scope_is_what_fastopt_lacks():
    assert set(OUT_OF_SCOPE) <= {"LBFGS", "SparseAdam", "Adafactor"}, OUT_OF_SCOPE
    assert len(INFOS) >= 12


@pytest.mark.parametrize("name,index", CONFIGS,
                         ids=[f"{n}-{_config(n, i).desc}" for n, i in CONFIGS])
def test_every_config_steps_like_torch(name, index):
    config = _config(name, index)
    if config.kwargs.get("differentiable"):
        pytest.skip("differentiable=True is out of scope for fused kernels")
    assert config.params is None  # (the CPU configs leave the params to the test)
    ref, topt, ours, opt = _pair(name, config.kwargs)
    for x, y in _batches(20):
        _step(ref, topt, x, y)
        _step(ours, opt, x, y)
        _assert_close(ours, ref)


@pytest.mark.parametrize("name,index", ERRORS, ids=[f"{n}-{i}" for n, i in ERRORS])
def test_every_error_input_raises_like_torch(name, index):
    error = INFOS[name].optim_error_inputs_func("cpu", torch.float32)[index]
    if any(text in error.error_regex for text in IMPLEMENTATION_ONLY):
        pytest.skip("an error of torch's foreach implementation: fastopt ignores foreach and "
                    "its kernel takes tensor lr and betas")
    given = error.optimizer_error_input
    if any(isinstance(p, torch.Tensor) and p.is_complex() for p in given.params or ()):
        pytest.skip("complex params are out of scope: fastopt refuses them at construction "
                    "(TypeError) for every optimizer")
    params = given.params if given.params is not None else _model(name=name).parameters()
    cls = getattr(fot, name)

    def attempt():
        opt = cls(params, **given.kwargs)
        if error.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            attempt()
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            attempt()


NAMES = sorted(INFOS)


def _main_kwargs(name: str) -> dict:
    """The richest CPU config of the optimizer (the last one), minus tensor lr."""
    kwargs = dict(_config(name, len(INFOS[name].optim_inputs_func("cpu", torch.float32)) - 1)
                  .kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs["lr"] = float(kwargs["lr"])
    return kwargs


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_like_an_uninterrupted_run(name):
    kwargs = _main_kwargs(name)
    batches = _batches(12)
    straight = _model(name=name)
    opt = getattr(fot, name)(straight.parameters(), **kwargs)
    for x, y in batches:
        _step(straight, opt, x, y)
    first = _model(name=name)
    a = getattr(fot, name)(first.parameters(), **kwargs)
    for x, y in batches[:5]:
        _step(first, a, x, y)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": a.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    second = _model(3, name)
    second.load_state_dict(loaded["model"])
    b = getattr(fot, name)(second.parameters(), **kwargs)
    b.load_state_dict(loaded["optim"])
    for x, y in batches[5:]:
        _step(second, b, x, y)
    for p, q in zip(second.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_hooks_run_like_torch(name):
    """Step pre/post hooks, state-dict pre/post hooks and load pre/post hooks: called as in
    torch, in order, with what torch passes."""
    calls = {}
    for which in ("torch", "fastopt"):
        model = _model(name=name)
        cls = INFOS[name].optim_cls if which == "torch" else getattr(fot, name)
        opt = cls(model.parameters(), **_main_kwargs(name))
        log = calls[which] = []
        opt.register_step_pre_hook(lambda o, a, k, log=log: log.append("step-pre"))
        opt.register_step_post_hook(lambda o, a, k, log=log: log.append("step-post"))
        opt.register_state_dict_pre_hook(lambda o, log=log: log.append("sd-pre"))
        opt.register_state_dict_post_hook(
            lambda o, sd, log=log: log.append(("sd-post", sorted(sd))))
        opt.register_load_state_dict_pre_hook(lambda o, sd, log=log: log.append("load-pre"))
        opt.register_load_state_dict_post_hook(lambda o, log=log: log.append("load-post"))
        x, y = _batches(1)[0]
        _step(model, opt, x, y)
        opt.load_state_dict(opt.state_dict())
    assert calls["fastopt"] == calls["torch"]


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_and_an_lr_scheduler_like_torch(name):
    kwargs = _main_kwargs(name)
    lr = kwargs.pop("lr", None) or INFOS[name].optim_cls.__init__.__defaults__[0]
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    opts = []
    models = [_model(name=name), _model(name=name)]
    for model, cls in zip(models, (INFOS[name].optim_cls, getattr(fot, name)), strict=True):
        first, last = model[0], model[2]
        opts.append(cls([{"params": first.parameters()},
                         {"params": last.parameters(), "lr": lr * 0.5}], lr=lr, **kwargs))
    scheds = [torch.optim.lr_scheduler.StepLR(o, 4, 0.5) for o in opts]
    for x, y in _batches(14):
        for model, opt, sched in zip(models, opts, scheds, strict=True):
            _step(model, opt, x, y)
            sched.step()
        _assert_close(models[1], models[0])
    assert [g["lr"] for g in opts[1].param_groups] == [g["lr"] for g in opts[0].param_groups]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_like_torch(name, set_to_none):
    ref, topt, ours, opt = _pair(name, _main_kwargs(name))
    for x, y in _batches(3):
        for model, o in ((ref, topt), (ours, opt)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
            o.zero_grad(set_to_none=set_to_none)
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                assert not p.grad.any()
    _assert_close(ours, ref)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_copy_an_independent_optimizer(name):
    kwargs = _main_kwargs(name)
    model = _model(name=name)
    opt = getattr(fot, name)(model.parameters(), **kwargs)
    batches = _batches(8)
    for x, y in batches[:3]:
        _step(model, opt, x, y)
    twin_model = copy.deepcopy(model)
    for make in (lambda: copy.deepcopy(opt), lambda: pickle.loads(pickle.dumps(opt))):
        copied = make()
        assert copied.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # a deepcopy of model and optimizer together trains on like the original
    both = copy.deepcopy({"model": model, "opt": opt})
    for x, y in batches[3:]:
        _step(model, opt, x, y)
        _step(both["model"], both["opt"], x, y)
    for p, q in zip(both["model"].parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert any((p != q).any() for p, q in zip(model.parameters(), twin_model.parameters(),
                                              strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_steps_on_zero_gradients_like_torch(name):
    """Zero gradients: exactly torch's result (a no-op where torch's is one: every optimizer
    without weight decay except ASGD, whose lambd shrinks the params)."""
    kwargs = {k: v for k, v in _main_kwargs(name).items() if k != "weight_decay"}
    if name in ("AdamW", "Muon"):  # (their default weight decay is not 0)
        kwargs["weight_decay"] = 0.0
    ref, topt, ours, opt = _pair(name, kwargs)
    before = [p.detach().clone() for p in ours.parameters()]
    for _ in range(3):
        for model, o in ((ref, topt), (ours, opt)):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            o.step()
    _assert_close(ours, ref)
    unchanged = all(torch.equal(p, b) for p, b in zip(ref.parameters(), before, strict=True))
    assert unchanged == all(torch.equal(p, b) for p, b in zip(ours.parameters(), before,
                                                                strict=True))
    assert unchanged or name == "ASGD"


@pytest.mark.parametrize("name", NAMES)
def test_printing_like_torch(name):
    ref, topt, ours, opt = _pair(name, _main_kwargs(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repr(opt) == repr(topt)
