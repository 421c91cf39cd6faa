"""The CUDA kernels' math on the CPU: kernels/*.cu (generated from the definitions) built by
g++ with the CUDA built-ins emulated (tests/cuda_host/shim.h), called through ctypes with the
uniform signature of fastopt.algorithms._spec.KERNEL_SIGNATURE, and compared with the float64
reference and the Numba backend over many steps, for every definition in the registry."""

import ctypes
import fcntl
import hashlib
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from optimizer_cases import (
    CASES,
    all_options,
    full_hypers,
    initial_state,
    make,
    reference_run,
    schedule_for,
    shapes_for,
)

from fastopt import _bf16, _int8
from fastopt import schedules as S
from fastopt._int8 import quantize
from fastopt.algorithms import CLASSES, REGISTRY
from fastopt.algorithms._spec import (
    FACTORED_SIGNATURE,
    INT8_BLOCK,
    INT8_SIGNATURE,
    KERNEL_SIGNATURE,
    MULTI_SIGNATURE,
    MULTI_TABLE,
    SEGMENT_SIGNATURE,
)
from fastopt.codegen import HOST_BF16
from fastopt.engine import Prepared
from fastopt.gpu import build
from fastopt.gpu.launch import multi_tables, pack_args, segmented_passes
from fastopt.segments import SegmentTable

HERE = Path(__file__).parent / "cuda_host"
CTYPES = {"double": ctypes.c_double, "int": ctypes.c_int, "long long": ctypes.c_longlong}
#: kernel suffix -> the state's C type
STATE_C = {"": "float*", "_sbf16": "unsigned short*", "_int8": "unsigned char*"}


def _c_type(ctype: str, suffix: str, kernel: str = "") -> str:
    param = HOST_BF16 if kernel.endswith("_bf16") and not kernel.endswith("_sbf16") \
        else "float"
    return ctype.replace("T*", f"{param}*").replace("S*", STATE_C[suffix])


def _host_kernels():
    """(op, kernel, state suffix) of every float32 entry point, the elementwise kernels'
    bfloat16 ones (over the host build's stand-in type) and every entry point that takes no
    param format; multi-tensor launches (``_multi_``) as their single-tensor kernels."""
    for source, kernels in build.SOURCES.items():
        op = source[:-3]
        if op not in REGISTRY:
            continue
        for kernel in kernels:
            elementwise = not REGISTRY[op].segmented
            single = kernel.replace("_multi", "")
            if single.endswith("_int8_f32") or (elementwise and single.endswith("_int8_bf16")):
                yield op, kernel, "_int8"
            elif elementwise and single == f"{op}_bf16":
                yield op, kernel, ""
            elif single.endswith("_f32") or single.endswith("_f32_sbf16"):
                yield op, kernel, "_sbf16" if single.endswith("_sbf16") else ""
            elif not single.endswith(("_f16", "_bf16", "_f16_sbf16", "_bf16_sbf16")):
                yield op, kernel, ""


