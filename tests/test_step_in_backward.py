"""fastopt.torch.step_in_backward: the update runs inside backward() chunk by chunk, and the
numbers equal a backward(); step() loop with the same schedule."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as fot  # noqa: E402
from fastopt import schedules as S  # noqa: E402

SCHED = S.warmup(S.cosine(1e-2, 30, end_lr=1e-3), 5)


def _model(dtype=torch.float32, seed=0, bias=True):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 16, bias=bias), torch.nn.Tanh(),
                                torch.nn.Linear(16, 9, bias=bias), torch.nn.Tanh(),
                                torch.nn.Linear(9, 3, bias=bias))
    return model.to(dtype)


def _batches(n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 7, generator=gen).to(dtype), torch.randn(5, 3, generator=gen)
             .to(dtype)) for _ in range(n)]


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


CASES = [("AdamW", {"weight_decay": 0.1}), ("SGD", {"momentum": 0.9, "nesterov": True}),
         ("NAdam", {}), ("Rprop", {}), ("AdamWScheduleFree", {"warmup_steps": 3}),
         ("LAMB", {"weight_decay": 0.01}), ("Muon", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 60, 1 << 22])
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_equals_backward_then_step(name, kw, chunk, dtype):
    lr = 0.01 if name == "Rprop" else SCHED
    bias = name != "Muon"  # (matrices only)
    plain, inside = _model(dtype, bias=bias), _model(dtype, bias=bias)
    a = getattr(fot, name)(plain.parameters(), lr=lr, **kw)
    b = getattr(fot, name)(inside.parameters(), lr=lr, **kw)
    handle = fot.step_in_backward(inside, b, chunk_elements=chunk)
    for opt in (a, b):
        if hasattr(opt, "train"):
            opt.train()
    for x, y in _batches(12, dtype):
        a.zero_grad()
        _loss(plain, x, y).backward()
        a.step()
        _loss(inside, x, y).backward()
        assert all(p.grad is None for p in inside.parameters())  # freed in backward
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]
    sd_a, sd_b = a.state_dict(), b.state_dict()
    for k, st in sd_a["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(sd_b["state"][k][key], v, rtol=0, atol=0)
    handle.remove()  # normal stepping again, from where it was
    for x, y in _batches(3, dtype):
        for model, opt in ((plain, a), (inside, b)):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Adam", "AdamWScheduleFree"])
def test_params_without_gradient_are_skipped_like_step(name):
    """A layer left out of the loss gets no gradient: it does not move, and its state does not
    start, as with step(); the others step at the end of backward. (Schedule-Free: its group
    count goes on for the skipped layers, as in step().)"""
    plain, inside = _model(), _model()
    a = getattr(fot, name)(plain.parameters(), lr=SCHED)
    b = getattr(fot, name)(inside.parameters(), lr=SCHED)
    fot.step_in_backward(inside.parameters(), b, chunk_elements=1 << 22)
    for opt in (a, b):
        if hasattr(opt, "train"):
            opt.train()
    for k, (x, y) in enumerate(_batches(6)):
        for model, opt in ((plain, a), (inside, b)):
            head = model[:2] if k % 2 else model  # odd steps: the last layers get no grad
            out = head(x)
            loss = out.pow(2).mean() if k % 2 else _loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            if opt is a:
                opt.step()
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [len(b.state[p]) for p in inside.parameters()] == \
        [len(a.state[p]) for p in plain.parameters()]


def test_step_and_what_needs_every_gradient_are_refused():
    model = _model()
    opt = fot.AdamW(model.parameters(), lr=SCHED)
    handle = fot.step_in_backward(model, opt)
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="steps inside backward.*do not call step"):
        opt.step()
    with pytest.raises(RuntimeError, match="Gradient accumulation, clipping"):
        opt.step()
    with pytest.raises(RuntimeError, match="already steps in backward"):
        fot.step_in_backward(model, opt)
    with pytest.raises(RuntimeError, match="remove"):
        copy.deepcopy(opt)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    handle.remove()
    opt.step()  # normal again (no gradients: nothing moves)


def test_bad_arguments():
    model = _model()
    opt = fot.Adam(model.parameters())
    with pytest.raises(ValueError, match="chunk_elements"):
        fot.step_in_backward(model, opt, chunk_elements=0)
    with pytest.raises(ValueError, match="the optimizer was built over"):
        fot.step_in_backward(list(model.parameters())[:2], opt)
    with pytest.raises(TypeError, match="fastopt.torch optimizer"):
        fot.step_in_backward(model, torch.optim.Adam(model.parameters()))
    assert opt._in_backward is None


def test_eval_mode_is_refused_in_backward():
    model = _model()
    opt = fot.AdamWScheduleFree(model.parameters())
    fot.step_in_backward(model, opt)
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match="eval mode"):
        _loss(model, x, y).backward()


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom")


def test_a_backward_that_raises_does_not_stop_later_steps():
    """The end-of-backward callback never runs after an exception: the next backward starts
    afresh (params without gradients skipped, lr advancing)."""
    plain, inside = _model(), _model()
    a = fot.Adam(plain.parameters(), lr=SCHED)
    b = fot.Adam(inside.parameters(), lr=SCHED)
    fot.step_in_backward(inside, b, chunk_elements=1)  # a chunk per param
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match="boom"):  # the last layer steps, then it raises
        torch.nn.functional.mse_loss(inside[4](_Boom.apply(inside[:4](x))), y).backward()
    a.zero_grad()
    torch.nn.functional.mse_loss(plain[4](plain[:4](x)), y).backward()
    for p in plain[:4].parameters():  # the plain loop: the last layer's step only
        p.grad = None
    a.step()
    for x, y in _batches(4):  # the first two layers get no gradient
        for model, opt in ((plain, a), (inside, b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model[2:](model[:2](x).detach()), y).backward()
            if opt is a:
                opt.step()
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]


def test_frozen_params_are_skipped():
    plain, inside = _model(), _model()
    for model in (plain, inside):
        model[4].bias.requires_grad_(False)
        model[0].weight.requires_grad_(False)
    a = fot.AdamW(plain.parameters(), lr=SCHED)
    b = fot.AdamW(inside.parameters(), lr=SCHED)
    fot.step_in_backward(inside, b, chunk_elements=1)
    for x, y in _batches(5):
        a.zero_grad()
        _loss(plain, x, y).backward()
        a.step()
        _loss(inside, x, y).backward()
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("multi", [False, True])
def test_params_frozen_at_the_start_and_unfrozen_later_step(multi):
    """A param without requires_grad when step in backward begins, unfrozen later (a head
    trained first): it steps from the backward that gives it a gradient, as step() does (a
    review found it never stepped, its gradient accumulating), also with its chunk's other
    params stepped in backward before; frozen again, it is skipped again."""
    plain, inside = _model(), _model()
    for model in (plain, inside):
        model[0].weight.requires_grad_(False)
        model[4].bias.requires_grad_(False)
    a = fot.AdamW(plain.parameters(), lr=SCHED, multi_tensor=multi)
    b = fot.AdamW(inside.parameters(), lr=SCHED, multi_tensor=multi)
    fot.step_in_backward(inside, b, chunk_elements=1 << 20)
    for k, (x, y) in enumerate(_batches(8)):
        if k in (2, 4):
            for model in (plain, inside):
                model[0].weight.requires_grad_(True)
                model[4].bias.requires_grad_(k == 4)
        if k == 6:
            for model in (plain, inside):
                model[0].weight.requires_grad_(False)
                model[0].weight.grad = None
        a.zero_grad()
        _loss(plain, x, y).backward()
        a.step()
        _loss(inside, x, y).backward()
        assert all(p.grad is None for p in inside.parameters())
    assert not torch.equal(inside[0].weight, _model()[0].weight)
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("multi", [False, True])
def test_state_cleared_between_steps_acts_as_before_step(multi):
    """``opt.state.clear()`` between steps restarts every param's Schedule-Free state while
    the group's count and averaging weights go on, in backward as in step(): each chunk
    takes in the edit before any chunk of the group moves the group's values."""
    plain, inside = _model(), _model()
    kw = dict(lr=SCHED, warmup_steps=3, multi_tensor=multi)
    # (the params listed last layer first: the group shows the first param's values, and
    # its gradient is the first backward makes)
    a = fot.AdamWScheduleFree(list(plain.parameters())[::-1], **kw)
    b = fot.AdamWScheduleFree(list(inside.parameters())[::-1], **kw)
    a.train()
    b.train()
    handle = fot.step_in_backward(inside, b, chunk_elements=60)
    for k, (x, y) in enumerate(_batches(10)):
        if k == 5:
            a.state.clear()
            b.state.clear()
        a.zero_grad()
        _loss(plain, x, y).backward()
        a.step()
        _loss(inside, x, y).backward()
    handle.remove()
    assert b.param_groups[0]["k"] == a.param_groups[0]["k"] == 10
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_channels_last_params_step_in_backward_as_in_step():
    """A channels_last conv and a transposed param keep their layout in the flat buffers;
    the steps inside backward read their gradients in that layout (a row-major read
    mixed the elements up)."""
    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Tanh(),
                                torch.nn.Conv2d(6, 2, 3))
        m.register_parameter("t", torch.nn.Parameter(torch.randn(4, 3).t()))
        return m.to(memory_format=torch.channels_last)

    plain, inside = model(), model()
    a = fot.AdamW(plain.parameters(), lr=SCHED, weight_decay=0.1)
    b = fot.AdamW(inside.parameters(), lr=SCHED, weight_decay=0.1)
    fot.step_in_backward(inside, b, chunk_elements=50)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(2, 3, 8, 8, generator=gen).to(memory_format=torch.channels_last)
        for m in (plain, inside):
            loss = m(x).pow(2).mean() + (m.t * torch.arange(12.).view(3, 4)).sum()
            if m is plain:
                a.zero_grad()
            loss.backward()
        a.step()
    for p, q in zip(inside.parameters(), plain.parameters(), strict=True):
        assert p.stride() == q.stride()
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert inside[0].weight.stride() == (27, 1, 9, 3)


