"""One call on a lent GPU: the gpu tests, then AdamW timings vs a same-bytes copy and torch.

    python bench/gpu_check.py [--size 1e8] [--model gpt2_small] [--report gpu_report.md]

Writes a markdown report (card name, date, test summary, ratios measured in this one run):

- ``fp32 <size>``: one flat buffer; fastopt vs a device-to-device copy moving the same
  28 B/param and vs torch's fused CUDA AdamW (its CosineAnnealingLR stepped, as a torch loop
  does) on one tensor of the same size.
- ``fp32 <model>``: the model's tensor list (bench/shapes) packed by ``FlatBuffer`` on the GPU,
  vs torch fused AdamW over the same tensors as separate CUDA tensors.
- ``bf16 <size>``: bfloat16 params (uint16 bits + ``dtype="bfloat16"``) with fastopt's float32
  master (28 B/param), vs torch fused AdamW on bfloat16 params (bf16 state, no master: 14
  B/param, and updates below half an ulp are lost) and vs torch fused AdamW on a float32
  master followed by a cast to bfloat16 (the master-weights recipe: 28 + 6 B/param).

With the fake CuPy of tests/fake_cupy on PYTHONPATH this runs on a CPU as a smoke test of the
script itself; its timings then mean nothing.
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


def _copy(nbytes: int):
    """A device-to-device copy moving ``nbytes`` in total (half read, half written)."""
    import cupy

    src = cupy.empty(max(1, nbytes // 8), dtype=cupy.float32)
    dst = cupy.empty_like(src)
    return lambda: cupy.copyto(dst, src)


def _torch_adamw(tensors):
    """(step function, params): torch fused AdamW + CosineAnnealingLR over CUDA tensors."""
    import torch

    params = [torch.nn.Parameter(t) for t in tensors]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10_000)

    def step():
        opt.step()
        sched.step()

    return step, params


def _torch_cases(out: dict, cases: dict) -> None:
    """Time each torch case; record the error instead where torch has no CUDA."""
    for name, make in cases.items():
        try:
            out[name] = gpu_time(make())
        except Exception as exc:  # noqa: BLE001  (torch without CUDA: report, keep the rest)
            out[f"{name} error"] = repr(exc)[:200]


def fp32_one_buffer(n: int, sched) -> dict:
    import cupy

    import fastopt

    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    g = cupy.random.standard_normal(n, dtype=cupy.float32)
    opt = fastopt.AdamW(p, lr=sched)
    out = {"fastopt": gpu_time(lambda: opt.step(g)), "copy-same-bytes": gpu_time(_copy(28 * n))}

    def torch_one():
        import torch

        return _torch_adamw([torch.randn(n, device="cuda")])[0]

    _torch_cases(out, {"torch-fused": torch_one})
    return out


def fp32_model(shapes: list, sched) -> dict:
    import cupy

    import fastopt
    from fastopt import FlatBuffer

    params = FlatBuffer.empty(shapes, xp=cupy)
    params.buffer[...] = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
    grads = params.like()
    grads.buffer[...] = cupy.random.standard_normal(grads.buffer.size, dtype=cupy.float32)
    opt = fastopt.AdamW(params, lr=sched)
    n = params.buffer.size
    out = {"fastopt": gpu_time(lambda: opt.step(grads.buffer)),
           "copy-same-bytes": gpu_time(_copy(28 * n))}

    def torch_tensors():
        import torch

        return _torch_adamw([torch.randn(s, device="cuda") for s in shapes])[0]

    _torch_cases(out, {"torch-fused": torch_tensors})
    return out


def bf16_one_buffer(n: int, sched) -> dict:
    import cupy

    import fastopt
    from fastopt import _bf16

    bits = _bf16.encode(cupy.random.standard_normal(n, dtype=cupy.float32), xp=cupy)
    g = _bf16.encode(cupy.random.standard_normal(n, dtype=cupy.float32), xp=cupy)
    opt = fastopt.AdamW(bits, lr=sched, dtype="bfloat16")
    out = {"fastopt": gpu_time(lambda: opt.step(g)), "copy-same-bytes": gpu_time(_copy(28 * n))}

    def torch_bf16():
        import torch

        return _torch_adamw([torch.randn(n, device="cuda", dtype=torch.bfloat16)])[0]

    def torch_master():
        import torch

        step, (master,) = _torch_adamw([torch.randn(n, device="cuda")])
        half = torch.empty(n, device="cuda", dtype=torch.bfloat16)

        def step_and_cast():
            step()
            half.copy_(master.data)

        return step_and_cast

    _torch_cases(out, {"torch-fused-bf16 (14 B)": torch_bf16,
                       "torch-fused-fp32+cast (34 B)": torch_master})
    return out


def report(card: str, summary: str, rows: dict) -> list[str]:
    lines = [f"# GPU check: {card}", "", f"{time.strftime('%Y-%m-%d %H:%M')}; fp32 math, "
             "AdamW + warmup-cosine", "", f"gpu tests: `{summary}`", "",
             "| case | implementation | ms | fastopt speedup |", "|---|---|---|---|"]
    for case, t in rows.items():
        for k, v in t.items():
            if isinstance(v, float):
                lines.append(f"| {case} | {k} | {v * 1e3:.3f} | {v / t['fastopt']:.2f}x |")
            else:
                lines.append(f"| {case} | {k} | {v} | |")
        lines.append(f"| {case} | fastopt % of same-bytes copy | | "
                     f"{100 * t['copy-same-bytes'] / t['fastopt']:.0f}% |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=float, default=1e8)
    parser.add_argument("--model", default="gpt2_small", help="a shape list in bench/shapes")
    parser.add_argument("--report", default="gpu_report.md")
    parser.add_argument("--no-tests", action="store_true", help="timings only")
    args = parser.parse_args()
    import cupy

    from fastopt import schedules
    from fastopt.benchmark import load_shapes

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    tests = None
    summary = "not run"
    if not args.no_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                str(ROOT / "tests" / "test_gpu.py")], capture_output=True,
                               text=True, cwd=ROOT)
        summary = (tests.stdout.strip().splitlines()[-1] if tests.stdout.strip()
                   else tests.stderr[-300:])
    n = int(args.size)
    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    model, shapes = load_shapes(args.model)
    rows = {f"fp32 {n:.3g}": fp32_one_buffer(n, sched),
            f"fp32 {model}": fp32_model(shapes, sched),
            f"bf16 {n:.3g}": bf16_one_buffer(n, sched)}
    lines = report(card, summary, rows)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if tests is not None and tests.returncode != 0:
        print(tests.stdout[-5000:], tests.stderr[-3000:])
        return tests.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
