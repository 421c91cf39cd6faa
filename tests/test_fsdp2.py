"""fastopt.torch on FSDP2 (``fully_shard``, DTensor params): 2 gloo processes, every case in
one spawn (a spawn costs seconds). Each process steps its local shards in place; the state is
DTensors placed as the params, so torch.distributed.checkpoint saves and loads it sharded.

The cases, each compared across the two processes' gathered (full) tensors:
- AdamW with an in-kernel schedule and ``clip_grad_norm_`` equals ``torch.optim.AdamW`` given
  the same lr per step, for 20 steps (the model has a param whose shard on one process is
  empty);
- the full optimizer state dict (``get_optimizer_state_dict(full_state_dict=True)``) holds
  torch's values under torch's names;
- a DCP save after 10 steps, loaded into a fresh model and optimizer, resumes bit for bit,
  and so does a resume through full (unsharded) state dicts;
- ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``: fastopt equals torch.optim;
- bfloat16 sharded params with each ``master_weights``: the master is a DTensor where there is
  one, and the run equals the same optimizer without FSDP on the same gradients ("none":
  close to it, its rounding bits being numbered per shard);
- tensor-aware optimizers (Adafactor, LAMB, Muon), int8 state, CPUOffload and
  step_in_backward refuse DTensor params with a clear error;
- a local gradient that shares memory with the local params (read in place otherwise) is
  copied first: the step uses the gradient as it was, as if it were a separate tensor.
"""

import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt
import fastopt.torch as fot
from fastopt.schedules import host_lr

STEPS, LR, CLIP = 20, 1e-2, 0.5

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _model():
    torch.manual_seed(0)
    # 33 rows shard 17/16; the last layer's weight (1, 33) and bias (1,) leave process 1 an
    # empty shard
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 9),
                               torch.nn.Tanh(), torch.nn.Linear(9, 1))


def _sharded(mp_policy=None, dtype=None):
    from torch.distributed.fsdp import fully_shard

    m = _model()
    if dtype is not None:
        m = m.to(dtype)
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(m, **kwargs)
    return m


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g)


SCHEDULE = fastopt.schedules.warmup(fastopt.schedules.cosine(LR, STEPS), 5)


def _train(m, opt, first, stop, *, scheduled_lr=False, dtype=None, set_to_none=True):
    """Steps [first, stop): a batch per process, clip_grad_norm_, step. ``scheduled_lr``:
    torch.optim, given the schedule's lr for each step."""
    rank = dist.get_rank()
    for step in range(first, stop):
        x = _batch(step, rank)
        if dtype is not None:
            x = x.to(dtype)
        m(x).float().square().mean().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        if scheduled_lr:
            for group in opt.param_groups:
                group["lr"] = host_lr(SCHEDULE, step)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


def _full(m):
    return [p.full_tensor().detach().float().clone() for p in m.parameters()]


def _close(a, b, rtol, what):
    for x, y in zip(a, b, strict=True):
        scale = float(y.abs().max()) or 1.0
        diff = float((x - y).abs().max()) / scale
        if diff > rtol:
            raise AssertionError(f"{what}: relative difference {diff:.3g} > {rtol}")


