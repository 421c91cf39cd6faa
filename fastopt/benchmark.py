"""The engine behind ``fastopt bench``: fastopt vs torch.optim vs the memory roofline.

Every implementation runs in this one process on the same inputs, interleaved round by round,
and only ratios measured together are reported. Before timing, fastopt's and torch's results
are checked to agree. The roofline is a kernel with the optimizer's traffic and no arithmetic
(an Adam step reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numba
import numpy as np
from numba import njit, prange

from . import schedules
from .optimizers import Adadelta, Adagrad, Adam, AdamW

#: bytes moved per fp32 parameter by one step: (buffers read + buffers written) * 4
TRAFFIC = {"adam": 28, "adamw": 28, "adagrad": 20, "adadelta": 28}


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_4r3w(a, b, c, d):
    """Same traffic as an Adam step and no math: read a, b, c, d; write a, c, d."""
    for i in prange(a.shape[0]):
        x, y, z, w = a[i], b[i], c[i], d[i]
        a[i] = y
        c[i] = x
        d[i] = z + w


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_3r2w(a, b, c):
    """Same traffic as an Adagrad step: read a, b, c; write a, c."""
    for i in prange(a.shape[0]):
        x, y, z = a[i], b[i], c[i]
        a[i] = y + z
        c[i] = x


@dataclass
class Row:
    optimizer: str
    size: int
    times: dict = field(default_factory=dict)  # implementation -> median seconds

    def ratios(self) -> dict:
        ours = self.times["fastopt"]
        return {k: v / ours for k, v in self.times.items() if k != "fastopt"}


def torch_setup(name: str, p0: np.ndarray, g: np.ndarray, lr_schedule, mode: str, steps: int):
    """A torch optimizer + matching scheduler over one tensor; returns its step closure."""
    import torch
    from torch.optim import lr_scheduler

    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    param.grad = torch.from_numpy(g)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta}[name]
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "forloop": {"foreach": False}}[mode]
    opt = cls([param], lr=lr_schedule.at(0), **kwargs)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def step():
        opt.step()
        sched.step()

    return step, param


def fastopt_setup(name: str, p0: np.ndarray, lr_schedule):
    cls = {"adam": Adam, "adamw": AdamW, "adagrad": Adagrad, "adadelta": Adadelta}[name]
    p = p0.copy()
    return cls(p, lr=lr_schedule), p


def torch_modes(name: str) -> list[str]:
    """torch has fused CPU kernels for Adam, AdamW and Adagrad, not for Adadelta."""
    return ["fused", "foreach", "forloop"] if name != "adadelta" else ["foreach", "forloop"]


def check_agreement(name: str, n: int, steps: int = 5) -> float:
    """Relative max error of fastopt vs torch (fused where it exists) after a few steps."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    sched = schedules.cosine(1e-3, 100)
    opt, p = fastopt_setup(name, p0, sched)
    g = rng.standard_normal(n).astype(np.float32)
    step, param = torch_setup(name, p0, g, sched, torch_modes(name)[0], 100)
    for _ in range(steps):
        opt.step(g)
        step()
    theirs = param.detach().numpy()
    return float(np.max(np.abs(p - theirs)) / np.max(np.abs(theirs)))


def _median_times(impls: dict[str, Callable[[], None]], budget_s: float) -> dict[str, float]:
    """Median time per call, implementations interleaved so machine noise hits all alike."""
    for fn in impls.values():  # warm up (and compile)
        fn()
        fn()
    t0 = time.perf_counter()
    for fn in impls.values():
        fn()
    per_round = max(time.perf_counter() - t0, 1e-7)
    rounds = int(min(max(budget_s / per_round, 5), 2000))
    samples = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_one(name: str, n: int, budget_s: float, with_torch: bool = True) -> Row:
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    sched = schedules.cosine(1e-3, 10_000, end_lr=1e-5)
    opt, _ = fastopt_setup(name, p0, sched)
    impls: dict[str, Callable[[], None]] = {"fastopt": lambda: opt.step(g)}
    if with_torch:
        for mode in torch_modes(name):
            if mode == "forloop" and n > 20_000_000:
                continue
            step, _ = torch_setup(name, p0, g, sched, mode, 10_000)
            impls[f"torch-{mode}"] = step
    bufs = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    if TRAFFIC[name] == 20:
        impls["roofline"] = lambda: copy_traffic_3r2w(bufs[0], bufs[1], bufs[2])
    else:
        impls["roofline"] = lambda: copy_traffic_4r3w(*bufs)
    return Row(name, n, _median_times(impls, budget_s))


