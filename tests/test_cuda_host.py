"""The CUDA kernels' math on the CPU: kernels/*.cu built by g++ with the CUDA built-ins emulated
(tests/cuda_host/shim.h), called through ctypes with the argument order of fastopt.gpu.launch,
and compared with the float64 reference and the Numba backend over many steps."""

import ctypes
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import _bf16, reference
from fastopt import schedules as S
from fastopt.gpu import build
from fastopt.gpu.launch import KERNEL_ARGS, pack_args

HERE = Path(__file__).parent / "cuda_host"
CTYPES = {"double": ctypes.c_double, "int": ctypes.c_int, "long long": ctypes.c_longlong}


STATE_C = {"": "float*", "_sbf16": "unsigned short*"}  # kernel suffix -> the state's C type


def _c_type(ctype: str, suffix: str) -> str:
    return ctype.replace("T*", "float*").replace("S*", STATE_C[suffix])


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the kernels for the CPU")
    out = tmp_path_factory.mktemp("cuda_host")
    lines = [f'#include "{name}"' for name in sorted(build.SOURCES)]
    for (op, args), suffix in itertools.product(KERNEL_ARGS.items(), STATE_C):
        params = ", ".join(f"{_c_type(t, suffix)} {n}" for n, t in args)
        names = ", ".join(n for n, _ in args)
        lines.append(f'extern "C" void emulate_{op}{suffix}(unsigned grid, unsigned block, '
                     f'{params}) {{ fo_emulate_launch(grid, block, [&] {{ '
                     f'{op}_f32{suffix}({names}); }}); }}')
    (out / "wrappers.cpp").write_text("\n".join(lines) + "\n")
    so = out / "kernels_host.so"
    cmd = ["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall",
           "-Werror", "-Wno-unknown-pragmas", "-include", str(HERE / "shim.h"),
           f"-I{build.kernel_dir()}", str(out / "wrappers.cpp"), "-o", str(so)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    library = ctypes.CDLL(str(so))
    for (op, args), suffix in itertools.product(KERNEL_ARGS.items(), STATE_C):
        fn = getattr(library, f"emulate_{op}{suffix}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [CTYPES.get(t, ctypes.c_void_p)
                                                        for _, t in args]
        fn.restype = None
    return library


def emulate(lib, op, grid, block, values, suffix=""):
    args = pack_args(op, values)
    converted = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
    getattr(lib, f"emulate_{op}{suffix}")(grid, block, *converted)


class HostRun:
    """Device-style state: step counter and lr output live in buffers the kernel updates."""

    def __init__(self, lib, op, n, grid, block, offset, schedule, rng, state_bf16=False,
                 **hyper):
        self.lib, self.op, self.grid, self.block = lib, op, grid, block
        self.suffix = "_sbf16" if state_bf16 else ""
        state = np.uint16 if state_bf16 else np.float32
        self.base = {name: np.zeros(n + offset, state if t == "S*" else np.float32)
                     for name, t in KERNEL_ARGS[op] if t in ("T*", "float*", "S*")}
        self.values = {name: buf[offset:] for name, buf in self.base.items()}
        self.values["params"][...] = rng.standard_normal(n)
        if "state_sum" in self.values:
            init = np.float32(hyper.pop("initial_accumulator_value", 0.0))
            self.values["state_sum"][...] = _bf16.encode(init) if state_bf16 else init
        self.table = np.ascontiguousarray(schedule.table)
        self.values.update(table=self.table, table_rows=self.table.shape[0],
                           step_state=np.zeros(2, np.uint64), lr_out=np.zeros(1), n=n,
                           lr_scale=1.0, grad_mult=1.0, **hyper)

    def step(self, grads_f32):
        self.values["grads"] = grads_f32
        emulate(self.lib, self.op, self.grid, self.block, self.values, self.suffix)


SCHEDULES = [S.constant(0.01), S.warmup(S.cosine(0.02, 40, end_lr=1e-4), 7),
             S.cyclic(0.001, 0.02, 5, mode="triangular2"), S.one_cycle(0.02, 60, three_phase=True)]
LAUNCHES = [(1, 1), (3, 4), (2, 32)]  # (grid, block): grid-stride with many and few threads


def _cases():
    for sched, (grid, block), offset in itertools.product(range(len(SCHEDULES)), LAUNCHES, [0, 1]):
        yield pytest.param(sched, grid, block, offset, id=f"s{sched}-g{grid}b{block}-o{offset}")


def _grads(rng, n, steps):
    return [(rng.standard_normal(n) * np.exp(rng.uniform(-3, 1))).astype(np.float32)
            for _ in range(steps)]


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.max(np.abs(b))))