def _check_against_torch(out):
    """Case 1 and 2: fastopt with its schedule vs torch.optim with the same lr per step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    runs = {}
    for kind in ("torch", "fastopt"):
        m = _sharded()
        if kind == "torch":
            opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.1)
        else:
            opt = fot.AdamW(m.parameters(), lr=SCHEDULE, weight_decay=0.1)
        _train(m, opt, 0, STEPS, scheduled_lr=kind == "torch")
        full = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
        runs[kind] = (_full(m), full)
        if kind == "fastopt":
            p = next(m.parameters())
            st = opt.state[p]
            assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].placements == \
                p.placements and st["exp_avg"].shape == p.shape, "state not a DTensor like p"
            assert not isinstance(st["step"], DTensor) and float(st["step"]) == STEPS
            # the state DTensor shares the storage the kernel writes
            local = st["exp_avg"].to_local()
            flat = opt._buckets[0][0].state["exp_avg"]
            assert local.data_ptr() == flat.data_ptr(), "state DTensor is a copy"
            assert abs(opt.param_groups[0]["lr"] - host_lr(SCHEDULE, STEPS)) < 1e-12
            # the gradients are read from their shards: no buffer of fastopt's for them
            assert "grads" not in opt.memory_report()
    _close(runs["fastopt"][0], runs["torch"][0], 1e-5, "params vs torch.optim")
    ours, theirs = runs["fastopt"][1], runs["torch"][1]
    assert ours["state"].keys() == theirs["state"].keys()
    for name, st in theirs["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            a, b = ours["state"][name][key], st[key]
            assert not isinstance(a, DTensor), "full state dict holds DTensors"
            _close([a.float()], [b.float()], 1e-4, f"full state {name}.{key}")
    out["torch"] = True


def _check_resume(out, tmp):
    """Case 3: a DCP save after 10 steps resumes bit for bit in a fresh model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make():
        m = _sharded()
        return m, fot.AdamW(m.parameters(), lr=SCHEDULE, weight_decay=0.1,
                            state_dtype="bfloat16")

    m, opt = make()
    _train(m, opt, 0, STEPS)
    straight = _full(m)
    m, opt = make()
    _train(m, opt, 0, STEPS // 2)
    model_sd, optim_sd = get_state_dict(m, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    del m, opt
    m, opt = make()
    model_sd, optim_sd = get_state_dict(m, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=tmp)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    p = next(m.parameters())
    assert float(opt.state[p]["step"]) == STEPS // 2
    assert abs(opt.param_groups[0]["lr"] - host_lr(SCHEDULE, STEPS // 2)) < 1e-12
    _train(m, opt, STEPS // 2, STEPS)
    resumed = _full(m)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b), f"resumed run differs by {float((a - b).abs().max()):.3g}"
    # the same through full (unsharded) state dicts, without DCP's files
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full = StateDictOptions(full_state_dict=True)
    m, opt = make()
    _train(m, opt, 0, STEPS // 2)
    model_sd, optim_sd = get_state_dict(m, opt, options=full)
    m, opt = make()
    set_state_dict(m, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=full)
    _train(m, opt, STEPS // 2, STEPS)
    for a, b in zip(_full(m), straight, strict=True):
        assert torch.equal(a, b), f"full-dict resume differs by {float((a - b).abs().max()):.3g}"
    out["resume"] = True


def _check_mixed_precision(out):
    """Case 4: MixedPrecisionPolicy(param_dtype=bfloat16): fastopt equals torch.optim
    (gradients zeroed in place between steps: zero_grad(set_to_none=False))."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    runs = {}
    for kind in ("torch", "fastopt"):
        m = _sharded(policy)
        assert next(m.parameters()).dtype == torch.float32
        opt = torch.optim.AdamW(m.parameters(), lr=LR) if kind == "torch" \
            else fot.AdamW(m.parameters(), lr=LR)
        _train(m, opt, 0, 10, set_to_none=False)
        runs[kind] = _full(m)
    _close(runs["fastopt"], runs["torch"], 1e-5, "mixed precision vs torch.optim")
    out["mixed"] = True


def _check_half_params(out):
    """Case 5: bfloat16 DTensor params with each master mode: the master is a DTensor where
    there is one; the params equal those of the same optimizer stepping the gathered params
    on the gathered gradients (without FSDP: the kernel is elementwise; "none" rounds with
    bits drawn per element index, which differ between a shard and the whole)."""
    from torch.distributed.tensor import DTensor

    for mode in ("fp32", "remainder", "none"):
        m = _sharded(dtype=torch.bfloat16)
        params = list(m.parameters())
        opt = fot.AdamW(params, lr=LR, master_weights=mode)
        twin_params = [torch.nn.Parameter(p.full_tensor().detach().clone()) for p in params]
        twin = fot.AdamW(twin_params, lr=LR, master_weights=mode)
        for step in range(5):
            m(_batch(step, dist.get_rank()).to(torch.bfloat16)).float().square().mean() \
                .backward()
            for p, q in zip(params, twin_params, strict=True):
                q.grad = p.grad.full_tensor()
            opt.step()
            twin.step()
            opt.zero_grad()
            twin.zero_grad()
        if mode == "none":  # (its bits are numbered per shard: close, not equal)
            for p, q in zip(params, twin_params, strict=True):
                torch.testing.assert_close(p.full_tensor().float(), q.detach().float(),
                                           rtol=0.02, atol=1e-3)
            assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
            continue
        key = "master_param" if mode == "fp32" else "master_remainder"
        assert isinstance(opt.state[params[0]][key], DTensor)
        for p, q in zip(params, twin_params, strict=True):
            assert torch.equal(p.full_tensor(), q.detach()), f"{mode}: differs from unsharded"
        if mode == "remainder":  # the state dict's master: a DTensor, the twin's values
            master = opt.state_dict()["state"][0]["master_param"]
            assert isinstance(master, DTensor)
            assert torch.equal(master.full_tensor(),
                               twin.state_dict()["state"][0]["master_param"])
    out["half"] = True


def _check_refusals(out):
    m = _sharded()
    weights = [layer.weight for layer in m if isinstance(layer, torch.nn.Linear)]
    for make, words in ((lambda: fot.Adafactor(m.parameters()), "tensor-aware"),
                        (lambda: fot.LAMB(m.parameters()), "tensor-aware"),
                        (lambda: fot.Muon(weights), "tensor-aware"),
                        (lambda: fot.AdamW(m.parameters(), state_dtype="int8"), "int8"),
                        (lambda: fot.CPUOffload(m.parameters(), "AdamW"), "DTensor")):
        try:
            make()
        except ValueError as e:
            assert words in str(e) and "DTensor" in str(e), str(e)
        else:
            raise AssertionError(f"no error for {words}")
    opt = fot.AdamW(m.parameters())
    try:
        fot.step_in_backward(m, opt)
    except ValueError as e:
        assert "DTensor" in str(e)
    else:
        raise AssertionError("step_in_backward accepted DTensor params")
    out["refusals"] = True


def _check_grad_sharing_params(out):
    """The kernels assume their arrays do not overlap (their arguments are noalias): a local
    gradient that overlaps the params one element apart must not be read in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(5)
    n, lr = 2000, 0.5  # (1000 a shard: the serial loop)
    p = torch.nn.Parameter(distribute_tensor(torch.randn(n), mesh, [Shard(0)]))
    opt = fot.SGD([p], lr=lr)
    p.grad = distribute_tensor(torch.randn(n), mesh, [Shard(0)])
    opt.step()
    local = p.to_local().numel()
    memory = torch.randn(local + 1)
    before = memory.clone()
    with torch.no_grad():  # the local params are memory[1:], the local grads memory[:-1]
        p._local_tensor.set_(memory.untyped_storage(), 1, (local,), (1,))
    p.grad = DTensor.from_local(memory[:-1], mesh, [Shard(0)], run_check=False)
    opt.step()
    want = before[1:] - lr * before[:-1]
    assert torch.equal(memory[1:], want), (memory[1:6], want[:5])
    out["grad sharing params"] = True


def _worker(rank, world, port, tmp, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    out = {}
    try:
        for case in (_check_against_torch, lambda o: _check_resume(o, tmp),
                     _check_mixed_precision, _check_half_params, _check_refusals,
                     _check_grad_sharing_params):
            try:
                case(out)
            except Exception:
                out.setdefault("errors", []).append(traceback.format_exc())
        torch.save(out, f"{out_path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # (see test_torch_distributed: gloo's threads can abort interpreter teardown)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    world = 2
    out_path = str(tmp_path / "out")
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path / "ckpt"), out_path),
                       nprocs=world, join=True, start_method="spawn")
    for rank in range(world):
        out = torch.load(f"{out_path}.{rank}")
        assert not out.get("errors"), f"rank {rank}:\n" + "\n".join(out["errors"])
        assert out == {"torch": True, "resume": True, "mixed": True, "half": True,
                       "refusals": True, "grad sharing params": True}
