"""One call on a lent GPU: the gpu tests, then AdamW timings vs a same-bytes copy and torch.

    python bench/gpu_check.py [--size 1e8] [--model gpt2_small] [--report gpu_report.md]

Writes a markdown report (card name, date, test summary, ratios measured in this one run):

- ``fp32 <size>``: one flat buffer; fastopt vs a device-to-device copy moving the same
  28 B/param and vs torch's fused CUDA AdamW (its CosineAnnealingLR stepped, as a torch loop
  does) on one tensor of the same size.
- ``fp32 <model>``: the model's tensor list (bench/shapes) packed by ``FlatBuffer`` on the GPU,
  vs torch fused AdamW over the same tensors as separate CUDA tensors.
- ``bf16 <size>``, ``bf16 <model>``: bfloat16 params (uint16 bits + ``dtype="bfloat16"``)
  with fastopt's float32 master (28 B/param), vs torch fused AdamW on bfloat16 params (bf16
  state, no master: 14 B/param, and updates below half an ulp are lost) and vs torch fused
  AdamW on float32 masters followed by a cast to bfloat16 (the master-weights recipe:
  28 + 6 B/param).
- ``fot <model>``, ``fot mlp``: ``fastopt.torch.AdamW`` on CUDA params (the model's list and
  a small MLP, where host work and launches dominate) vs torch fused AdamW; only where torch
  has CUDA. Also its multi-tensor mode (``multi_tensor=True``: each param stepped in its own
  storage, a launch per param) against its flat mode.
- each case also times fastopt with ``state_dtype="bfloat16"`` (20 B/param).
- ``fp32 <size>`` also times a step with ``max_grad_norm`` and ``skip_if_nonfinite`` (the
  norm, clip coefficient and skip flag computed on the device: one more read of the grads,
  32 B/param) vs a copy of 32 B/param.
- the report is rewritten after each case, so a run cut short keeps the cases it finished.
- ``<Optimizer> <size>`` and ``<Optimizer> <model>`` for every other optimizer in the
  registry (``--optimizers``): fastopt vs a copy moving the optimizer's own bytes per param
  (``fastopt.benchmark.traffic``) on one buffer, and vs torch's CUDA implementations of its
  twin (fused where torch has one, and foreach) or its oracle on the model's tensor list.

With the fake CuPy of tests/fake_cupy on PYTHONPATH this runs on a CPU as a smoke test of the
script itself; its timings then mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gpu_time(fn, repeat: int = 50) -> float:
    """Median seconds per call, measured with CUDA events on the current stream."""
    for _ in range(3):
        fn()
    return _median(_event_times(fn, repeat))


def _event_times(fn, repeat: int) -> list[float]:
    import cupy

    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return times


def _median(times: list[float]) -> float:
    times = sorted(times)
    return times[len(times) // 2]


def time_interleaved(fns: dict, rounds: int = 5, repeat: int = 20) -> dict:
    """Median seconds per call of each callable, the callables taking turns ``rounds`` times so
    that clock and temperature drift falls on all of them alike; strings (errors) pass."""
    calls = {k: f for k, f in fns.items() if callable(f)}
    for f in calls.values():
        f(), f(), f()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            times[k] += _event_times(f, repeat)
    return {k: _median(times[k]) if k in calls else f for k, f in fns.items()}


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


BF16_STATE = "fastopt state_dtype=bfloat16"
INT8_STATE = "fastopt state_dtype=int8"
INT8_COPY = "copy-same-bytes as int8 state (16 B)"
CLIPPED = "fastopt max_grad_norm=1, skip_if_nonfinite"


def _bf16_state_step(params, grads, sched, **kwargs):
    """fastopt AdamW with bfloat16 moments (8 B/param less traffic) on a copy of ``params``."""
    import fastopt

    opt = fastopt.AdamW(params.copy(), lr=sched, state_dtype="bfloat16", **kwargs)
    return lambda: opt.step(grads)


def _int8_state_step(params, grads, sched, **kwargs):
    """fastopt AdamW with int8 moments (16 B/param for float32 params and grads)."""
    import fastopt

    opt = fastopt.AdamW(params.copy(), lr=sched, state_dtype="int8", **kwargs)
    return lambda: opt.step(grads)


#: bfloat16 params (bf16 grads) with int8 AdamW state, by master_weights: "none" is the
#: smallest mode (10 B/param moved), "remainder" keeps the exact master in 2 B more
BF16_MODES = {mode: f"fastopt bf16 params master_weights={mode} int8 state"
              for mode in ("fp32", "remainder", "none")}
NONE_COPY = "copy-same-bytes as bf16 params, no master, int8 state (10 B)"


def _bf16_param_steps(params, out: dict, sched) -> None:
    """fastopt AdamW over bfloat16 copies of ``params`` (as uint16 bits: CuPy has no
    bfloat16) with int8 state, in each master_weights mode, and the copy of the smallest's
    bytes."""
    import cupy

    import fastopt
    from fastopt import _bf16

    bits = _bf16.encode(params, cupy)
    grads = _bf16.encode(cupy.random.standard_normal(params.size, dtype=cupy.float32), cupy)
    for mode, label in BF16_MODES.items():
        opt = fastopt.AdamW(bits.copy(), dtype="bfloat16", lr=sched, state_dtype="int8",
                            master_weights=mode)
        out[label] = functools.partial(opt.step, grads)
    out[NONE_COPY] = _copy(10 * params.size)


def _int8_oracles(shapes: list, out: dict) -> None:
    """bitsandbytes' and torchao's AdamW8bit over the same tensors, where they import."""
    def made(module: str, attr: str):
        def make():
            import importlib

            import torch

            cls = importlib.import_module(module)
            for part in attr.split("."):
                cls = getattr(cls, part)
            params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = cls(params, lr=1e-3)
            return opt.step
        return make

    _torch_steps(out, {"bitsandbytes AdamW8bit": made("bitsandbytes.optim", "AdamW8bit"),
                       "torchao AdamW8bit": made("torchao.optim", "AdamW8bit")})


def grid_sweep(n: int, sched, blocks_per_sm=(1, 2, 4, 8, 16, 32)) -> dict:
    """fastopt fp32 AdamW at ``n`` params with the grid sized for each blocks-per-SM count."""
    import cupy

    import fastopt
    from fastopt.gpu import launch

    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    g = cupy.random.standard_normal(n, dtype=cupy.float32)
    opt = fastopt.AdamW(p, lr=sched)
    default, out = launch.BLOCKS_PER_SM, {}
    try:
        for k in blocks_per_sm:
            launch.BLOCKS_PER_SM = k
            launch._grid.cache_clear()
            out[k] = gpu_time(lambda: opt.step(g))
    finally:
        launch.BLOCKS_PER_SM = default
        launch._grid.cache_clear()
    return out


def _torch_steps(fns: dict, cases: dict) -> None:
    """Add each torch case's step; the error instead where torch has no CUDA."""
    for name, make in cases.items():
        try:
            fns[name] = make()
        except Exception as exc:  # noqa: BLE001  (torch without CUDA: report, keep the rest)
            fns[f"{name} error"] = repr(exc)[:200]


