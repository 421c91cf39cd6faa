"""The engine behind ``fastopt bench``: fastopt vs torch.optim (or, for an optimizer torch
does not have, the oracle in ``fastopt.oracles``) vs the memory roofline.

Every implementation runs in this one process on the same inputs, interleaved round by round,
and only ratios measured together are reported. Before timing, fastopt's and torch's results
are checked to agree. The roofline is a kernel with the optimizer's traffic and no arithmetic
(an Adam step reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter).
"""

from __future__ import annotations

import functools
import importlib
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from . import optimizers, schedules, startup
from ._core import ready_to_step
from .algorithms import CLASSES
from .flat import FlatBuffer
from .oracles import BENCH_EXTRAS, ORACLES, counterpart
from .segments import SegmentTable

#: the optimizers ``fastopt bench`` knows: the public classes, by lower-case name
OPTIMIZERS = {name.lower(): getattr(optimizers, name) for name in CLASSES}
#: the options each is benchmarked with (its class defaults, and the definition's bench ones)
BENCH_OPTIONS = {name.lower(): spec.bench for name, (_, spec) in CLASSES.items()}


def state_count(name: str) -> int:
    """The state buffers ``name`` keeps with its benchmark options."""
    cls = OPTIMIZERS[name]
    d, spec = CLASSES[cls.__name__]
    hypers = {h.name: h.default for h in d.hypers} | spec.defaults | spec.bench | spec.fixed
    return len(d.active_state(d.check(hypers)))


def traffic(name: str) -> int:
    """Bytes one step moves per fp32 parameter: read p, g and each state buffer, write p and
    each state buffer (4 bytes each): 28 for Adam, 20 for Adagrad. A tensor-aware optimizer
    (LAMB) makes two passes, the least it can: the first reads p, g and the state and writes
    the state, the second reads p and the state and writes p: 40 for LAMB. One with a matrix
    stage (Muon) counts its two elementwise passes: read g and the state, write the state
    and the direction; read p and the stage's result, write p: 28 (the stage's matrix
    products come on top). Factored moments (Adafactor) read g for the row and column
    statistics, p for its norm, g for the update's norm, then p and g and write p: 24 (the
    factors, a value per row and column, come on top)."""
    s = state_count(name)
    d = OPTIMIZERS[name].definition
    if d.factored is not None:
        return 4 * (1 + 1 + 1 + 3)
    if d.matrix is not None:
        return 4 * ((1 + s) + (s + 1) + 2 + 1)
    if d.segmented:
        return 4 * ((2 + s) + s + (1 + s) + 1)
    return 4 * ((2 + s) + (1 + s))


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_2r1w(a, b):
    """Same traffic as a stateless step (SGD without momentum): read a, b; write a."""
    for i in prange(a.shape[0]):
        a[i] = a[i] + b[i]


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_4r3w(a, b, c, d):
    """Same traffic as an Adam step and no math: read a, b, c, d; write a, c, d."""
    for i in prange(a.shape[0]):
        x, y, z, w = a[i], b[i], c[i], d[i]
        a[i] = y
        c[i] = x
        d[i] = z + w


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_5r4w(a, b, c, d, e):
    """Same traffic as an AdEMAMix step: read a, b, c, d, e; write a, c, d, e."""
    for i in prange(a.shape[0]):
        x, y, z, w, v = a[i], b[i], c[i], d[i], e[i]
        a[i] = y
        c[i] = x
        d[i] = z + w
        e[i] = v + x  # (a store of the value just read, e[i] = v, would be optimised away)


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_3r2w(a, b, c):
    """Same traffic as an Adagrad step: read a, b, c; write a, c."""
    for i in prange(a.shape[0]):
        x, y, z = a[i], b[i], c[i]
        a[i] = y + z
        c[i] = x


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_two_pass_4r2w_3r1w(a, b, c, d):
    """Same traffic as a LAMB step (two passes): read a, b, c, d, write c, d; then read a, c,
    d, write a."""
    for i in prange(a.shape[0]):
        x, y, z, w = a[i], b[i], c[i], d[i]
        c[i] = w + x
        d[i] = z + y
    for i in prange(a.shape[0]):
        a[i] = a[i] + c[i] - d[i]


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_two_pass_2r2w_2r1w(a, b, c, d):
    """Same traffic as Muon's elementwise passes: read b, c, write c, d; then read a, d,
    write a."""
    for i in prange(a.shape[0]):
        y, z = b[i], c[i]
        c[i] = y + z
        d[i] = y - z
    for i in prange(a.shape[0]):
        a[i] = a[i] + d[i]


