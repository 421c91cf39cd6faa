"""Probe for the multi-tensor mode (issue "Past one device", part 1, CPU): AdamW over GPT-2
small's tensors as one kernel call per tensor (each tensor in arrays of its own, as tensors
fastopt does not own would be, with one ``fastopt.engine.Prepared`` each) against
``fastopt.AdamW`` over one FlatBuffer (one call). Medians of 5 interleaved rounds.

    python bench/probes/multitensor_cpu.py
"""

import time

import numpy as np

import fastopt
from fastopt import cpu
from fastopt import schedules as S
from fastopt.algorithms import REGISTRY
from fastopt.benchmark import load_shapes
from fastopt.engine import Prepared


def main() -> None:
    _, shapes = load_shapes("gpt2_small")
    sizes = [int(np.prod(s)) for s in shapes]
    n = sum(sizes)
    rng = np.random.default_rng(0)
    flat = fastopt.FlatBuffer.empty(shapes)
    flat.buffer[...] = rng.standard_normal(n, dtype=np.float32)
    grads = rng.standard_normal(n, dtype=np.float32)
    opt = fastopt.AdamW(flat, lr=S.cosine(1e-3, 10_000))
    hypers = opt._hypers()
    tensors = []
    for size in sizes:
        p = rng.standard_normal(size, dtype=np.float32)
        states = {"exp_avg": np.zeros(size, np.float32),
                  "exp_avg_sq": np.zeros(size, np.float32)}
        prepared = Prepared(REGISTRY["adam"], p, None, states, hypers, "float32", False,
                            parallel=cpu.use_parallel(size), scalars={})
        tensors.append((prepared, rng.standard_normal(size, dtype=np.float32)))
    table = np.ascontiguousarray(opt.schedule.table)
    table.flags.writeable = False
    count = [0]

    def per_tensor() -> None:
        count[0] += 1
        for prepared, g in tensors:
            prepared.cpu(g, table, count[0], 1.0, 1.0)

    def flat_step() -> None:
        opt.step(grads)

    samples: dict[str, list[float]] = {"flat": [], "per-tensor": []}
    for fn in (flat_step, per_tensor):
        fn()
        fn()
    for _ in range(5):
        for label, fn in (("flat", flat_step), ("per-tensor", per_tensor)):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            samples[label].append((time.perf_counter() - t0) / 5)
    flat_ms, tensor_ms = (1e3 * float(np.median(samples[k])) for k in ("flat", "per-tensor"))
    print(f"flat {flat_ms:.2f} ms, per-tensor {tensor_ms:.2f} ms: per-tensor is "
          f"{flat_ms / tensor_ms:.2f}x the flat mode ({len(sizes)} tensors, {n} params, "
          f"{sum(t[0].parallel for t in tensors)} parallel calls)")


if __name__ == "__main__":
    main()