def fp32_one_buffer(n: int, sched) -> dict:
    import cupy

    import fastopt

    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    g = cupy.random.standard_normal(n, dtype=cupy.float32)
    opt = fastopt.AdamW(p, lr=sched)
    out = {"fastopt": lambda: opt.step(g), "copy-same-bytes": _copy(28 * n)}
    out[BF16_STATE] = _bf16_state_step(p, g, sched)
    out[INT8_STATE] = _int8_state_step(p, g, sched)
    out[INT8_COPY] = _copy(16 * n)
    _bf16_param_steps(p, out, sched)
    _int8_oracles([(n,)], out)
    # clipping and skipping on the device (kernels/control.cu): one more read of the grads
    clipped = fastopt.AdamW(p.copy(), lr=sched)
    out[CLIPPED] = lambda: clipped.step(g, max_grad_norm=1.0, skip_if_nonfinite=True)
    out["copy-same-bytes + grads (32 B)"] = _copy(32 * n)

    def torch_one():
        import torch

        return _torch_adamw([torch.randn(n, device="cuda")])[0]

    _torch_steps(out, {"torch-fused": torch_one})
    return time_interleaved(out)


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
    out = {"fastopt": lambda: opt.step(grads.buffer), "copy-same-bytes": _copy(28 * n)}
    out[BF16_STATE] = _bf16_state_step(params.buffer, grads.buffer, sched)
    out[INT8_STATE] = _int8_state_step(params.buffer, grads.buffer, sched)
    out[INT8_COPY] = _copy(16 * n)
    _bf16_param_steps(params.buffer, out, sched)
    _int8_oracles(shapes, out)

    def torch_tensors():
        import torch

        return _torch_adamw([torch.randn(s, device="cuda") for s in shapes])[0]

    _torch_steps(out, {"torch-fused": torch_tensors})
    return time_interleaved(out)