def test_a_gradient_hook_registered_after_it_is_refused():
    """A post-accumulate-grad hook registered before step_in_backward runs before the update
    (it sees, and may change, the gradient), as with step(); one registered after it would
    run after the update on a freed gradient, so backward raises instead of stepping on
    without it. Removing and enabling again puts the step last."""
    def halve(p):
        p.grad.mul_(0.5)

    def run(mode):
        model = _model()
        opt = fot.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if mode == "after":
            handle = fot.step_in_backward(model, opt, chunk_elements=1)
        hooks = [p.register_post_accumulate_grad_hook(halve) for p in model.parameters()]
        if mode == "after":
            with pytest.raises(RuntimeError, match="registered on a parameter after"):
                _loss(model, *_batches(1)[0]).backward()
            handle.remove()
        if mode != "step":
            fot.step_in_backward(model, opt, chunk_elements=1)
        for x, y in _batches(3):
            _loss(model, x, y).backward()
            if mode == "step":
                opt.step()
                opt.zero_grad()
        for hook in hooks:
            hook.remove()
        return model

    reference = run("step")
    for mode in ("before", "after"):
        for p, q in zip(run(mode).parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_reentrant_checkpointing_is_refused_clearly():
    """torch.utils.checkpoint(use_reentrant=True) runs an inner backward as a graph task of
    its own, whose end this mode cannot tell from the outer's: it raised AttributeError from
    inside autograd; now a RuntimeError naming the way out, and later backwards (here with
    use_reentrant=False) step as backward(); step() does."""
    from torch.utils.checkpoint import checkpoint

    def run(step_in_backward, reentrant_first):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        opt = fot.Adam([*a.parameters(), *b.parameters()], lr=1e-2)
        if step_in_backward:
            fot.step_in_backward([*a.parameters(), *b.parameters()], opt)
        if reentrant_first:
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                b(checkpoint(a, torch.randn(3, 4, requires_grad=True),
                             use_reentrant=True)).sum().backward()
        for s in range(3):
            torch.manual_seed(s)
            b(checkpoint(a, torch.randn(3, 4), use_reentrant=False)).sum().backward()
            if not step_in_backward:
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in (*a.parameters(), *b.parameters())]

    run(True, True)  # (raises, then goes on)
    torch.testing.assert_close(run(True, False), run(False, False))