@pytest.mark.parametrize("sched,grid,block,offset", list(_cases()))
@pytest.mark.parametrize("decoupled,amsgrad,maximize", [(0, 0, 0), (1, 1, 0), (0, 1, 1),
                                                        (1, 0, 1)])
def test_adam_kernel_math(lib, sched, grid, block, offset, decoupled, amsgrad, maximize):
    rng = np.random.default_rng(sched * 10 + offset)
    n, steps, schedule = 203, 60, SCHEDULES[sched]
    hyper = dict(beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.05, decoupled=decoupled,
                 amsgrad=amsgrad, maximize=maximize)
    run = HostRun(lib, "adam", n, grid, block, offset, schedule, rng, **hyper)
    cls = fastopt.AdamW if decoupled else fastopt.Adam
    p_cpu = run.values["params"].copy()
    cpu = cls(p_cpu, lr=schedule, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05,
              amsgrad=bool(amsgrad), maximize=bool(maximize))
    ref = [p_cpu.astype(np.float64), np.zeros(n), np.zeros(n), np.zeros(n)]
    for k, g in enumerate(_grads(rng, n, steps), start=1):
        run.step(g)
        cpu.step(g)
        ref = reference.adam(ref[0], g, *ref[1:], step=k, lr=schedule.at(k - 1), **hyper)
        assert run.values["step_state"][0] == k and run.values["step_state"][1] == 0
        np.testing.assert_allclose(run.values["lr_out"][0], cpu.last_lr, rtol=1e-14)
    _close(run.values["params"], p_cpu)
    _close(run.values["params"], ref[0])
    _close(run.values["exp_avg_sq"], ref[2])
    if amsgrad:
        _close(run.values["max_exp_avg_sq"], ref[3])
    assert not np.any(run.base["params"][:offset])  # nothing written outside the view


@pytest.mark.parametrize("sched,grid,block,offset", list(_cases()))
@pytest.mark.parametrize("maximize,weight_decay", [(0, 0.0), (1, 0.1)])
def test_adagrad_kernel_math(lib, sched, grid, block, offset, maximize, weight_decay):
    rng = np.random.default_rng(sched * 10 + offset + 1)
    n, steps, schedule = 203, 60, SCHEDULES[sched]
    hyper = dict(lr_decay=0.01, eps=1e-9, weight_decay=weight_decay, maximize=maximize)
    run = HostRun(lib, "adagrad", n, grid, block, offset, schedule, rng,
                  initial_accumulator_value=0.2, **hyper)
    p0 = run.values["params"].astype(np.float64)
    ref = [p0, np.full(n, 0.2)]
    for k, g in enumerate(_grads(rng, n, steps), start=1):
        run.step(g)
        ref = reference.adagrad(ref[0], g, ref[1], step=k, lr=schedule.at(k - 1), **hyper)
    assert run.values["step_state"][0] == steps
    _close(run.values["params"], ref[0])
    _close(run.values["state_sum"], ref[1])