def bf16_params(shapes: list, sched) -> dict:
    """bfloat16 params of these shapes packed in one flat buffer (a float16 ``FlatBuffer``'s
    layout holding bf16 bits: CuPy has no bfloat16) vs torch over the same tensors."""
    import cupy

    import fastopt
    from fastopt import FlatBuffer, _bf16

    packed = FlatBuffer.empty(shapes, dtype=cupy.float16, xp=cupy)
    n = packed.buffer.size
    bits = packed.buffer.view(cupy.uint16)
    bits[...] = _bf16.encode(cupy.random.standard_normal(n, dtype=cupy.float32), xp=cupy)
    g = _bf16.encode(cupy.random.standard_normal(n, dtype=cupy.float32), xp=cupy)
    opt = fastopt.AdamW(bits, lr=sched, dtype="bfloat16")
    out = {"fastopt": lambda: opt.step(g), "copy-same-bytes": _copy(28 * n)}
    out[BF16_STATE] = _bf16_state_step(bits, g, sched, dtype="bfloat16")

    def torch_bf16():
        import torch

        return _torch_adamw([torch.randn(s, device="cuda", dtype=torch.bfloat16)
                             for s in shapes])[0]

    def torch_master():
        import torch

        step, masters = _torch_adamw([torch.randn(s, device="cuda") for s in shapes])
        halves = [torch.empty_like(m, dtype=torch.bfloat16) for m in masters]
        masters = [m.data for m in masters]

        def step_and_cast():
            step()
            torch._foreach_copy_(halves, masters)

        return step_and_cast

    _torch_steps(out, {"torch-fused-bf16 (14 B)": torch_bf16,
                       "torch-fused-fp32+cast (34 B)": torch_master})
    return time_interleaved(out)


#: a small MLP's tensors: a step here is bound by host work and launches, not by memory
SMALL_MLP = [(256, 64), (256,), (256, 256), (256,), (10, 256), (10,)]


def fot_params(shapes: list, sched) -> dict:
    """``fastopt.torch.AdamW`` over CUDA params of these shapes (grads already in its flat
    buffer, as after ``zero_grad(set_to_none=False)``) vs torch fused AdamW over the same."""
    import torch

    import fastopt.torch as fot

    def fot_step(**kwargs):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = fot.AdamW(params, lr=sched, **kwargs)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # takes the grads into the flat buffer; later steps copy nothing
        return opt.step

    n = sum(math.prod(s) for s in shapes)
    out = {"fastopt": fot_step(), "copy-same-bytes": _copy(28 * n),
           BF16_STATE: fot_step(state_dtype="bfloat16"),
           "fastopt-multi-tensor": fot_step(multi_tensor=True)}
    _torch_steps(out, {"torch-fused": lambda: _torch_adamw(
        [torch.randn(s, device="cuda") for s in shapes])[0]})
    return time_interleaved(out)


def _counterpart_steps(cls: str, shapes: list) -> dict:
    """torch's CUDA implementations of ``cls``'s twin (fused where it has one, foreach) or its
    oracle (its default path), over CUDA tensors of these shapes, each with
    CosineAnnealingLR: name -> a function making the step function."""
    import inspect

    from fastopt.algorithms import CLASSES
    from fastopt.benchmark import BENCH_OPTIONS
    from fastopt.oracles import counterpart

    d, _ = CLASSES[cls]
    twin = d.torch_twin.get(cls)

    def make(**how):
        def build():
            import torch

            params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = counterpart(cls, params, 1e-3, **how, **BENCH_OPTIONS[cls.lower()])
            if hasattr(opt, "train"):
                opt.train()
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10_000)

            def step():
                opt.step()
                sched.step()

            step()  # (an implementation torch lacks on CUDA, fused Adagrad, raises here)
            return step
        return build

    if twin is None:
        return {"oracle": make(foreach=cls != "Lion")}
    import torch

    if "foreach" not in inspect.signature(getattr(torch.optim, twin.name)).parameters:
        return {"torch": make()}  # (Muon: one implementation)
    cases = {"torch-foreach": make(foreach=True)}
    if "fused" in inspect.signature(getattr(torch.optim, twin.name)).parameters:
        cases["torch-fused"] = make(fused=True)
    return cases