def traffic_text() -> str:
    """'28 B/param for adam, adamw, ...; 20 for ...': each optimizer's bytes per fp32 param,
    with its benchmark options."""
    by_bytes: dict[int, list[str]] = {}
    for name in OPTIMIZERS:
        label = name + "".join(f" ({k}={v})" for k, v in BENCH_OPTIONS[name].items())
        by_bytes.setdefault(traffic(name), []).append(label)
    return "; ".join(f"{b} B/param for {', '.join(names)}" for b, names in by_bytes.items())


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_int8_1(a, b, c):
    """Same traffic as an int8-state step with one state buffer: read a, b and the codes c;
    write a and c (the block scales, 4 B per 256 elements, are left out)."""
    for i in prange(np.uint64(a.shape[0])):
        x = c[i]
        a[i] = a[i] + b[i] + np.float32(x)
        c[i] = np.uint8(x + np.uint8(1))


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_int8_2(a, b, c, d):
    """Likewise with two state buffers (AdamW): 16 B per element."""
    for i in prange(np.uint64(a.shape[0])):
        x, y = c[i], d[i]
        a[i] = a[i] + b[i] + np.float32(x)
        c[i], d[i] = y, x


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_int8_3(a, b, c, d, e):
    """Likewise with three state buffers."""
    for i in prange(np.uint64(a.shape[0])):
        x, y, z = c[i], d[i], e[i]
        a[i] = a[i] + b[i] + np.float32(x)
        c[i], d[i], e[i] = y, z, x


def roofline_int8(name: str, n: int) -> Callable[[], None]:
    """A call of the copy kernel with ``name``'s traffic with int8 state over n elements."""
    rng = np.random.default_rng(0)
    kernel = (copy_traffic_int8_1, copy_traffic_int8_2, copy_traffic_int8_3)[
        state_count(name) - 1]
    bufs = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)] + [
        np.zeros(n, dtype=np.uint8) for _ in range(state_count(name))]
    return lambda: kernel(*bufs)


def roofline(name: str, n: int) -> Callable[[], None]:
    """A call of the copy kernel with ``name``'s traffic over n float32 elements."""
    if OPTIMIZERS[name].definition.factored is not None:
        kernel = copy_traffic_four_pass_1r_1r_1r_2r1w
    else:
        kernel = {0: copy_traffic_2r1w, 1: copy_traffic_3r2w, 2: copy_traffic_4r3w,
                  3: copy_traffic_5r4w}[state_count(name)]
    if OPTIMIZERS[name].definition.factored is not None:
        pass
    elif OPTIMIZERS[name].definition.matrix is not None:
        if state_count(name) != 1:
            raise NotImplementedError(f"no two-pass copy kernel for {name}'s state")
        kernel = copy_traffic_two_pass_2r2w_2r1w
    elif OPTIMIZERS[name].definition.segmented:
        if state_count(name) != 2:
            raise NotImplementedError(f"no two-pass copy kernel for {name}'s state")
        kernel = copy_traffic_two_pass_4r2w_3r1w
    rng = np.random.default_rng(0)
    bufs = [rng.standard_normal(n, dtype=np.float32)
            for _ in range(kernel.py_func.__code__.co_argcount)]
    return lambda: kernel(*bufs)


@dataclass
class Row:
    optimizer: str
    case: str  # "1e+06" for one flat buffer, or a model's name
    size: int  # parameters
    tensors: int
    times: dict = field(default_factory=dict)  # implementation -> median seconds

    def ratios(self) -> dict:
        ours = self.times["fastopt"]
        return {k: v / ours for k, v in self.times.items() if k != "fastopt"}


