"""A/B timing of CUDA kernel build variants on a lent GPU, alternating in one process.

    python bench/gpu_ab.py [--size 1e8] [--rounds 3]

Each variant is adam.cu built with other NVRTC options or a patched source; the launcher is
pointed at each variant's module in turn and AdamW is timed at ``size`` params for fp32
params, bf16 params (fp32 master) and fp32 params with bf16 state, next to a same-bytes copy.
Prints a markdown table of medians over the rounds. For bench/NOTES.md entries: write the
expectation first, then run this.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import _copy, gpu_time  # noqa: E402


def _options(fmad: bool) -> tuple[str, ...]:
    from fastopt.gpu import build

    kept = tuple(o for o in build.nvrtc_options() if not o.startswith("--fmad"))
    return (*kept, f"--fmad={'true' if fmad else 'false'}")


def _vec8(source: str) -> str:
    """16-bit params in 8-element groups (16-byte accesses) instead of 4 (8-byte)."""
    old = "static constexpr int value = 4;"
    assert old in source
    return source.replace(old, "static constexpr int value = 16 / sizeof(T);")


def _common_with(patch):
    """adam.cu with common.cuh inlined and patched (NVRTC reads the header from disk)."""
    from fastopt.gpu import build

    include = '#include "common.cuh"'
    common = patch(build.source("common.cuh"))
    schedule = build.source("schedule.cuh").replace(include, "")
    adam = build.source("adam.cu").replace(include, "").replace('#include "schedule.cuh"', "")
    return "\n".join((common, schedule, adam))


VARIANTS = {
    "as shipped (fmad=false, groups of 4)": (lambda: None, False),
    "fmad=true (NVRTC default)": (lambda: None, True),
    "16-bit params in groups of 8": (lambda: _common_with(_vec8), False),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=float, default=1e8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import cupy

    import fastopt
    from fastopt import _bf16, schedules
    from fastopt.gpu import build, launch

    modules = {}
    for name, (make_source, fmad) in VARIANTS.items():
        code = make_source() or build.source("adam.cu")
        modules[name] = cupy.RawModule(code=code, options=_options(fmad))
    current = [None]
    launch._module = lambda source_name: modules[current[0]]  # noqa: SLF001 (bench-only)

    n = int(args.size)
    sched = schedules.warmup(schedules.cosine(1e-3, 10_000), 500)
    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    g = cupy.random.standard_normal(n, dtype=cupy.float32)
    bits, gbits = _bf16.encode(p, xp=cupy), _bf16.encode(g, xp=cupy)
    cases = {"fp32": lambda: (fastopt.AdamW(p.copy(), lr=sched), g),
             "bf16 params": lambda: (fastopt.AdamW(bits.copy(), lr=sched, dtype="bfloat16"),
                                     gbits),
             "fp32, bf16 state": lambda: (fastopt.AdamW(p.copy(), lr=sched,
                                                        state_dtype="bfloat16"), g)}
    times = {(v, c): [] for v in VARIANTS for c in cases}
    copies = []
    copy = _copy(28 * n)
    for _ in range(args.rounds):
        copies.append(gpu_time(copy))
        for case, make in cases.items():
            for variant in VARIANTS:
                current[0] = variant
                opt, grad = make()
                times[variant, case].append(gpu_time(lambda o=opt, gr=grad: o.step(gr)))
                del opt
    copy_ms = statistics.median(copies) * 1e3
    print(f"| variant | {' | '.join(cases)} |  (ms; % of a 28 B/param copy, "
          f"{copy_ms:.3f} ms)")
    print("|---|" + "---|" * len(cases))
    for variant in VARIANTS:
        cells = []
        for case in cases:
            ms = statistics.median(times[variant, case]) * 1e3
            cells.append(f"{ms:.3f} ({100 * copy_ms / ms:.0f}%)")
        print(f"| {variant} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