def _fot_step(cls: str, shapes: list, sched):
    """fastopt.torch's ``cls`` over CUDA params of these shapes, the schedule in its kernel:
    a function making the step function."""
    def build():
        import torch

        import fastopt.torch as fot

        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        return getattr(fot, cls)(params, lr=sched).step
    return build


def every_optimizer(names: list, n: int, model: str, shapes: list, sched,
                    matrices: list = (), add=None) -> dict:
    """Each optimizer at ``n`` params (vs a copy of its own bytes) and on the model's tensor
    list (vs torch's CUDA implementations or the oracle); one of matrices only (Muon) on
    ``matrices``, the model's hidden ones: the core (cupy float32 stage), fastopt.torch and
    torch (both torch's bf16 stage). ``add(case, times)``, if given, takes each case as it is
    measured."""
    import cupy

    from fastopt import FlatBuffer
    from fastopt._core import ready_to_step
    from fastopt.algorithms import CLASSES
    from fastopt.benchmark import BENCH_OPTIONS, traffic

    rows = {}
    add = add or rows.__setitem__
    for cls in names:
        def make(params, cls=cls):
            return ready_to_step(cls, params, sched, **BENCH_OPTIONS[cls.lower()])

        if CLASSES[cls][0].matrix is not None:  # (Muon: the model's matrices, vs torch's)
            params = FlatBuffer.empty(matrices, xp=cupy)
            params.buffer[...] = cupy.random.standard_normal(params.buffer.size,
                                                             dtype=cupy.float32)
            grads = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
            muon_opt = make(params)
            out = {"fastopt": lambda o=muon_opt, g=grads: o.step(g)}
            _torch_steps(out, {"fastopt.torch": _fot_step(cls, matrices, sched),
                               **_counterpart_steps(cls, matrices)})
            add(f"{cls} {model} matrices", time_interleaved(out))
            continue
        p = cupy.random.standard_normal(n, dtype=cupy.float32)
        g = cupy.random.standard_normal(n, dtype=cupy.float32)
        opt = make(p)
        add(f"{cls} {n:.3g}", time_interleaved(
            {"fastopt": lambda opt=opt, g=g: opt.step(g),
             "copy-same-bytes": _copy(traffic(cls.lower()) * n)}))
        del opt, p, g
        params = FlatBuffer.empty(shapes, xp=cupy)
        params.buffer[...] = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
        grads = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
        model_opt = make(params)
        out = {"fastopt": lambda o=model_opt, g=grads: o.step(g)}
        _torch_steps(out, _counterpart_steps(cls, shapes))
        add(f"{cls} {model}", time_interleaved(out))
    return rows