def load_shapes(model: str, hidden_matrices: bool = False) -> tuple[str, list[tuple[int, ...]]]:
    """(name, shapes) from a JSON shape list: a path, or a name in bench/shapes/.

    ``hidden_matrices``: the tensors Muon would take in that model, told by name since a
    shape list has no modules (``fastopt.torch.muon_param_groups`` decides by module type
    on a real model): the 2-D tensors inside its numbered blocks (GPT-2's ``h.N`` weights),
    not embeddings, the head or other ranks; the label gets " matrices"."""
    candidates = [Path(model)]
    for root in (Path(__file__).resolve().parents[1] / "bench" / "shapes",
                 Path(__file__).resolve().parent / "_shapes"):
        candidates.append(root / f"{model}.json")
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            if not hidden_matrices:
                return data["model"], [tuple(s["shape"]) for s in data["shapes"]]
            return f"{data['model']} matrices", [
                tuple(s["shape"]) for s in data["shapes"]
                if len(s["shape"]) == 2 and re.search(r"(^|\.)\d+\.", s.get("name", ""))]
    raise ValueError(f"no shape list {model!r} (give a path or a name in bench/shapes/)")


def torch_setup(name: str, values: list[np.ndarray], grads: list[np.ndarray], mode: str,
                steps: int, lr: float = 1e-3):
    """A torch optimizer over these tensors + CosineAnnealingLR; returns (step closure, params)."""
    import torch
    from torch.optim import lr_scheduler

    params = []
    for v, g in zip(values, grads, strict=True):
        p = torch.nn.Parameter(torch.from_numpy(v.copy()))
        p.grad = torch.from_numpy(g)
        params.append(p)
    cls = torch_twin(name)
    cls_name = OPTIMIZERS[name].__name__
    extra = BENCH_EXTRAS.get(cls_name)
    if cls is None and mode == "oracle" and ORACLES[cls_name].native is not None:
        # an oracle outside torch (optax): its own jitted loop, not through torch tensors
        return ORACLES[cls_name].run_native(values, grads, lr, steps, BENCH_OPTIONS[name])
    if cls is None and extra is not None and mode == extra.label:
        opt = extra.build(importlib.import_module(extra.module), params, lr,
                          BENCH_OPTIONS[name], True)
    elif cls is None:  # the oracle (its own default path: foreach where it has one)
        opt = counterpart(cls_name, params, lr, foreach=_oracle_foreach(name),
                          **BENCH_OPTIONS[name])
        if hasattr(opt, "train"):
            opt.train()
    else:
        kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True},
                  "forloop": {"foreach": False}, "plain": {}}[mode]
        opt = cls(params, lr=lr, **kwargs, **BENCH_OPTIONS[name])
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def step():
        opt.step()
        sched.step()

    return step, params


def torch_twin(name: str):
    """The torch.optim class with ``name``'s numbers (None without a twin)."""
    import torch

    d, _ = CLASSES[OPTIMIZERS[name].__name__]
    twin = d.torch_twin.get(OPTIMIZERS[name].__name__)
    return getattr(torch.optim, twin.name) if twin is not None else None


def _oracle_foreach(name: str) -> bool:
    """Whether the oracle's constructor takes ``foreach`` (then it runs its foreach path, its
    default: pytorch-optimizer, schedulefree; lion-pytorch has only its for-loop)."""
    return OPTIMIZERS[name].__name__ != "Lion"


def torch_modes(name: str) -> list[str]:
    """torch's implementations of the twin: fused where its constructor takes ``fused`` (Adam,
    AdamW, Adagrad and SGD have fused CPU kernels; Adadelta has none), foreach, for-loop;
    without a twin, ``oracle`` (where its package is installed)."""
    import inspect

    cls = torch_twin(name)
    if cls is None:
        extra = BENCH_EXTRAS.get(OPTIMIZERS[name].__name__)
        return (["oracle"] if ORACLES[OPTIMIZERS[name].__name__].available() else []) + \
            ([extra.label] if extra is not None and extra.available() else [])
    parameters = inspect.signature(cls).parameters
    if "foreach" not in parameters:  # (Muon: one implementation)
        return ["plain"]
    return (["fused"] if "fused" in parameters else []) + ["foreach", "forloop"]