def machine() -> dict:
    import os

    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def format_table(rows: list[Row]) -> str:
    impls = []
    for r in rows:
        impls += [k for k in r.times if k not in impls]
    head = ["optimizer", "params", "fastopt ms", "GB/s"] + \
        [f"{k} ms" for k in impls if k != "fastopt"] + \
        [f"vs {k}" for k in impls if k not in ("fastopt", "roofline")] + ["% roofline"]
    lines = [head]
    for r in rows:
        t = r.times
        ours = t["fastopt"]
        line = [r.optimizer, f"{r.size:.3g}", f"{ours * 1e3:.3f}",
                f"{TRAFFIC[r.optimizer] * r.size / ours / 1e9:.1f}"]
        line += [f"{t[k] * 1e3:.3f}" if k in t else "-" for k in impls if k != "fastopt"]
        line += [f"{t[k] / ours:.2f}x" if k in t else "-" for k in impls
                 if k not in ("fastopt", "roofline")]
        line.append(f"{100 * t['roofline'] / ours:.0f}%")
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(x, widths, strict=True)) for x in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: list[Row], path: str) -> None:
    """GB/s vs size, one panel per optimizer, one line (same colour everywhere) per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.optimizer for r in rows))
    impls = list(dict.fromkeys(k for r in rows for k in r.times))
    colors = {k: f"C{i}" for i, k in enumerate(impls)}
    cols = min(2, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sub = [r for r in rows if r.optimizer == name]
        for impl in impls:
            pts = [(r.size, TRAFFIC[name] * r.size / r.times[impl] / 1e9)
                   for r in sub if impl in r.times]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=colors[impl], label=impl,
                        linestyle="--" if impl == "roofline" else "-")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("parameters")
        ax.set_ylabel("GB/s (optimizer traffic / time)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(rows: list[Row], path: str, plot_path: str | None, command: str) -> None:
    """A results page: machine, date, the command that made it, the table and the plot."""
    import os

    info = machine()
    lines = [
        "# fastopt benchmark results",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {info['processor']} "
        f"({info['cpus']} CPUs; Numba threads {info['numba_threads']}, torch threads "
        f"{info.get('torch_threads', '-')}; torch {info.get('torch', '-')}, numba "
        f"{info['numba']}, numpy {info['numpy']}, Python {info['python']}).",
        "",
        f"Regenerate: `{command}`",
        "",
        "Times are medians of interleaved rounds in one process; torch paths step their "
        "`CosineAnnealingLR` too (that is what a torch loop pays). `vs X` = X's time / fastopt's "
        "time (> 1: fastopt faster). `% roofline` = a same-traffic kernel with no arithmetic "
        "(the memory limit here) / fastopt's time. GB/s counts the optimizer's own traffic "
        "(28 B/param for Adam(W) and Adadelta, 20 for Adagrad). The machine is shared: compare "
        "ratios within a row, not absolute times across runs.",
        "",
        "```",
        format_table(rows),
        "```",
        "",
    ]
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(path)))
        lines += [f"![throughput vs size]({rel})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def run(optimizers: list[str], sizes: list[int], budget_s: float, json_path: str | None,
        plot_path: str | None, with_torch: bool = True, out=print,
        markdown_path: str | None = None, command: str = "fastopt bench") -> list[Row]:
    if with_torch:
        import torch

        torch.set_num_threads(numba.get_num_threads())
        for name in optimizers:
            err = check_agreement(name, 4099)
            if not err <= 1e-5:
                raise RuntimeError(f"{name}: fastopt and torch disagree (rel err {err:.2e}); "
                                   "not timing a wrong result")
            out(f"check {name}: fastopt == torch.optim within {err:.1e} (relative)")
    rows = []
    for name in optimizers:
        for n in sizes:
            rows.append(bench_one(name, n, budget_s, with_torch))
            out(f"  {name} {n:.3g}: done")
    out(format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "rows": [asdict(r) | {"ratios": r.ratios()} for r in rows]}, f, indent=1)
        out(f"wrote {json_path}")
    if plot_path:
        plot(rows, plot_path)
        out(f"wrote {plot_path}")
    if markdown_path:
        write_markdown(rows, markdown_path, plot_path, command)
        out(f"wrote {markdown_path}")
    return rows
