"""One call on a lent GPU: the gpu tests, then AdamW timings vs a same-bytes copy and torch.

    python bench/gpu_check.py [--size 1e8] [--report gpu_report.md]

Writes a markdown report (card name, date, test summary, ratios measured in this one run).
Ratios only: fastopt vs a device-to-device copy moving the same 28 B/param, and vs torch's fused
CUDA AdamW (with its CosineAnnealingLR stepped, as a torch loop does) on the same parameters.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gpu_time(fn, repeat: int = 50) -> float:
    """Median seconds per call, measured with CUDA events on the current stream."""
    import cupy

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    times.sort()
    return times[len(times) // 2]


def timings(n: int) -> dict:
    import cupy

    import fastopt
    from fastopt import schedules

    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    g = cupy.random.standard_normal(n, dtype=cupy.float32)
    opt = fastopt.AdamW(p, lr=sched)
    out = {"fastopt": gpu_time(lambda: opt.step(g))}
    src = cupy.empty(n * 7 // 2, dtype=cupy.float32)  # 14 B/param read + 14 B/param written
    dst = cupy.empty_like(src)
    out["copy-28B"] = gpu_time(lambda: cupy.copyto(dst, src))
    try:
        import torch

        tp = torch.nn.Parameter(torch.randn(n, device="cuda"))
        tp.grad = torch.randn(n, device="cuda")
        topt = torch.optim.AdamW([tp], lr=1e-3, fused=True)
        tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, 10_000)

        def torch_step():
            topt.step()
            tsched.step()

        out["torch-fused"] = gpu_time(torch_step)
    except Exception as exc:  # torch without CUDA: report, keep the rest
        out["torch-fused-error"] = repr(exc)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=float, default=1e8)
    parser.add_argument("--report", default="gpu_report.md")
    args = parser.parse_args()
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                            str(ROOT / "tests" / "test_gpu.py")], capture_output=True, text=True,
                           cwd=ROOT)
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr
    n = int(args.size)
    t = timings(n)
    lines = [f"# GPU check: {card}", "", f"{time.strftime('%Y-%m-%d %H:%M')}; {n:.3g} params, "
             "fp32 AdamW + warmup-cosine", "", f"gpu tests: `{summary}`", "",
             "| implementation | ms | fastopt speedup |", "|---|---|---|"]
    for k, v in t.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v * 1e3:.3f} | {v / t['fastopt']:.2f}x |")
        else:
            lines.append(f"| {k} | {v} | |")
    lines.append(f"\nfastopt = {100 * t['copy-28B'] / t['fastopt']:.0f}% of the same-bytes copy")
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if tests.returncode != 0:
        print(tests.stdout[-5000:], tests.stderr[-3000:])
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
