"""Probe for fastopt.torch's multi-tensor mode on the CPU (issue "Past one device", part 1):
AdamW over GPT-2 small's 148 tensors in the flat mode and the multi-tensor mode, in one
process, rounds in a shuffled order, each step also split into its kernels' time (the
``run_once`` calls) and the rest (Python bookkeeping). ``--own-buffers`` adds the
multi-tensor mode with each bucket's gradient and state as buffers of their own (4 KB
pages) instead of pieces of the optimizer's ``_Arena``. Run it from a checkout or worktree
(PYTHONPATH) to compare revisions.

    python bench/probes/multitensor_torch.py [--own-buffers] [--rounds 12] [--seed 0]
"""

import argparse
import random
import statistics
import time

import fastopt.torch  # noqa: F401  (the classes' module, before _base is patched)
from fastopt import schedules
from fastopt.benchmark import Problem, fastopt_torch_setup, load_shapes
from fastopt.torch import _base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--own-buffers", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, shapes = load_shapes("gpt2_small")
    problem = Problem(shapes, seed=len(shapes))
    sched = schedules.cosine(1e-3, 10_000, end_lr=1e-5)

    def setup(multi: bool, own: bool = False):
        arena = getattr(_base, "_Arena", None)
        real = arena.take if arena is not None else None
        if own and arena is not None:  # (each buffer its own torch allocation, as before)
            arena.take = lambda self, size, fill, dtype: _base._buffer(size, fill, dtype, "cpu")
        try:
            return fastopt_torch_setup("adamw", problem.params.views, problem.grads.views,
                                       sched, multi)[0]
        finally:
            if real is not None:
                arena.take = real

    steps = {"flat": setup(False), "multi-tensor": setup(True)}
    if args.own_buffers:
        steps["multi-tensor, own buffers"] = setup(True, own=True)
    kernel = [0.0]
    run_once = _base.run_once

    def timed(*a):
        t0 = time.perf_counter()
        out = run_once(*a)
        kernel[0] += time.perf_counter() - t0
        return out

    _base.run_once = timed
    for step in steps.values():
        step()
        step()
    total = {k: [] for k in steps}
    inside = {k: [] for k in steps}
    order = random.Random(args.seed)
    for _ in range(args.rounds):
        labels = list(steps)
        order.shuffle(labels)
        for label in labels:
            kernel[0] = 0.0
            t0 = time.perf_counter()
            steps[label]()
            total[label].append(time.perf_counter() - t0)
            inside[label].append(kernel[0])
    flat = statistics.median(total["flat"])
    print(f"{len(shapes)} tensors, {args.rounds} rounds, medians (ms)")
    for label in steps:
        t, k = statistics.median(total[label]), statistics.median(inside[label])
        print(f"{label:28s} step {1e3 * t:7.2f}  kernels {1e3 * k:7.2f}  rest "
              f"{1e3 * (t - k):5.2f}  flat / this {flat / t:.3f}")


if __name__ == "__main__":
    main()