class Problem:
    """Random params and grads with these shapes: packed for fastopt, as tensors for torch."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0):
        rng = np.random.default_rng(seed)
        self.shapes = shapes
        self.params = FlatBuffer.empty(shapes)
        self.grads = self.params.like()
        for p, g in zip(self.params.views, self.grads.views, strict=True):
            p[...] = rng.standard_normal(p.shape, dtype=np.float32)
            g[...] = rng.standard_normal(g.shape, dtype=np.float32)

    def fastopt(self, name: str, schedule, dtype: str = "float32", **options):
        """fastopt's class over a copy of the params (``dtype``: float32, or bfloat16 with
        ``master_weights=`` in ``options``)."""
        buf = self.params.buffer.copy() if dtype == "float32" else \
            self.params.buffer.astype(_bfloat16())
        if OPTIMIZERS[name].definition.segmented:  # (LAMB: the tensors' layout)
            options = {"segments": SegmentTable.of(self.params), **options}
        return ready_to_step(OPTIMIZERS[name], buf, schedule, **BENCH_OPTIONS[name],
                             **options), buf

    def torch(self, name: str, mode: str, steps: int, lr: float = 1e-3):
        return torch_setup(name, self.params.views, self.grads.views, mode, steps, lr)


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def fastopt_torch_setup(name: str, values: list[np.ndarray], grads: list[np.ndarray],
                        schedule, multi_tensor: bool = False):
    """fastopt.torch's class of ``name`` over these tensors with the in-kernel schedule
    (``multi_tensor``: its multi-tensor mode, a kernel call per tensor): (step closure,
    params)."""
    import torch

    import fastopt.torch as fot

    params = []
    for v, g in zip(values, grads, strict=True):
        p = torch.nn.Parameter(torch.from_numpy(v.copy()))
        p.grad = torch.from_numpy(g)
        params.append(p)
    opt = getattr(fot, OPTIMIZERS[name].__name__)(params, lr=schedule, **BENCH_OPTIONS[name],
                                                  multi_tensor=multi_tensor)
    return opt.step, params


def check_agreement(name: str, shapes: list[tuple[int, ...]] | int, steps: int = 3) -> float:
    """Relative max error of fastopt vs torch (fused where it exists) after a few steps; for
    an optimizer with a matrix stage (Muon), of fastopt.torch's class (its stage is torch's)."""
    problem = Problem([(shapes,)] if isinstance(shapes, int) else shapes)
    if OPTIMIZERS[name].definition.matrix is not None:
        step_ours, ours = fastopt_torch_setup(name, problem.params.views, problem.grads.views,
                                              schedules.cosine(1e-3, 100))
        step, params = problem.torch(name, torch_modes(name)[0], 100)
        for _ in range(steps):
            step_ours()
            step()
        return max(float((a - b).abs().max() / b.abs().max())
                   for a, b in zip((p.detach() for p in ours), (p.detach() for p in params),
                                   strict=True))
    opt, buf = problem.fastopt(name, schedules.cosine(1e-3, 100))
    if not torch_modes(name):
        raise RuntimeError(f"{name} has no torch twin and its oracle is not installed")
    step, params = problem.torch(name, torch_modes(name)[0], 100)
    for _ in range(steps):
        opt.step(problem.grads.buffer)
        step()
    err = 0.0
    if callable(params):  # a native oracle's current values (numpy arrays)
        params = params()
    for offset, p in zip(problem.params.offsets, params, strict=True):
        theirs = np.asarray(p.detach() if hasattr(p, "detach") else p).ravel()
        ours = buf[offset:offset + theirs.size]
        err = max(err, float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30)))
    return err


@njit(cache=True, parallel=True, nogil=True)
def copy_traffic_four_pass_1r_1r_1r_2r1w(a, b):
    """Same traffic as an Adafactor step (four passes): read b; read a; read b; read a, b,
    write a (the sums keep the reads alive)."""
    s1 = 0.0
    for i in prange(a.shape[0]):
        s1 += b[i]
    s2 = 0.0
    for i in prange(a.shape[0]):
        s2 += a[i]
    s3 = 0.0
    for i in prange(a.shape[0]):
        s3 += b[i] * b[i]
    scale = np.float32((s1 + s2 + s3) * 1e-30)
    for i in prange(a.shape[0]):
        a[i] = a[i] + scale * b[i]


def _median_times(impls: dict[str, Callable[[], None]], budget_s: float,
                  block_s: float = 2e-3) -> dict[str, float]:
    """Median time per call. Each round runs every implementation once as a block of calls
    (>= ``block_s`` long, so one call's wake-up after another library's threads spun down is
    amortised as in a training loop), and rounds interleave so machine noise hits all alike."""
    reps = {}
    for k, fn in impls.items():  # warm up (and compile), then size the blocks
        fn()
        t0 = time.perf_counter()
        fn()
        reps[k] = max(1, min(1000, int(block_s / max(time.perf_counter() - t0, 1e-7))))
    t0 = time.perf_counter()
    for k, fn in impls.items():
        for _ in range(reps[k]):
            fn()
    per_round = max(time.perf_counter() - t0, 1e-7)
    rounds = int(min(max(budget_s / per_round, 5), 500))
    samples = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            n = reps[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_case(name: str, case: str, shapes: list[tuple[int, ...]], budget_s: float,
               with_torch: bool = True, state_dtypes: tuple[str, ...] = (),
               master_weights: tuple[str, ...] = (), multi_tensor: bool = False) -> Row:
    """Time fastopt (one packed buffer, float32 state), torch's paths (these tensors) and the
    roofline; with ``state_dtypes`` also fastopt with those state formats ('bfloat16':
    ``fastopt-bf16-state``; 'int8': ``fastopt-int8-state`` and its own roofline,
    ``roofline-int8``), where the optimizer takes them; with ``master_weights`` also fastopt
    over bfloat16 params and grads keeping their float32 values that way
    (``fastopt-bf16-params-<mode>``), with float32 state and each of ``state_dtypes``
    (``fastopt-bf16-params-<mode>-<format>-state``); with ``multi_tensor`` also
    fastopt.torch over these tensors in its flat mode and its multi-tensor mode
    (``fastopt.torch``, ``fastopt.torch-multi-tensor``)."""
    problem = Problem(shapes, seed=len(shapes))
    sched = schedules.cosine(1e-3, 10_000, end_lr=1e-5)
    opt, _ = problem.fastopt(name, sched)
    grads = problem.grads.buffer
    impls: dict[str, Callable[[], None]] = {"fastopt": lambda: opt.step(grads)}
    d = OPTIMIZERS[name].definition
    for state_dtype in state_dtypes:
        if state_dtype == "float32" or d.factored is not None or (
                state_dtype == "int8" and d.int8_refusal is not None):
            continue
        other, _ = problem.fastopt(name, sched, state_dtype=state_dtype)
        label = {"bfloat16": "bf16"}.get(state_dtype, state_dtype)
        impls[f"fastopt-{label}-state"] = functools.partial(other.step, grads)
        if state_dtype == "int8":
            impls["roofline-int8"] = roofline_int8(name, problem.params.buffer.size)
    if master_weights:
        bf16_grads = grads.astype(_bfloat16())
    for mode in master_weights:
        for state_dtype in dict.fromkeys(("float32", *state_dtypes)):
            if (d.factored is not None and state_dtype != "float32") or (
                    state_dtype == "int8" and d.int8_refusal is not None):
                continue
            other, _ = problem.fastopt(name, sched, state_dtype=state_dtype,
                                       master_weights=mode, dtype="bfloat16")
            label = "" if state_dtype == "float32" else \
                f"-{ {'bfloat16': 'bf16'}.get(state_dtype, state_dtype)}-state"
            impls[f"fastopt-bf16-params-{mode}{label}"] = functools.partial(other.step,
                                                                            bf16_grads)
    n = problem.params.buffer.size
    if multi_tensor:
        for label, multi in (("fastopt.torch", False), ("fastopt.torch-multi-tensor", True)):
            impls[label] = fastopt_torch_setup(name, problem.params.views,
                                               problem.grads.views, sched, multi)[0]
    if with_torch:
        if OPTIMIZERS[name].definition.matrix is not None:  # the same stage as torch's
            impls["fastopt.torch"] = fastopt_torch_setup(
                name, problem.params.views, problem.grads.views, sched)[0]
        for mode in torch_modes(name):
            if mode == "forloop" and n > 20_000_000 and len(shapes) == 1:
                continue  # minutes of rounds for nothing new: foreach shows the same
            impls[mode if mode == "oracle" or torch_twin(name) is None
                  else "torch" if mode == "plain" else f"torch-{mode}"] = problem.torch(
                name, mode, 10_000)[0]
    if OPTIMIZERS[name].definition.matrix is not None:  # the core's stage alone (BLAS),
        # and its two elementwise passes alone (against the roofline)
        impls["stage"] = opt._prepared.matrix_stage
        impls["passes"] = functools.partial(opt._prepared.cpu_passes_only, grads,
                                            sched.table, 1)
    impls["roofline"] = roofline(name, n)
    size = sum(int(np.prod(s)) for s in shapes)
    return Row(name, case, size, len(shapes), _median_times(impls, budget_s))


def torch_on_huge_pages() -> None:
    """torch's CPU allocator on transparent huge pages for the comparison
    (``THP_MEM_ALLOC_ENABLE=1``, read at its allocations), unless the environment says
    otherwise. fastopt's buffers here are numpy's, which numpy madvises for huge pages;
    torch's lazily made state lay on 4 KB pages, which made up most of fastopt's lead over
    torch fused at 1.6e7 (1.14-1.18x, against 1.02-1.03x with torch's state on huge pages
    too: bench/NOTES.md, twenty-third session). ``THP_MEM_ALLOC_ENABLE=0`` times torch as
    it allocates by default."""
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def machine() -> dict:
    import os

    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch_huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}
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
    head = ["optimizer", "case", "params", "fastopt ms", "GB/s"] + \
        [f"{k} ms" for k in impls if k != "fastopt"] + \
        [f"vs {k}" for k in impls if k not in ("fastopt", "roofline")] + ["% roofline"]
    lines = [head]
    for r in rows:
        t = r.times
        ours = t["fastopt"]
        line = [r.optimizer, r.case, f"{r.size:.3g}", f"{ours * 1e3:.3f}",
                f"{traffic(r.optimizer) * r.size / ours / 1e9:.1f}"]
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
            pts = [(r.size, traffic(name) * r.size / r.times[impl] / 1e9)
                   for r in sub if impl in r.times and r.tensors == 1]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=colors[impl], label=impl,
                        linestyle="--" if impl == "roofline" else "-")
            for r in sub:  # model shape lists: stars, labelled once
                if impl in r.times and r.tensors > 1:
                    ax.plot(r.size, traffic(name) * r.size / r.times[impl] / 1e9, marker="*",
                            markersize=11, color=colors[impl], linestyle="none")
                    if impl == "fastopt":
                        ax.annotate(r.case, (r.size, traffic(name) * r.size / r.times[impl]
                                             / 1e9), fontsize=7, xytext=(4, 4),
                                    textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(f"{name} (lines: one buffer; stars: model tensor lists)")
        ax.set_xlabel("parameters")
        ax.set_ylabel("GB/s (optimizer traffic / time)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(rows: list[Row], path: str, plot_path: str | None, command: str,
                   starting: list[startup.StartupRow] = ()) -> None:
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
        "Times are medians over interleaved rounds in one process (each round times a block "
        "of back-to-back calls per implementation); torch paths step their "
        "`CosineAnnealingLR` too (that is what a torch loop pays). `vs X` = X's time / fastopt's "
        "time (> 1: fastopt faster). `% roofline` = a same-traffic kernel with no arithmetic "
        "(the memory limit here) / fastopt's time. GB/s counts the optimizer's own traffic "
        f"({traffic_text()}). torch's allocations "
        + ("on transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`), as fastopt's (numpy's). "
           if info.get("torch_huge_pages") else "on torch's default (4 KB) pages, fastopt's "
           "(numpy's) on huge pages where the kernel grants them. ")
        + "The machine is shared: compare ratios within a row, not absolute times across "
        "runs.",
        "",
    ]
    if rows:
        lines += ["```", format_table(rows), "```", ""]
        summary = matrix_summary(rows)
        if summary:
            lines += ["Optimizers with a matrix stage (Muon; the `stage` column is the core's "
                      "float32 Newton-Schulz alone, `passes` its two fused elementwise passes "
                      "alone, `roofline` their traffic only):", "",
                      *(f"- {line}" for line in summary), ""]
    if starting:
        lines += [
            "Start-up, seconds, medians over fresh processes (`fastopt/startup.py`): `import "
            "fastopt`, then the first `step()` (cosine schedule) with an empty Numba cache "
            "(`cold`: it compiles) and with a warm one (`warm`: it loads the kernel from disk), "
            "at 1e3 params (the kernel's serial loop runs) and 1e5 (its parallel loop runs). "
            "Numba's first dispatch of any jitted function imports scipy when scipy is "
            "installed; the 'scipy hidden' columns, present only then, show the step without "
            "that import.",
            "",
            "```", startup.format_table(starting), "```", ""]
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(path)))
        lines += [f"![throughput vs size]({rel})", ""]
    lines += kept_gpu_section(path)
    with open(path, "w") as f:
        f.write("\n".join(lines))


GPU_HEADING = "## GPU"


def kept_gpu_section(path: str) -> list[str]:
    """The lines from the page's ``## GPU`` heading on (results that bench/gpu_check.py
    recorded on a lent card), so that regenerating the CPU results keeps them."""
    try:
        with open(path) as f:
            old = f.read().splitlines()
    except FileNotFoundError:
        return []
    starts = [i for i, line in enumerate(old) if line.startswith(GPU_HEADING)]
    return old[starts[0]:] + [""] if starts else []


def plan(optimizers: list[str], sizes: list[int], models: list[str]):
    """[(optimizer, case label, shapes)] in the order they run. An optimizer of matrices
    (Muon) runs on each model's hidden matrices only (``load_shapes``), not on flat sizes."""
    cases = [(f"{n:.3g}", [(n,)]) for n in sizes]
    for model in models:
        label, shapes = load_shapes(model)
        cases.append((label, shapes))
    matrix_cases = [load_shapes(model, hidden_matrices=True) for model in models]
    return [(name, label, shapes) for name in optimizers
            for label, shapes in (cases if OPTIMIZERS[name].definition.matrix is None
                                  else [c for c in matrix_cases if c[1]])]


