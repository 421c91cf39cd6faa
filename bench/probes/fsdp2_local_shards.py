"""Probe for FSDP2 support (issue "Past one device", part 2): 2 gloo processes, a 3-layer MLP
under ``fully_shard``; each DTensor param's local shard (``to_local()``, a numpy view) is
stepped in place by ``fastopt.functional.adamw`` with its state as plain local arrays, and
the gathered params are compared with ``torch.optim.AdamW`` under the same setup.

    python bench/probes/fsdp2_local_shards.py
"""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, LR = 10, 1e-2


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def sharded() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    m = model()
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    return m


def fastopt_step(params, states: dict, step: int) -> None:
    import fastopt.functional as F

    with torch.no_grad():
        for p in params:
            local = p.to_local()
            if local.numel() == 0:
                continue
            m, v = states.setdefault(id(p), (np.zeros(local.numel(), np.float32),
                                             np.zeros(local.numel(), np.float32)))
            F.adamw(local.reshape(-1).numpy(), p.grad.to_local().reshape(-1).numpy(), m, v,
                    step=step, lr=LR)
            p.grad = None


def worker(rank: int, world: int, port: int, out) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for kind in ("torch", "fastopt"):
        m = sharded()
        params = list(m.parameters())
        opt = torch.optim.AdamW(params, lr=LR) if kind == "torch" else None
        states: dict = {}
        torch.manual_seed(1 + rank)
        for step in range(1, STEPS + 1):
            m(torch.randn(8, 16)).square().mean().backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
            else:
                fastopt_step(params, states, step)
        results[kind] = [p.full_tensor().detach().clone() for p in params]
        if rank == 0:
            p = params[0]
            print(f"{kind}: {type(p).__name__} {p.placements}, local shard "
                  f"{tuple(p.to_local().shape)}, contiguous {p.to_local().is_contiguous()}",
                  flush=True)
    if rank == 0:
        out.put(max(float((a - b).abs().max() / b.abs().max())
                    for a, b in zip(results["torch"], results["fastopt"], strict=True)))
    dist.destroy_process_group()


def main() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, 29517, queue)) for r in range(2)]
    for p in procs:
        p.start()
    print("max relative difference, fastopt vs torch.optim:", queue.get(timeout=300))
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
