"""Each launch of a tensor-aware optimizer's step timed alone on a GPU (CUDA-event medians),
on a model's shape list: where a multi-pass step spends its time.

    python bench/gpu_passes.py [--model gpt2_small] [--optimizers Adafactor,LAMB] [--variants]

For factored moments (Adafactor) also with the statistics' tiles four times taller
(``fastopt.segments.TILE_ELEMENTS``), the one layout constant that trades the statistics
pass's block count against the fold pass's serial sums; ``--variants``: Adafactor's heavy
launches under other builds (``VARIANTS``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]


def time_passes(cls: str, shapes: list, sched) -> dict:
    import cupy
    from gpu_check import _copy, time_interleaved

    from fastopt import FlatBuffer
    from fastopt._core import ready_to_step
    from fastopt.benchmark import BENCH_OPTIONS
    from fastopt.gpu import launch

    params = FlatBuffer.empty(shapes, xp=cupy)
    params.buffer[...] = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
    grads = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
    opt = ready_to_step(cls, params, sched, **BENCH_OPTIONS[cls.lower()])
    opt.step(grads)
    prepared = opt._prepared
    values = prepared.kernel_values(grads, opt._device_table, opt._device_table.shape[0],
                                    opt._step_state, opt._lr_out, 1.0, 1.0, 0)
    op = prepared.definition.name
    module = launch._module(f"{op}.cu")
    args = launch.pack_args(values)
    fns = {"whole step": lambda: opt.step(grads)}
    for stem, typed, grid, block in launch.segmented_passes(op, values):
        if stem is None:
            continue
        kernel = module.get_function(launch.kernel_name(stem, "float32") if typed else stem)
        fns[f"{stem} ({grid} x {block})"] = functools.partial(kernel, (grid,), (block,), args)
    from fastopt.benchmark import traffic

    fns["copy of the step's bytes"] = _copy(traffic(cls.lower()) * params.buffer.size)
    return time_interleaved(fns)


def _factored_source(patch=None) -> str:
    """adafactor.cu with kernels/factored.cuh inlined and ``patch``ed (NVRTC reads headers
    from disk)."""
    from fastopt.gpu import build

    header = build.source("factored.cuh")
    if patch is not None:
        header = patch(header)
    return build.source("adafactor.cu").replace('#include "factored.cuh"', header)


def _float_statistics(header: str) -> str:
    """The statistics' per-element squares and their sums in float32, not float64."""
    old = "const double x = factor * (double)buf["
    assert old in header
    return (header.replace(old, "const float x = (float)factor * (buf[")
            .replace("buf[r * w + c];", "buf[r * w + c]);")
            .replace("double sum = col_acc[c];", "float sum = (float)col_acc[c];"))


#: Adafactor build variants (source patch, extra NVRTC options) for --variants: what limits
#: its statistics and reduce passes (bench/NOTES.md)
VARIANTS = {
    "as shipped": (None, ()),
    "statistics through 2048 values a time": (
        lambda h: h.replace("#define FO_TILE_BUFFER 4096", "#define FO_TILE_BUFFER 2048"), ()),
    "statistics summed in float32": (_float_statistics, ()),
    "--use_fast_math": (None, ("--use_fast_math",)),
}


def time_variants(shapes: list, sched) -> dict:
    """Adafactor's statistics, reduce and update launches under each of VARIANTS."""
    import cupy
    from gpu_check import time_interleaved

    from fastopt import FlatBuffer
    from fastopt._core import ready_to_step
    from fastopt.gpu import build, launch

    params = FlatBuffer.empty(shapes, xp=cupy)
    params.buffer[...] = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
    grads = cupy.random.standard_normal(params.buffer.size, dtype=cupy.float32)
    opt = ready_to_step("Adafactor", params, sched)
    opt.step(grads)
    prepared = opt._prepared
    values = prepared.kernel_values(grads, opt._device_table, opt._device_table.shape[0],
                                    opt._step_state, opt._lr_out, 1.0, 1.0, 0)
    args = launch.pack_args(values)
    plan = {stem: (grid, block) for stem, _, grid, block in
            launch.segmented_passes("adafactor", values) if stem is not None}
    fns = {}
    for label, (patch, options) in VARIANTS.items():
        module = cupy.RawModule(code=_factored_source(patch),
                                options=(*build.nvrtc_options(), *options))
        for stem in ("adafactor_stats", "adafactor_reduce", "adafactor"):
            grid, block = plan[stem]
            kernel = module.get_function(launch.kernel_name(stem, "float32"))
            fns[f"{label}: {stem}"] = functools.partial(kernel, (grid,), (block,), args)
    return time_interleaved(fns)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2_small")
    parser.add_argument("--optimizers", default="Adafactor,LAMB")
    parser.add_argument("--variants", action="store_true",
                        help="time Adafactor's launches under each build of VARIANTS instead")
    args = parser.parse_args()
    from fastopt import schedules, segments
    from fastopt.benchmark import load_shapes

    _, shapes = load_shapes(args.model)
    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    lines = [f"| {args.model} | launch | ms |", "|---|---|---|"]
    if args.variants:
        times = time_variants(shapes, sched)
        lines += [f"| Adafactor | {k} | {v * 1e3:.3f} |" for k, v in times.items()]
        print("\n".join(lines))
        return 0
    for cls in args.optimizers.split(","):
        variants = {"": None}
        if cls == "Adafactor":
            variants[f" (tiles of {4 * segments.TILE_ELEMENTS})"] = 4 * segments.TILE_ELEMENTS
        for label, tile in variants.items():
            before = segments.TILE_ELEMENTS
            if tile is not None:
                segments.TILE_ELEMENTS = tile
            try:
                times = time_passes(cls, shapes, sched)
            finally:
                segments.TILE_ELEMENTS = before
            lines += [f"| {cls}{label} | {k} | {v * 1e3:.3f} |" for k, v in times.items()]
            print("\n".join(lines[-len(times):]), flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