def test_a_model_dropped_without_remove_is_freed():
    """The hooks hold the handle weakly and their chunk by index: a model, its optimizer and
    a handle never removed are freed once dropped (a review found them kept for good: the
    params held their hooks, the hooks the handle, the handle the optimizer and params)."""
    import gc
    import weakref

    refs = []
    for _ in range(3):
        model = _model()
        opt = fot.AdamW(model.parameters(), lr=1e-2)
        fot.step_in_backward(model, opt, chunk_elements=100)
        x, y = _batches(1)[0]
        _loss(model, x, y).backward()
        refs.append(weakref.ref(model[0].weight))
        del model, opt
    gc.collect()
    assert not any(r() is not None for r in refs)


def test_a_step_in_backward_raises_the_versions_like_torchs_hook_recipe():
    """torch's recipe (an optimizer step in a post-accumulate-grad hook) raises the param's
    version, so a retained graph refuses a second backward; so does a step in backward (a
    second backward silently used the new weights)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = fot.SGD([w], lr=0.1)
    handle = fot.step_in_backward([w], opt)
    x = torch.randn(2, 3, requires_grad=True)  # (its gradient needs the saved w)
    loss = (x @ w).pow(2).sum()
    before = w._version
    loss.backward(retain_graph=True)
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    handle.remove()
