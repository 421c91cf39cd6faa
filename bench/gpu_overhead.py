"""Per-step host overhead on a lent GPU: where small steps spend their time.

    python bench/gpu_overhead.py [--steps 300]

At sizes where the kernel takes microseconds, a step's cost is the host's: Python, checks,
CuPy/torch launches. This times ``steps`` back-to-back steps by wall clock (synchronised once
at the end) for ``fastopt.torch.AdamW`` on a small MLP's CUDA params, the core
``fastopt.AdamW`` on one cupy buffer of the same size, and torch fused AdamW on the MLP; then
the same fastopt steps with the per-step lr taken from the numpy reference ``Schedule.at``
(the code before ``host_lr``), and a cProfile of the ``fastopt.torch`` step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(256, 64), (256,), (256, 256), (256,), (10, 256), (10,)]


def per_step(step, steps: int, sync) -> float:
    """Wall-clock seconds per step over ``steps`` steps, after 20 warm-up steps."""
    for _ in range(20):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    import cupy
    import torch

    import fastopt
    import fastopt.functional
    import fastopt.torch as fot
    import fastopt.torch.optim
    from fastopt import schedules

    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    n = sum(math.prod(s) for s in SHAPES)

    def fot_step():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
        opt = fot.AdamW(params, lr=sched)
        for p in params:
            p.grad = torch.randn_like(p)
        return opt.step

    def core_step():
        p = cupy.random.standard_normal(n, dtype=cupy.float32)
        g = cupy.random.standard_normal(n, dtype=cupy.float32)
        opt = fastopt.AdamW(p, lr=sched)
        return lambda: opt.step(g)

    def torch_step():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
        for p in params:
            p.grad = torch.randn_like(p)
        return torch.optim.AdamW(params, lr=1e-3, fused=True).step

    sync = torch.cuda.synchronize
    rows = {"fastopt.torch AdamW": fot_step(), "fastopt AdamW (cupy)": core_step(),
            "torch fused AdamW": torch_step()}
    times = {k: per_step(f, args.steps, sync) for k, f in rows.items()}
    import fastopt.engine
    import fastopt.torch._base

    fast_lr = fastopt.engine.host_lr
    reference_lr = lambda schedule, step: schedule.at(step)  # noqa: E731
    fastopt.torch._base.host_lr = fastopt.engine.host_lr = reference_lr
    for k in ("fastopt.torch AdamW", "fastopt AdamW (cupy)"):
        times[f"{k}, lr from Schedule.at"] = per_step(rows[k], args.steps, sync)
    fastopt.torch._base.host_lr = fastopt.engine.host_lr = fast_lr
    print(f"| implementation ({n} params, {len(SHAPES)} tensors) | µs per step |")
    print("|---|---|")
    for k, t in times.items():
        print(f"| {k} | {t * 1e6:.1f} |")
    profile = cProfile.Profile()
    step = rows["fastopt.torch AdamW"]
    profile.enable()
    for _ in range(args.steps):
        step()
    sync()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