def _built_once(out: Path, cmd: list[str], tmp_path_factory) -> Path:
    """The library ``cmd`` (g++ without its ``-o``) builds, built once per content: keyed by
    the command, the wrappers, the shim and every kernel source, in the directory that
    pytest-xdist's workers share (a lock makes the second worker wait for the first's build
    instead of repeating its ~15 s)."""
    digest = hashlib.sha256("\0".join(cmd[:-1]).encode())
    for path in [Path(cmd[-1]), HERE / "shim.h",
                 *sorted(Path(build.kernel_dir()).iterdir())]:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' common root (this run's only)
        shared = shared.parent
    so = shared / f"cuda_host_{digest.hexdigest()[:16]}.so"
    with open(f"{so}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not so.exists():
            partial = out / "kernels_host.so"
            result = subprocess.run([*cmd, "-o", str(partial)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            os.replace(partial, so)
    return so


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the kernels for the CPU")
    out = tmp_path_factory.mktemp("cuda_host")
    lines = [f'#include "{name}"' for name in sorted(build.SOURCES)]
    for op, kernel, suffix in _host_kernels():
        signature = _signature(op, suffix, kernel)
        params = ", ".join(f"{_c_type(t, suffix, kernel)} {n}" for n, t in signature)
        names = ", ".join(n for n, _ in signature)
        # factored moments' passes wait on each other's threads, int8 state's warps shuffle
        # (cooperative threads, barriers)
        launch = "fo_emulate_launch_threads" if REGISTRY[op].factored is not None \
            or suffix == "_int8" else "fo_emulate_launch"
        lines.append(f'extern "C" void emulate_{kernel}(unsigned grid, unsigned block, '
                     f'{params}) {{ {launch}(grid, block, [&] {{ {kernel}({names}); }}); }}')
    # the driver's gradient-norm kernels (kernels/control.cu)
    lines += [
        'extern "C" void emulate_grad_sq(unsigned grid, unsigned block, const float* g, '
        'long long n, double* partial) { fo_emulate_launch(grid, block, [&] { '
        'fo_grad_sq_f32(g, n, partial); }); }',
        'extern "C" void emulate_grad_control(unsigned block, const double* partial, '
        'long long parts, double mult, double max_norm, int skip, double* norm, '
        'double* control) { fo_emulate_launch(1, block, [&] { fo_grad_control(partial, '
        'parts, mult, max_norm, skip, norm, control); }); }']
    (out / "wrappers.cpp").write_text("\n".join(lines) + "\n")
    so = _built_once(out, ["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared",
                           "-Wall", "-Werror", "-Wno-unknown-pragmas", "-include",
                           str(HERE / "shim.h"), f"-I{build.kernel_dir()}",
                           str(out / "wrappers.cpp")], tmp_path_factory)
    library = ctypes.CDLL(str(so))
    for op, kernel, suffix in _host_kernels():
        fn = getattr(library, f"emulate_{kernel}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [CTYPES.get(t, ctypes.c_void_p)
                                                        for _, t in _signature(op, suffix,
                                                                               kernel)]
        fn.restype = None
    return library


def _signature(op: str, suffix: str = "", kernel: str = ""):
    """The kernel's (name, C type) arguments: a tensor-aware one takes the segment tables,
    factored moments their tables too, an int8-state one its block scales, a multi-tensor
    launch its tables."""
    d = REGISTRY[op]
    return (KERNEL_SIGNATURE + (SEGMENT_SIGNATURE if d.segmented else ())
            + (FACTORED_SIGNATURE if d.factored is not None else ())
            + (INT8_SIGNATURE if suffix == "_int8" else ())
            + (MULTI_SIGNATURE if "_multi_" in kernel else ()))


class HostRun:
    """One optimizer's buffers as a device would hold them (step counter and lr output
    included), stepped by the host-built CUDA kernel; packed by fastopt.engine.Prepared."""

    def __init__(self, lib, cls, hypers, n, grid, block, offset, schedule, rng,
                 state_bf16=False, shapes=None, int8=False):
        d, _ = CLASSES[cls]
        self.lib, self.op, self.grid, self.block = lib, d.name, grid, block
        self.suffix = "_sbf16" if state_bf16 else ""
        self.kernel = f"emulate_{d.name}_int8_f32" if int8 else \
            f"emulate_{d.name}_f32{self.suffix}"
        full = full_hypers(cls, hypers)
        base = np.zeros(n + offset + 16, np.float32)
        if int8:  # (64-byte aligned: the int8 kernels' vector path for whole blocks)
            base = base[(-base.ctypes.data % 64) // 4:]
        self.params = base[offset:offset + n]
        self.params[...] = rng.standard_normal(n)
        self.states = {}
        self.segments = SegmentTable.contiguous(shapes or shapes_for(d.name, n)) \
            if d.segmented else None
        start = initial_state(d, full, self.params, schedule, shapes)
        for name in d.active_state(full):
            size = d.state_size(name, n, self.segments)  # (factored: by the layout)
            value = np.zeros(size) if start.get(name) is None else start[name]  # (None: fresh)
            if int8:  # (the quantised starting values)
                self.states[name] = quantize(np.broadcast_to(value, (size,)).astype(
                    np.float32), _int8.signed(d, name))
                continue
            buf = np.zeros(size + offset, np.uint16 if state_bf16 else np.float32)[offset:]
            buf[...] = _bf16.encode(value.astype(np.float32)) if state_bf16 else value
            self.states[name] = buf
        self.scalars = {s.name: np.full(1, s.init) for s in d.scalars}
        self.prepared = Prepared(d, self.params, None, self.states, full, "float32",
                                 on_gpu=True, scalars=self.scalars, segments=self.segments)
        self.table = np.ascontiguousarray(schedule.table)
        self.step_state, self.lr_out = np.zeros(2, np.uint64), np.zeros(1)

    def step(self, grads_f32, control=None):
        """One step; ``control``: the device's (clip factor, skip flag), else none."""
        values = self.prepared.kernel_values(
            grads_f32, self.table, self.table.shape[0], self.step_state, self.lr_out, 1.0, 1.0,
            fresh=self.step_state[0] == 0, control=control)
        args = [a.ctypes.data if isinstance(a, np.ndarray) else a.item()
                for a in pack_args(values)]
        if self.segments is None:
            getattr(self.lib, self.kernel)(self.grid, self.block, *args)
            return
        # the launcher's passes (a block per chunk, tile or tensor; a thread per factor)
        for stem, typed, grid, block in segmented_passes(self.op, values, self.block):
            if stem is None:  # the host's matrix stage, between launches
                if self.prepared.definition.matrix is not None:
                    self.prepared.matrix_stage()
                continue
            kernel = f"{stem}_f32{self.suffix}" if typed else stem
            getattr(self.lib, f"emulate_{kernel}")(grid, block, *args)


SCHEDULES = [S.constant(0.01), S.warmup(S.cosine(0.02, 40, end_lr=1e-4), 7),
             S.cyclic(0.001, 0.02, 5, mode="triangular2"), S.one_cycle(0.02, 60, three_phase=True)]
LAUNCHES = [(1, 1), (3, 4), (2, 32)]  # (grid, block): grid-stride with many and few threads
LAYOUTS = list(itertools.product(range(len(SCHEDULES)), LAUNCHES, [0, 1]))  # offset 1: scalar
OPTIONS = all_options()


def _cases():
    for i, (name, cls, _) in enumerate(OPTIONS):
        if name not in REGISTRY:
            continue
        for j in range(4):  # 4 of the 24 layouts per option, a different 4 for each
            sched, launch, offset = LAYOUTS[(5 * i + 7 * j) % len(LAYOUTS)]
            yield pytest.param(i, sched, launch, offset,
                               id=f"{cls}{i}-s{sched}-g{launch[0]}b{launch[1]}-o{offset}")


def _grads(rng, n, steps):
    return [(rng.standard_normal(n) * np.exp(rng.uniform(-3, 1))).astype(np.float32)
            for _ in range(steps)]


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.max(np.abs(b))))


@pytest.mark.parametrize("option,sched,launch,offset", list(_cases()))
def test_kernel_math(lib, option, sched, launch, offset):
    """The host-built CUDA kernel against the Numba backend and the float64 reference."""
    name, cls, hypers = OPTIONS[option]
    rng = np.random.default_rng(option * 10 + sched + offset)
    n, steps, schedule = 203, 60, schedule_for(name, SCHEDULES[sched])
    if name == "adadelta":  # its lr multiplies a unit-scale update: take lrs near 1
        schedule = _scaled(schedule, 50.0)
    run = HostRun(lib, cls, hypers, n, *launch, offset, schedule, rng)
    p0 = run.params.copy()
    p_cpu = p0.copy()
    cpu = make(cls, p_cpu, lr=schedule, **hypers)
    grads = _grads(rng, n, steps)
    for k, g in enumerate(grads, start=1):
        run.step(g)
        cpu.step(g)
        assert run.step_state[0] == k and run.step_state[1] == 0
        np.testing.assert_allclose(run.lr_out[0], cpu.last_lr, rtol=1e-14)
    _close(run.params, p_cpu)
    want_p, want_state = reference_run(cls, hypers, p0, grads, schedule)
    _close(run.params, want_p)
    for key, buf in run.states.items():
        _close(buf, want_state[key])
    for key, value in run.scalars.items():
        np.testing.assert_allclose(value[0], want_state[key], rtol=1e-12)


def _scaled(schedule, factor):
    """The schedule with every lr column multiplied (Adadelta's lr is near 1)."""
    table = schedule.table.copy()
    for row in table:
        kind = int(row[0])
        for col, (_, rule) in enumerate(S.ROW_RULES[kind]):
            if rule == "lr" and col in (0, 1) or (kind == S.LADDER and col == 3):
                row[3 + col] *= factor
    return S.Schedule(table, f"{schedule!r} x {factor}")


def test_schedule_header_equals_at(lib):
    """lr_at in schedule.cuh, through the kernels' lr_out, for every kind at far steps too."""
    rng = np.random.default_rng(0)
    kinds = [S.linear(0.1, 50), S.polynomial(0.1, 50, 2.0), S.inverse_time(0.1, 7, 0.5, True),
             S.exponential(0.1, 0.9, 3), S.step(0.1, 9), S.multistep(0.1, [5, 9, 9]),
             S.ladder(0.1, 0.01, 4, 0.02), S.cosine_restarts(0.1, 3, 2, 0.001),
             S.cyclic(0.01, 0.1, 4, 6, "exp_range", 0.99), *SCHEDULES]
    for schedule in kinds:
        run = HostRun(lib, "Adagrad", {}, 8, 1, 1, 0, schedule, rng)
        for start in (0, 1000, 2**31 + 5):
            run.step_state[0] = start
            for k in range(start + 1, start + 40):
                run.step(rng.standard_normal(8).astype(np.float32))
                np.testing.assert_allclose(run.lr_out[0], schedule.at(k - 1),
                                           rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if REGISTRY[n].factored is None])
@pytest.mark.parametrize("grid,block,offset", [(1, 1, 0), (3, 4, 1), (2, 32, 0)])
def test_bf16_state_kernels_match_the_numba_backend(lib, name, grid, block, offset):
    """bfloat16 state with stochastic rounding: the same seeds and bits as the CPU kernels."""
    cls, hypers = CASES[name].options[-1]  # the last option uses every state buffer
    rng = np.random.default_rng(7)
    n, schedule = 203, schedule_for(name, SCHEDULES[1])
    run = HostRun(lib, cls, hypers, n, grid, block, offset, schedule, rng, state_bf16=True)
    p_cpu = run.params.copy()
    cpu = make(cls, p_cpu, lr=schedule, state_dtype="bfloat16", **hypers)
    for g in _grads(rng, n, 40):
        run.step(g)
        cpu.step(g)
    _close(run.params, p_cpu)
    assert run.states
    for key, buf in run.states.items():
        ours = _bf16.decode(buf)
        theirs = cpu.state_dict()[key]
        np.testing.assert_allclose(ours, theirs, rtol=2e-2, atol=1e-6 * np.max(np.abs(theirs)))
        # the same stochastic rounding bits: most elements are bit-identical
        assert np.mean(buf == cpu.state[key]) > 0.9, key


# (every int8 optimizer on one launch shape; a second shape, several blocks per launch, on
# three whose state differs most: conditional, two optional, first-gradient: CI's time)
@pytest.mark.parametrize("name,grid,block", [
    *((n, 1, 32) for n in sorted(REGISTRY) if REGISTRY[n].int8_refusal is None),
    ("adam", 2, 64), ("rmsprop", 2, 64), ("sgd", 2, 64)])
def test_int8_state_kernels_match_the_numba_backend(lib, name, grid, block):
    """int8 state: the CUDA kernel (a warp per block, absmax by shuffles) decodes, updates
    and encodes as the Numba kernel does, with the same stochastic-rounding bits: the params
    agree to float32 rounding, and almost every code is identical (a value an ulp away may
    round to the next code)."""
    cls, hypers = CASES[name].options[-1]  # the last option uses every state buffer
    rng = np.random.default_rng(8)
    n, schedule = 700, schedule_for(name, SCHEDULES[1])  # (3 blocks, the last partial)
    run = HostRun(lib, cls, hypers, n, grid, block, 0, schedule, rng, int8=True)
    p_cpu = run.params.copy()
    cpu = make(cls, p_cpu, lr=schedule, state_dtype="int8", **hypers)
    for key, state in run.states.items():
        cpu.state[key].codes[...] = state.codes
        cpu.state[key].absmax[...] = state.absmax
    for g in _grads(rng, n, 30):
        run.step(g)
        cpu.step(g)
    _close(run.params, p_cpu)
    assert run.states
    for key, state in run.states.items():
        ours, theirs = cpu.state[key], state
        np.testing.assert_allclose(ours.absmax, theirs.absmax, rtol=1e-5)
        assert np.mean(ours.codes == theirs.codes) > 0.99, key
        assert np.all(np.abs(ours.codes.astype(int) - theirs.codes) <= 1) or \
            _int8.signed(REGISTRY[name], key), key


@pytest.mark.parametrize("case", ["finite", "clipped", "nan", "inf"])
def test_gradient_norm_and_control_kernels(lib, case):
    """kernels/control.cu: the norm of the gradients (times mult), torch's clip coefficient
    and the skip flag, against numpy in float64."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal(5003).astype(np.float32) * (0.01 if case == "finite" else 3.0)
    if case == "nan":
        g[17] = np.nan
    if case == "inf":
        g[4000] = np.inf
    grid, block, fold = 3, 32, 2  # (fewer last-pass threads than partials: strided)
    partial = np.full(grid + 1, 7.0)  # (one slot more than the grid: never read)
    norm, control = np.zeros(1), np.zeros(2)

    def ptr(a):
        return a.ctypes.data_as(ctypes.c_void_p)

    lib.emulate_grad_sq(grid, block, ptr(g), ctypes.c_longlong(g.size), ptr(partial))
    assert partial[grid] == 7.0 and np.isnan(partial[:grid]).any() == (case == "nan")
    lib.emulate_grad_control(fold, ptr(partial), ctypes.c_longlong(grid), ctypes.c_double(0.5),
                             ctypes.c_double(1.0), 1, ptr(norm), ptr(control))
    want = np.sqrt(np.sum(g.astype(np.float64) ** 2)) * 0.5
    if np.isfinite(want):
        np.testing.assert_allclose(norm[0], want, rtol=1e-12)
        coef = 1.0 / (want + 1e-6)
        assert control[0] == pytest.approx(min(coef, 1.0), rel=1e-12)
        assert control[1] == 0.0
    else:
        assert not np.isfinite(norm[0]) and control[1] == 1.0


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if REGISTRY[n].segmented])
@pytest.mark.parametrize("block", [1, 32])
def test_tensor_aware_kernels_over_many_chunks(lib, name, block):
    """Tensors of several chunks (the reduce pass's per-chunk sums, the segment pass adding
    them in order): the host-built CUDA passes equal the Numba backend."""
    cls, hypers = CASES[name].options[-1]
    rng = np.random.default_rng(11)
    n = 70_000  # (segment_shapes: its last tensor spans three chunks)
    run = HostRun(lib, cls, hypers, n, 1, block, 0, SCHEDULES[1], rng)
    assert run.segments.chunks.shape[0] > len(run.segments)
    p_cpu = run.params.copy()
    cpu = make(cls, p_cpu, lr=SCHEDULES[1], **hypers)
    for g in _grads(rng, n, 5):
        run.step(g)
        cpu.step(g)
    _close(run.params, p_cpu)


#: tensors that take every path of the factored statistics (SegmentTable.gpu_plan): row tiles
#: and strips (300 x 260: 3 x 2 tiles), a partial strip (5 x 600), tall and narrow (2000 x 3:
#: rows of 3 columns, a warp each), rows enough for a block's row mean (300 x 70), batched
#: matrices tiled (3 x 40 x 50) and small (9 x 2 x 3: a thread each), empty ones, a vector
#: and a scalar
FACTORED_SHAPES = [(300, 260), (5, 600), (2000, 3), (300, 70), (3, 40, 50), (9, 2, 3), (0, 5),
                   (4, 0), (50,), ()]


@pytest.mark.parametrize("option,block,row_tiles", [(0, 32, None), (1, 64, None),
                                                    (2, 32, None), (2, 1, 2)])
def test_factored_kernels_over_tiles(lib, block, option, row_tiles, monkeypatch):
    """Factored moments' six passes (kernels/factored.cuh: tiles, folds, row means; the
    threads of a block synchronised for real, warps of 1 or 32 lanes, one or two warps)
    equal the Numba backend and the float64 reference on tensors that take every path."""
    from fastopt import segments
    from fastopt.segments import SegmentTable

    cls, hypers = CASES["adafactor"].options[option]
    if row_tiles is not None:  # (a cap on the row tiles, taller tiles for tall matrices)
        monkeypatch.setattr(segments, "MAX_ROW_TILES", row_tiles)
    rng = np.random.default_rng(5 + option)
    table = SegmentTable.contiguous(FACTORED_SHAPES)
    fold, tiles, means, _, _ = table.gpu_plan()
    assert (fold[:, 1] > 1).any() and (fold[:, 3] > 1).any()  # strips and row tiles
    assert row_tiles is None or fold[:, 3].max() == row_tiles
    assert (tiles[:, 3] < 0).any() and (means[:, 2] - means[:, 1] > 1).any()
    n = table.size
    run = HostRun(lib, cls, hypers, n, 1, block, 0, SCHEDULES[1], rng, shapes=FACTORED_SHAPES)
    p0 = run.params.copy()
    p_cpu = p0.copy()
    cpu = make(cls, p_cpu, lr=SCHEDULES[1], segments=FACTORED_SHAPES, **hypers)
    grads = _grads(rng, n, 6)
    for g in grads:
        run.step(g)
        cpu.step(g)
    _close(run.params, p_cpu)
    want_p, want_state = reference_run(cls, hypers, p0, grads, SCHEDULES[1],
                                       shapes=FACTORED_SHAPES)
    _close(run.params, want_p)
    for key, buf in run.states.items():
        _close(buf, cpu.state[key])
        # (an empty matrix's factors: 0 here and on the CPU, the reference's NaN means of
        # nothing, as torch's)
        finite = np.isfinite(want_state[key])
        assert finite.sum() >= buf.size - 5  # ((4, 0)'s rows, (0, 5)'s columns)
        _close(buf[finite], want_state[key][finite])


def test_factored_kernels_clip_and_skip(lib):
    """Every one of the six passes reads the device's control: a clip factor scales the
    gradient as the CPU's step of the scaled gradient does (exactly: 0.5), a skip flag
    leaves params, factors, sums and the step counter as they were."""
    cls, hypers = CASES["adafactor"].options[1]  # (maximize and weight decay: the sign too)
    rng = np.random.default_rng(17)
    n = sum(int(np.prod(s)) for s in FACTORED_SHAPES)
    run = HostRun(lib, cls, hypers, n, 1, 32, 0, SCHEDULES[1], rng, shapes=FACTORED_SHAPES)
    p_cpu = run.params.copy()
    cpu = make(cls, p_cpu, lr=SCHEDULES[1], segments=FACTORED_SHAPES, **hypers)
    clip, skip = np.array([0.5, 0.0]), np.array([1.0, 1.0])
    for g in _grads(rng, n, 3):
        run.step(g, control=clip)
        cpu.step(g * np.float32(0.5))
    np.testing.assert_array_equal(run.params, p_cpu)
    before = [run.params.copy(), *(b.copy() for b in run.states.values()),
              run.step_state.copy(), run.lr_out.copy()]
    run.step(_grads(rng, n, 1)[0] * np.float32(1e3), control=skip)
    after = [run.params, *run.states.values(), run.step_state, run.lr_out]
    for was, now in zip(before, after, strict=True):
        np.testing.assert_array_equal(now, was)


def _host_bf16_step(lib, name, cls, hypers, params, master, states, grads, k, schedule,
                    int8=False):
    """Step k of the host-built CUDA kernel ``<name>[_int8]_bf16`` over bfloat16 bits."""
    d, _ = CLASSES[cls]
    prepared = Prepared(d, params, master, states, full_hypers(cls, hypers), "bfloat16",
                        on_gpu=True)
    table = np.ascontiguousarray(schedule.table)
    step_state = np.array([k - 1, 0], np.uint64)
    values = prepared.kernel_values(grads, table, table.shape[0], step_state, np.zeros(1),
                                    1.0, 1.0, fresh=k == 1)
    args = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in pack_args(values)]
    getattr(lib, f"emulate_{name}{'_int8' * int8}_bf16")(2, 64, *args)


@pytest.mark.parametrize("name,int8", [("adam", False), ("adam", True), ("rmsprop", False)])
def test_bfloat16_param_kernels_in_every_master_mode(lib, name, int8):
    """The CUDA kernels over bfloat16 params (the host build's stand-in type): with
    remainders the master is the float32 master's bit for bit and the params its rounding
    with ties away from zero; without a master the params are rounded stochastically with
    the Numba kernel's random bits."""
    cls, hypers = CASES[name].options[-1]
    rng = np.random.default_rng(11)
    n, schedule = 700, S.constant(0.01)
    start = rng.standard_normal(n).astype(np.float32)
    bits0 = _bf16.encode(start)
    grads = [_bf16.encode(rng.standard_normal(n).astype(np.float32)) for _ in range(4)]
    d, _ = CLASSES[cls]
    full = full_hypers(cls, hypers)
    init = initial_state(d, full, _bf16.decode(bits0), schedule)

    def fresh_states():
        out = {}
        for key in d.active_state(full):
            value = np.zeros(n) if init.get(key) is None else init[key]
            value = np.broadcast_to(value, (n,)).astype(np.float32)
            out[key] = quantize(value, _int8.signed(d, key)) if int8 else value.copy()
        return out

    runs = {}
    for mode in ("fp32", "remainder", "none"):
        bits = bits0.copy()
        master = {"fp32": _bf16.decode(bits0).copy(), "remainder": np.zeros(n, np.int16),
                  "none": None}[mode]
        states = fresh_states()
        for k, g in enumerate(grads, start=1):
            _host_bf16_step(lib, name, cls, hypers, bits, master, states, g, k, schedule, int8)
        runs[mode] = bits, master
    master = runs["fp32"][1]
    bits, remainder = runs["remainder"]
    np.testing.assert_array_equal(_bf16.join_remainder(bits, remainder).view(np.uint32),
                                  master.view(np.uint32))
    np.testing.assert_array_equal(bits, _bf16.split_master(master)[0])
    np.testing.assert_array_equal(runs["fp32"][0], _bf16.encode(master))
    # no master: as the Numba kernel, with the same random bits
    cpu = make(cls, _bf16.decode(bits0).astype(_bf16_dtype()), lr=schedule,
               master_weights="none", state_dtype="int8" if int8 else "float32", **hypers)
    if int8:
        for key, state in fresh_states().items():
            cpu.state[key].codes[...] = state.codes
            cpu.state[key].absmax[...] = state.absmax
    for g in grads:
        cpu.step(g.view(_bf16_dtype()))
    ours = cpu.params.view(np.uint16)
    assert np.mean(ours == runs["none"][0]) > 0.98
    assert np.all(np.abs(ours.astype(np.int32) - runs["none"][0]) <= 1)
    # params set to +-0 in place without refresh_master(), their remainders stale (negative
    # ones made the joined master a NaN): the CUDA and the Numba kernel alike, no NaN
    bits, remainder = runs["remainder"][0].copy(), runs["remainder"][1].copy()
    bits[remainder < 0] &= np.uint16(0x8000)
    host_bits, host_remainder = bits.copy(), remainder.copy()
    _host_bf16_step(lib, name, cls, hypers, host_bits, host_remainder, fresh_states(),
                    grads[0], 1, schedule, int8)
    cpu = make(cls, bits.view(_bf16_dtype()).copy(), lr=schedule, master_weights="remainder",
               state_dtype="int8" if int8 else "float32", **hypers)
    cpu.state["master_remainder"][...] = remainder
    if int8:
        for key, state in fresh_states().items():
            cpu.state[key].codes[...] = state.codes
            cpu.state[key].absmax[...] = state.absmax
    cpu.step(grads[0].view(_bf16_dtype()))
    np.testing.assert_array_equal(cpu.params.view(np.uint16), host_bits)
    np.testing.assert_array_equal(cpu.state["master_remainder"], host_remainder)
    assert not np.isnan(_bf16.decode(host_bits)).any()


def _bf16_dtype():
    import ml_dtypes

    return ml_dtypes.bfloat16


MULTI_SIZES = [700, 1, 0, 203, 1500]  # (int8: partial blocks; an empty tensor; chunks of 512)


def _multi_case(d, cls, hypers, state, params_format, master_weights, seed, steps):
    """Buffers for MULTI_SIZES tensors (odd ones one element off alignment, but with int8
    state), as fastopt.engine.Prepared packs them, and each tensor's gradients."""
    rng = np.random.default_rng(seed)
    full = full_hypers(cls, hypers)
    schedule = schedule_for(d.name, SCHEDULES[1])
    tensors = []
    for t, n in enumerate(MULTI_SIZES):
        offset = 0 if state == "int8" else t % 2
        base = np.zeros(n + 64, np.float32)
        base = base[(-base.ctypes.data % 64) // 4:]
        values = rng.standard_normal(n).astype(np.float32)
        start = initial_state(d, full, values, schedule)
        states = {}
        for name in d.active_state(full):
            value = np.broadcast_to(np.zeros(n) if start.get(name) is None else start[name],
                                    (n,)).astype(np.float32)
            if state == "int8":
                states[name] = quantize(value.copy(), _int8.signed(d, name))
                continue
            buf = np.zeros(n + 1, np.uint16 if state == "bfloat16" else np.float32)
            buf = buf[offset:offset + n]
            buf[...] = _bf16.encode(value) if state == "bfloat16" else value
            states[name] = buf
        master = None
        if params_format == "bfloat16":
            params = np.zeros(n + 1, np.uint16)[offset:offset + n]
            params[...] = _bf16.encode(values)
            master = {"fp32": _bf16.decode(params).copy(), "remainder": np.zeros(n, np.int16),
                      "none": None}[master_weights]
            grads = [_bf16.encode(rng.standard_normal(n).astype(np.float32))
                     for _ in range(steps)]
        else:
            params = base[offset:offset + n]
            params[...] = values
            grads = [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]
        prepared = Prepared(d, params, master, states, full, params_format, on_gpu=True)
        tensors.append((params, master, states, grads, prepared))
    return tensors, schedule


@pytest.mark.parametrize("name,state,params_format,master_weights", [
    *((n, s, "float32", "fp32") for n in sorted(REGISTRY) if REGISTRY[n].multi_launch
      for s in ("float32", "bfloat16", "int8")
      if s != "int8" or REGISTRY[n].int8_refusal is None),
    ("adam", "float32", "bfloat16", "fp32"), ("adam", "float32", "bfloat16", "remainder"),
    ("adam", "int8", "bfloat16", "none"), ("sgd", "float32", "bfloat16", "none")])
def test_multi_tensor_launch_equals_a_launch_per_tensor(lib, name, state, params_format,
                                                        master_weights):
    """One launch over a table of tensors (MULTI_SIGNATURE: a block per chunk of a tensor)
    steps every tensor bit for bit as a launch over that tensor alone (its own element
    indices, so the same random bits for bfloat16 and int8 state and master-free params),
    advances the shared step counter once a step and reports the lr."""
    d = REGISTRY[name]
    cls, hypers = CASES[name].options[-1]  # the last option uses every state buffer
    steps, block, chunk = 5, 32, 2 * INT8_BLOCK
    suffix = {"float32": "", "bfloat16": "_sbf16", "int8": ""}[state]
    fmt = "_f32" if params_format == "float32" else "_bf16"
    int8 = "_int8" if state == "int8" else ""
    alone, schedule = _multi_case(d, cls, hypers, state, params_format, master_weights, 5,
                                  steps)
    together, _ = _multi_case(d, cls, hypers, state, params_format, master_weights, 5, steps)
    table = np.ascontiguousarray(schedule.table)
    counters = [np.zeros(2, np.uint64) for _ in alone]
    shared, lr_out = np.zeros(2, np.uint64), np.zeros(1)

    def address(values):
        return [a.ctypes.data if isinstance(a, np.ndarray) else a.item()
                for a in pack_args(values)]

    single = getattr(lib, f"emulate_{name}{int8}{fmt}{suffix}")
    multi = getattr(lib, f"emulate_{name}{int8}_multi{fmt}{suffix}")
    for k in range(1, steps + 1):
        for (_, _, _, grads, prepared), counter in zip(alone, counters, strict=True):
            values = prepared.kernel_values(grads[k - 1], table, table.shape[0], counter,
                                            np.zeros(1), 1.0, 1.0, fresh=k == 1)
            single(3, 64, *address(values))
        kernel_values = [prepared.kernel_values(grads[k - 1], table, table.shape[0], shared,
                                                lr_out, 1.0, 1.0, fresh=k == 1)
                         for _, _, _, grads, prepared in together]
        rows, chunks = multi_tables(kernel_values, chunk)
        assert rows.shape == (len(MULTI_SIZES), len(MULTI_TABLE))
        assert len(chunks) == sum(-(-n // chunk) for n in MULTI_SIZES)
        multi(len(chunks), block, *address(dict(kernel_values[0], tensors=rows,
                                                chunks=chunks)))
        assert list(shared) == [k, 0]
        assert lr_out[0] == schedule.at(k - 1)
    for (p, m, st, _, _), (q, m2, st2, _, _) in zip(alone, together, strict=True):
        np.testing.assert_array_equal(q.view(np.uint8), p.view(np.uint8))
        if m is not None:
            np.testing.assert_array_equal(m2.view(np.uint8), m.view(np.uint8))
        assert st.keys() == st2.keys() and st
        for key in st:
            a, b = st[key], st2[key]
            if state == "int8":
                np.testing.assert_array_equal(b.codes, a.codes)
                np.testing.assert_array_equal(b.absmax.view(np.uint32), a.absmax.view(np.uint32))
            else:
                np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))
    assert any(np.any(p != _bf16.encode(np.zeros(1))) for p, *_ in alone)  # (they moved)


def test_multi_tables_refuse_a_chunk_that_splits_int8_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        multi_tables([{"n": 10}], chunk=100)
