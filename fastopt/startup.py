"""Start-up cost, measured in fresh processes: ``import fastopt``, the first ``step()`` with an
empty Numba cache (compiles) and with a warm one (loads the compiled kernel from disk), at
1,000 params (where the kernel runs its serial loop) and at 100,000 (its parallel loop).

Each measurement runs ``python -c`` in a new interpreter with ``NUMBA_CACHE_DIR`` pointing at a
temporary folder, so the user's own cache is neither used nor touched. When scipy is installed,
Numba's first dispatch of *any* jitted function imports ``scipy.linalg`` (to find a BLAS for its
``np.dot`` support); the warm first step is then also measured with scipy hidden, which shows
what that import costs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .algorithms import CLASSES

_CHILD = r"""
import sys, time
if sys.argv[2] == "hide-scipy":
    sys.modules["scipy"] = None  # Numba then skips its BLAS probe
t0 = time.perf_counter()
import numpy as np
import fastopt
t1 = time.perf_counter()
rng = np.random.default_rng(0)
params = rng.standard_normal(int(sys.argv[3]), dtype=np.float32)
grads = rng.standard_normal(int(sys.argv[3]), dtype=np.float32)
opt = fastopt._core.ready_to_step(sys.argv[1], params, fastopt.schedules.cosine(1e-3, 100))
t2 = time.perf_counter()
opt.step(grads)
t3 = time.perf_counter()
import json
print(json.dumps({"import": t1 - t0, "first_step": t3 - t2}))
"""

CLASS_NAMES = {name.lower(): name for name in CLASSES}  # every public optimizer
SIZES = {"1e3": 1_000, "1e5": 100_000}  # below and above the serial/parallel switch


@dataclass
class StartupRow:
    optimizer: str
    seconds: dict = field(default_factory=dict)  # measurement -> median seconds


def _child(name: str, cache_dir: str, size: int, hide_scipy: bool = False) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    mode = "hide-scipy" if hide_scipy else "as-is"
    done = subprocess.run([sys.executable, "-c", _CHILD, CLASS_NAMES[name], mode, str(size)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"start-up measurement for {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(optimizers: list[str], repeats: int = 3) -> list[StartupRow]:
    """Medians over ``repeats`` fresh processes of: import, cold and warm first step at each of
    SIZES (each size with its own empty cache)."""
    with_scipy = importlib.util.find_spec("scipy") is not None
    rows = []
    for name in optimizers:
        samples: dict[str, list[float]] = {}
        add = _appender(samples)
        for _ in range(repeats):
            for label, size in SIZES.items():
                with tempfile.TemporaryDirectory(prefix="fastopt-numba-cache-") as cache:
                    cold = _child(name, cache, size)
                    warm = _child(name, cache, size)
                    add("import", warm["import"])
                    add(f"cold {label}", cold["first_step"])
                    add(f"warm {label}", warm["first_step"])
                    if with_scipy:
                        bare = _child(name, cache, size, hide_scipy=True)
                        add(f"warm {label}, scipy hidden", bare["first_step"])
        rows.append(StartupRow(name, {k: statistics.median(v) for k, v in samples.items()}))
    return rows


def _appender(samples: dict):
    return lambda key, value: samples.setdefault(key, []).append(value)


def format_table(rows: list[StartupRow]) -> str:
    """One line per optimizer, seconds."""
    keys = list(dict.fromkeys(k for r in rows for k in r.seconds))
    head = ["optimizer", *(f"{k} s" for k in keys)]
    lines = [head] + [[r.optimizer, *(f"{r.seconds[k]:.2f}" if k in r.seconds else "-"
                                      for k in keys)] for r in rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(x, widths, strict=True)) for x in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