def report(card: str, summary: str, rows: dict, sweep: dict) -> list[str]:
    lines = [f"# GPU check: {card}", "", f"{time.strftime('%Y-%m-%d %H:%M')}; fp32 math, "
             "AdamW + warmup-cosine; CUDA-event medians of 100 calls, the implementations "
             "of a case taking turns in 5 rounds of 20", "",
             f"gpu tests: `{summary}`", "",
             "| case | implementation | ms | fastopt speedup | fastopt bf16-state speedup |",
             "|---|---|---|---|---|"]
    for case, t in rows.items():
        for k, v in t.items():
            if isinstance(v, float):
                half = f"{v / t[BF16_STATE]:.2f}x" if BF16_STATE in t else ""
                lines.append(f"| {case} | {k} | {v * 1e3:.3f} | {v / t['fastopt']:.2f}x | "
                             f"{half} |")
            else:
                lines.append(f"| {case} | {k} | {v} | | |")
        if "copy-same-bytes" in t:
            lines.append(f"| {case} | fastopt % of same-bytes copy | | "
                         f"{100 * t['copy-same-bytes'] / t['fastopt']:.0f}% | |")
        if isinstance(t.get(INT8_STATE), float):
            lines.append(f"| {case} | int8 state % of a copy of its 16 B/param | | "
                         f"{100 * t[INT8_COPY] / t[INT8_STATE]:.0f}% | |")
        if isinstance(t.get(BF16_MODES["none"]), float):
            lines.append(f"| {case} | bf16 params, no master, int8 state % of a copy of its "
                         f"10 B/param | | {100 * t[NONE_COPY] / t[BF16_MODES['none']]:.0f}% | |")
        if isinstance(t.get(CLIPPED), float):
            lines.append(f"| {case} | clipped % of a copy of its 32 B/param | | "
                         f"{100 * t['copy-same-bytes + grads (32 B)'] / t[CLIPPED]:.0f}% | |")
    if sweep:
        best = min(sweep.values())
        lines += ["", "Grid size (fp32 AdamW, first case's size; default "
                  "`fastopt.gpu.launch.BLOCKS_PER_SM`):", "",
                  "| blocks per SM | ms | vs best |", "|---|---|---|"]
        lines += [f"| {k} | {v * 1e3:.3f} | {v / best:.3f} |" for k, v in sweep.items()]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=float, default=1e8)
    parser.add_argument("--model", default="gpt2_small", help="a shape list in bench/shapes")
    parser.add_argument("--report", default="gpu_report.md")
    parser.add_argument("--no-tests", action="store_true", help="timings only")
    parser.add_argument("--no-sweep", action="store_true", help="skip the grid-size sweep")
    parser.add_argument("--optimizers", default="all",
                        help="comma-separated classes for the every-optimizer rows (beyond "
                             "AdamW): 'all' (default) or 'none'")
    args = parser.parse_args()
    import cupy

    from fastopt import schedules
    from fastopt.benchmark import load_shapes

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    tests = None
    summary = "not run"
    if not args.no_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu",
                                str(ROOT / "tests" / "test_gpu.py"),
                                str(ROOT / "tests" / "test_gpu_torch.py")],
                               capture_output=True, text=True, cwd=ROOT)
        Path(args.report).with_suffix(".tests.log").write_text(tests.stdout + tests.stderr)
        summary = (tests.stdout.strip().splitlines()[-1] if tests.stdout.strip()
                   else tests.stderr[-300:])
    n = int(args.size)
    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    model, shapes = load_shapes(args.model)
    # (Muon's share of the model; a list without names: its 2-D tensors)
    matrices = load_shapes(args.model, hidden_matrices=True)[1] \
        or [s for s in shapes if len(s) == 2]
    rows: dict = {}

    def add(case: str, timed: dict) -> None:
        """Keep a case's times and rewrite the report, so a run cut short keeps what it has."""
        rows[case] = timed
        Path(args.report).write_text("\n".join(report(card, summary, rows, {})) + "\n")
        print(f"{time.strftime('%H:%M:%S')} {case}", flush=True)

    add(f"fp32 {n:.3g}", fp32_one_buffer(n, sched))
    add(f"fp32 {model}", fp32_model(shapes, sched))
    add(f"bf16 {n:.3g}", bf16_params([(n,)], sched))
    add(f"bf16 {model}", bf16_params(shapes, sched))
    import torch

    if torch.cuda.is_available():  # fastopt.torch on CUDA params
        add(f"fot {model}", fot_params(shapes, sched))
        add(f"fot mlp {sum(math.prod(s) for s in SMALL_MLP):.3g}", fot_params(SMALL_MLP, sched))
    from fastopt.algorithms import CLASSES

    names = ([c for c in CLASSES if c != "AdamW"]
             if args.optimizers == "all"
             else [] if args.optimizers == "none" else args.optimizers.split(","))
    if names:  # (without CUDA torch the torch columns hold the error)
        every_optimizer(names, n, model, shapes, sched, matrices, add)
    sweep = {} if args.no_sweep else grid_sweep(n, sched)
    lines = report(card, summary, rows, sweep)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if tests is not None and tests.returncode != 0:
        print(tests.stdout[-5000:], tests.stderr[-3000:])
        return tests.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