def matrix_summary(rows: list[Row]) -> list[str]:
    """One line per case of an optimizer with a matrix stage (Muon): fastopt.torch against
    torch (the same bf16 stage; fastopt fuses the rest), and the core's step with the share
    its float32 stage (BLAS) takes."""
    lines = []
    for r in rows:
        t = r.times
        if "stage" not in t:
            continue
        line = f"{r.optimizer} on {r.case} ({r.tensors} matrices, {r.size:.3g} params): "
        if "fastopt.torch" in t and "torch" in t:
            ratio = t["torch"] / t["fastopt.torch"]
            line += (f"fastopt.torch {t['fastopt.torch'] * 1e3:.1f} ms vs torch.optim "
                     f"{t['torch'] * 1e3:.1f} ms per step ({ratio:.2f}x); ")
        line += (f"core fastopt {t['fastopt'] * 1e3:.1f} ms per step, "
                 f"{100 * t['stage'] / t['fastopt']:.0f}% of it in the float32 "
                 "Newton-Schulz stage (BLAS)")
        if "passes" in t:
            line += (f"; its two fused passes alone {t['passes'] * 1e3:.2f} ms, "
                     f"{100 * t['roofline'] / t['passes']:.0f}% of their copy roofline")
        lines.append(line)
    return lines


