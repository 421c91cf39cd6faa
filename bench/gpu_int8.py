"""int8 state on a GPU: fastopt AdamW with state_dtype="int8" against a copy of its 16 B/param,
fastopt's float32 state and torch fused AdamW, at 1e8 params and on GPT-2 small's tensors
(CUDA-event medians, the implementations taking turns; bench/gpu_check.py's timer).

    python bench/gpu_int8.py [--size 1e8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import _copy, _torch_adamw, _torch_steps, time_interleaved  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=float, default=1e8)
    args = parser.parse_args()
    import cupy

    import fastopt
    from fastopt import FlatBuffer, schedules
    from fastopt.benchmark import load_shapes

    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    _, shapes = load_shapes("gpt2_small")
    for label, layout in ((f"{args.size:.3g}", [(int(args.size),)]), ("gpt2_small", shapes)):
        params = FlatBuffer.empty(layout, xp=cupy)
        params.buffer[...] = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
        g = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
        n = params.buffer.size
        full = fastopt.AdamW(params.buffer.copy(), lr=sched)
        small = fastopt.AdamW(params.buffer.copy(), lr=sched, state_dtype="int8")
        out = {"fastopt fp32 state": lambda o=full, g=g: o.step(g),
               "fastopt int8 state": lambda o=small, g=g: o.step(g),
               "copy of 16 B/param": _copy(16 * n), "copy of 28 B/param": _copy(28 * n)}

        def torch_fused(layout=layout):
            import torch

            return _torch_adamw([torch.randn(s, device="cuda") for s in layout])[0]

        _torch_steps(out, {"torch fused AdamW": torch_fused})
        times = time_interleaved(out)
        print(f"| {label} | " + " | ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()
                                           if isinstance(v, float)) + " |")
        ours = times["fastopt int8 state"]
        fused = times.get("torch fused AdamW", float("nan"))
        print(f"  int8: {times['copy of 16 B/param'] / ours:.0%} of its copy; "
              f"{fused / ours:.2f}x torch fused", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