@pytest.mark.parametrize("sched,grid,block,offset", list(_cases()))
@pytest.mark.parametrize("maximize,weight_decay", [(0, 0.0), (1, 0.1)])
def test_adadelta_kernel_math(lib, sched, grid, block, offset, maximize, weight_decay):
    rng = np.random.default_rng(sched * 10 + offset + 2)
    n, steps, schedule = 203, 60, SCHEDULES[sched]
    hyper = dict(rho=0.85, eps=1e-6, weight_decay=weight_decay, maximize=maximize)
    run = HostRun(lib, "adadelta", n, grid, block, offset, schedule, rng, **hyper)
    ref = [run.values["params"].astype(np.float64), np.zeros(n), np.zeros(n)]
    for k, g in enumerate(_grads(rng, n, steps), start=1):
        run.step(g)
        ref = reference.adadelta(ref[0], g, ref[1], ref[2], step=k, lr=schedule.at(k - 1),
                                 **hyper)
    _close(run.values["params"], ref[0])
    _close(run.values["acc_delta"], ref[2])


def test_schedule_header_equals_at(lib):
    """lr_at in schedule.cuh, through the kernels' lr_out, for every kind at far steps too."""
    rng = np.random.default_rng(0)
    kinds = [S.linear(0.1, 50), S.polynomial(0.1, 50, 2.0), S.inverse_time(0.1, 7, 0.5, True),
             S.exponential(0.1, 0.9, 3), S.step(0.1, 9), S.multistep(0.1, [5, 9, 9]),
             S.ladder(0.1, 0.01, 4, 0.02), S.cosine_restarts(0.1, 3, 2, 0.001),
             S.cyclic(0.01, 0.1, 4, 6, "exp_range", 0.99), *SCHEDULES]
    for schedule in kinds:
        run = HostRun(lib, "adagrad", 8, 1, 1, 0, schedule, rng, lr_decay=0.0, eps=1e-10,
                      weight_decay=0.0, maximize=0)
        for start in (0, 1000, 2**31 + 5):
            run.values["step_state"][0] = start
            for k in range(start + 1, start + 40):
                run.step(rng.standard_normal(8).astype(np.float32))
                np.testing.assert_allclose(run.values["lr_out"][0], schedule.at(k - 1),
                                           rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("op", sorted(KERNEL_ARGS))
@pytest.mark.parametrize("grid,block,offset", [(1, 1, 0), (3, 4, 1), (2, 32, 0)])
def test_bf16_state_kernels_match_the_numba_backend(lib, op, grid, block, offset):
    """bfloat16 state with stochastic rounding: the same seeds and bits as the CPU kernels."""
    rng = np.random.default_rng(7)
    n, schedule = 203, SCHEDULES[1]
    hyper = {"adam": dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, decoupled=1,
                          amsgrad=1, maximize=0),
             "adagrad": dict(lr_decay=0.0, eps=1e-10, weight_decay=0.0, maximize=0),
             "adadelta": dict(rho=0.9, eps=1e-6, weight_decay=0.0, maximize=0)}[op]
    run = HostRun(lib, op, n, grid, block, offset, schedule, rng, state_bf16=True, **hyper)
    cls = {"adam": lambda p: fastopt.AdamW(p, lr=schedule, betas=(0.9, 0.99), eps=1e-8,
                                           weight_decay=0.01, amsgrad=True,
                                           state_dtype="bfloat16"),
           "adagrad": lambda p: fastopt.Adagrad(p, lr=schedule, state_dtype="bfloat16"),
           "adadelta": lambda p: fastopt.Adadelta(p, lr=schedule, state_dtype="bfloat16")}[op]
    p_cpu = run.values["params"].copy()
    cpu = cls(p_cpu)
    for g in _grads(rng, n, 40):
        run.step(g)
        cpu.step(g)
    _close(run.values["params"], p_cpu)
    names = [name for name, t in KERNEL_ARGS[op] if t == "S*"]
    cpu_names = {"state_sum": "sum"}
    for name in names:
        if op == "adam" and name == "max_exp_avg_sq":
            continue
        ours = _bf16.decode(run.values[name])
        theirs = cpu.state_dict()[cpu_names.get(name, name)]
        np.testing.assert_allclose(ours, theirs, rtol=2e-2, atol=1e-6 * np.max(np.abs(theirs)))
        # the same stochastic rounding bits: most elements are bit-identical
        same = np.mean(run.values[name] == cpu.state[cpu_names.get(name, name)])
        assert same > 0.9, (name, same)