def estimate_seconds(work, budget_s: float) -> float:
    """A rough duration: setup plus timing budget per case, more for big ones."""
    total = 0.0
    for name, _, shapes in work:
        n = sum(int(np.prod(s)) for s in shapes)
        impls = 2 + len(torch_modes(name))
        total += budget_s * impls / 2 + 1.0 + n * 2.5e-7 * impls
    return total


def run(optimizers: list[str], sizes: list[int], budget_s: float, json_path: str | None,
        plot_path: str | None, with_torch: bool = True, out=print,
        markdown_path: str | None = None, command: str = "fastopt bench",
        models: tuple[str, ...] = (), progress: bool = True,
        state_dtypes: tuple[str, ...] = (), startup_repeats: int = 0,
        master_weights: tuple[str, ...] = (), multi_tensor: bool = False) -> list[Row]:
    """Time every case, print the table, write what was asked; with ``startup_repeats`` > 0
    also measure start-up (import, cold and warm first step) in that many fresh processes."""
    work = plan(optimizers, sizes, list(models))
    minutes = estimate_seconds(work, budget_s) / 60 + startup_repeats * len(optimizers) * 0.15
    out(f"{len(work)} cases; about {minutes:.1f} min")
    for name in optimizers:  # (formats an optimizer has not: said, not silently dropped)
        d = OPTIMIZERS[name].definition
        for state_dtype in state_dtypes:
            if state_dtype != "float32" and d.factored is not None:
                out(f"{name}: no {state_dtype} state (its factored moments are float32 only)")
            elif state_dtype == "int8" and d.int8_refusal is not None:
                out(f"{name}: no int8 state ({d.int8_refusal})")
    if with_torch and work:
        import torch

        torch.set_num_threads(numba.get_num_threads())
        for name in optimizers:
            if not torch_modes(name):
                out(f"{name}: no torch twin and "
                    f"{ORACLES[OPTIMIZERS[name].__name__].requirement} is not installed: "
                    "timing fastopt and the roofline only")
                continue
            first = ("4096 params", [(64, 64)]) if OPTIMIZERS[name].definition.matrix \
                is not None else ("4099 params", 4099)
            checks = [first] + [(label, shapes) for n, label, shapes in work
                                if n == name and len(shapes) > 1]
            for label, shapes in checks[:2]:
                err = check_agreement(name, shapes)
                if not err <= 1e-5:
                    raise RuntimeError(f"{name} on {label}: fastopt and torch disagree (rel err "
                                       f"{err:.2e}); not timing a wrong result")
                out(f"check {name} on {label}: fastopt == torch.optim within {err:.1e}")
    rows = []
    bar = _progress(len(work)) if progress else None
    for name, label, shapes in work:
        rows.append(bench_case(name, label, shapes, budget_s, with_torch, state_dtypes,
                               master_weights, multi_tensor))
        if bar is not None:
            bar.set_postfix_str(f"{name} {label}")
            bar.update()
    if bar is not None:
        bar.close()
    if rows:
        out(format_table(rows))
        for line in matrix_summary(rows):
            out(line)
    starting = []
    if startup_repeats > 0:
        starting = startup.measure(optimizers, startup_repeats)
        out(f"start-up (medians of {startup_repeats} fresh processes):")
        out(startup.format_table(starting))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "rows": [asdict(r) | {"ratios": r.ratios()} for r in rows],
                       "startup": [asdict(r) for r in starting]}, f, indent=1)
        out(f"wrote {json_path}")
    if plot_path and rows:
        plot(rows, plot_path)
        out(f"wrote {plot_path}")
    if markdown_path:
        write_markdown(rows, markdown_path, plot_path if rows else None, command, starting)
        out(f"wrote {markdown_path}")
    return rows


def _progress(total: int):
    """A tqdm bar on stderr when tqdm is installed (the bench extra), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="case", leave=False)
