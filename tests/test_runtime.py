"""No allocation per step, import without compiling, the command line."""

import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import cli
from fastopt import schedules as S


@pytest.mark.parametrize("make", [
    lambda p, s: fastopt.Adam(p, amsgrad=True, weight_decay=0.1, state_dtype=s),
    lambda p, s: fastopt.AdamW(p, lr=S.warmup(S.cosine(1e-3, 100), 10), state_dtype=s),
    lambda p, s: fastopt.Adagrad(p, lr=S.one_cycle(0.1, 50), state_dtype=s),
    lambda p, s: fastopt.Adadelta(p, lr=S.cyclic(0.1, 1.0, 5), state_dtype=s),
], ids=["adam", "adamw", "adagrad", "adadelta"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [1000, 100_000])
def test_step_allocates_nothing(make, n, dtype, state_dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    opt = make(p, state_dtype)
    for _ in range(3):
        opt.step(g, max_grad_norm=10.0, grad_scale=2.0)  # compile, warm up
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20):
            opt.step(g, max_grad_norm=10.0, grad_scale=2.0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    assert grown < 4096, f"step() allocated {grown} bytes over 20 steps"
    assert grown < n * 4  # certainly no buffer-sized allocation


def test_import_compiles_nothing():
    code = ("import time; t = time.perf_counter(); import fastopt; "
            "dt = time.perf_counter() - t; from fastopt.algorithms import REGISTRY; "
            "from fastopt.engine import cpu_kernel; "
            "assert not any(cpu_kernel(name, parallel=p).signatures for name in REGISTRY "
            "for p in (False, True)); "
            "print(dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 5.0  # generous here; bench/NOTES.md has the measured time


def test_kernels_alone_ask_for_512_bit_vectors(monkeypatch):
    """The kernel options carry LLVM's prefer-vector-width=512 into the kernel; a plain Numba
    function compiled next does not get it. On an AVX-512 host the kernel's machine code
    then uses 512-bit registers, in its parallel loop too (the parfor body, inlined into
    Numba's gufunc wrapper, was vectorised under the attribute)."""
    import re

    import llvmlite.binding as llvm
    from numba import njit, prange

    from fastopt.cpu import _jit

    def body(a, b):
        for i in prange(a.shape[0]):
            a[i] = a[i] - np.float32(0.5) * b[i] / (np.sqrt(b[i] * b[i]) + np.float32(1e-8))
        return a.reshape((2, -1)).sum()  # (Numba compiles internal functions for these)

    def serial_body(a, b):  # (a serial twin's shape: a range loop, nothing made parallel)
        for i in range(a.shape[0]):
            a[i] = a[i] - np.float32(0.5) * b[i] / (np.sqrt(b[i] * b[i]) + np.float32(1e-8))
        return a[0]

    kernel = njit(**{**_jit.KERNEL_OPTIONS, "cache": False})(body)  # (a cached one has no IR)
    serial = njit(**{**_jit.SERIAL_KERNEL_OPTIONS, "cache": False})(serial_body)
    plain = njit(parallel=True)(body)
    a, b = np.ones(256, np.float32), np.full(256, 2.0, np.float32)
    kernel(a.copy(), b)
    # the twin has no parallel loop, by design, and no warning says so; nor does a filter
    # hide it (another thread's catch_warnings could keep it, hiding the user's warnings)
    filtered = []
    monkeypatch.setattr(warnings, "filterwarnings", lambda *a, **k: filtered.append(a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        serial(a.copy(), b)
    assert not caught, [str(w.message) for w in caught]
    assert not filtered, filtered
    plain(a.copy(), b)
    [kernel_ir] = kernel.inspect_llvm().values()
    [serial_ir] = serial.inspect_llvm().values()
    [plain_ir] = plain.inspect_llvm().values()
    width_group = r"^attributes #\d+ = \{[^}]*" + re.escape(_jit.PREFER_512_BIT)
    assert re.search(width_group, kernel_ir, re.M)
    assert re.search(width_group, serial_ir, re.M)
    assert "prefer-vector-width" not in plain_ir
    # nor does the process's cache of Numba's internal functions (which the kernel's
    # compilation would share without a cache of its own) hold a function with it
    from numba.core.registry import cpu_target

    for compiled in cpu_target.target_context.cached_internal_func.values():
        assert "prefer-vector-width" not in compiled.library.get_llvm_str()
    llvm.initialize_native_target()
    if "+avx512f" in llvm.get_host_cpu_features().flatten():
        assert "zmm" in "".join(kernel.inspect_asm().values())
        assert "zmm" in "".join(serial.inspect_asm().values())


def test_cli_schedule_table(capsys):
    assert cli.main(["schedule", "warmup(cosine(1e-3, 100, end_lr=1e-5), 10)", "--steps", "101",
                     "--every", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:]]
    sched = S.warmup(S.cosine(1e-3, 100, end_lr=1e-5), 10)
    assert [int(r[0]) for r in rows] == [0, 50, 100]
    np.testing.assert_allclose([float(r[1]) for r in rows], sched.at([0, 50, 100]), rtol=1e-6)


def test_cli_schedule_plot(tmp_path):
    path = tmp_path / "lr.png"
    assert cli.main(["schedule", "one_cycle(0.1, 200, three_phase=True)", "--steps", "200",
                     "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("expr", ["__import__('os')", "cosine(0.1, 0)", "cosine", "1.0",
                                  "open('x')", "cosine(0.1, 10).table"])
def test_cli_schedule_rejects(expr, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["schedule", expr])
    assert info.value.code == 2
    assert "fastopt schedule: error: " in capsys.readouterr().err


def test_cli_bench_tiny(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert cli.main(["bench", "--optimizer", "adamw", "adadelta", "--sizes", "2000",
                     "--budget", "0.02", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fastopt == torch.optim" in out and "% roofline" in out
    import json

    data = json.loads(path.read_text())
    assert {r["optimizer"] for r in data["rows"]} == {"adamw", "adadelta"}
    assert all(r["times"]["fastopt"] > 0 for r in data["rows"])


def test_cli_bench_master_weights(tmp_path):
    """--master-weights times bfloat16 params in that mode (each --state-dtype too)."""
    path = tmp_path / "b.json"
    assert cli.main(["bench", "--optimizer", "adamw", "--sizes", "2000", "--budget", "0.02",
                     "--no-torch", "--no-progress", "--master-weights", "remainder",
                     "--json", str(path)]) == 0
    import json

    (row,) = json.loads(path.read_text())["rows"]
    assert row["times"]["fastopt-bf16-params-remainder"] > 0


def test_cli_bench_startup(tmp_path, capsys, monkeypatch):
    """--startup measures in fresh processes with a private Numba cache: the cold run compiles
    (the cache folder fills), the warm run loads, and the user's cache is left alone."""
    from fastopt import startup

    caches = []
    real_child = startup._child

    def spy(name, cache_dir, size, hide_scipy=False):
        result = real_child(name, cache_dir, size, hide_scipy)
        caches.append((cache_dir, sum(len(f) for _, _, f in os.walk(cache_dir))))
        return result

    monkeypatch.setattr(startup, "_child", spy)
    path, page = tmp_path / "s.json", tmp_path / "s.md"
    assert cli.main(["bench", "--startup", "--quick", "--optimizer", "adagrad", "--sizes", "",
                     "--models", "--no-torch", "--json", str(path), "--markdown",
                     str(page)]) == 0
    import json

    (row,) = json.loads(path.read_text())["startup"]
    assert row["optimizer"] == "adagrad"
    assert {"import", "cold 1e3", "warm 1e3", "cold 1e5", "warm 1e5"} <= set(row["seconds"])
    assert all(s > 0 for s in row["seconds"].values())
    assert caches[0][1] > 0 and caches[0][0] != os.environ.get("NUMBA_CACHE_DIR")
    assert not os.path.exists(caches[0][0])  # a temporary folder, removed afterwards
    assert "warm 1e5" in page.read_text() and "start-up" in capsys.readouterr().out


def test_results_page_keeps_its_gpu_section(tmp_path):
    """Regenerating the CPU results page keeps the GPU results recorded below them."""
    from fastopt import benchmark

    page = tmp_path / "RESULTS.md"
    page.write_text("# old CPU results\n\nstale table\n\n## GPU: NVIDIA H200\n\n| a | b |\n")
    benchmark.write_markdown([], str(page), None, "fastopt bench")
    text = page.read_text()
    assert "stale table" not in text and text.startswith("# fastopt benchmark results")
    assert text.count("## GPU: NVIDIA H200") == 1 and "| a | b |" in text
    benchmark.write_markdown([], str(page), None, "fastopt bench")
    assert page.read_text() == text  # idempotent


@pytest.mark.parametrize("params_dtype, state_dtype, serial_below", [
    ("float32", "float32", 16_384), ("float32", "int8", 16_384), ("bfloat16", "int8", 16_384),
    ("float32", "bfloat16", 8_192), ("bfloat16", "float32", 8_192)])
def test_serial_loop_below_each_formats_crossover(params_dtype, state_dtype, serial_below):
    """Small steps run the serial loop, larger ones the parallel loop, from the size where it
    pays off for these formats (bench/NOTES.md, twenty-first session); the class and the
    functional layer ask the same cpu.parallel_min_size."""
    from fastopt import _functional, cpu
    from fastopt._int8 import Int8State

    if cpu.num_threads() < 2:
        pytest.skip("one Numba thread: every loop is serial")
    dtype = np.float32 if params_dtype == "float32" else \
        pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(3)
    for n, parallel in [(serial_below - 1, False), (serial_below, True)]:
        params = rng.standard_normal(n).astype(dtype)
        opt = fastopt.AdamW(params, lr=1e-3, state_dtype=state_dtype)
        assert opt._parallel is parallel, n
        state = Int8State.zeros(n) if state_dtype == "int8" else np.zeros(
            n, np.float32 if state_dtype == "float32" else np.uint16)
        assert _functional._parallel(n, params, state) is parallel, n


def test_kernels_serial_loop_is_vectorised_with_a_stand_in_slot():
    """The kernels' array arguments are ``noalias``, so LLVM vectorises their serial loop with
    no run-time overlap check. Without it, a loop that writes a state only under a flag, over
    16-bit params, was vectorised behind a check that the state's buffer overlaps no other;
    the engine passes a real buffer for an unused slot (Adam's max_exp_avg_sq without
    amsgrad), so the check failed and the scalar copy ran: 13 ns an element instead of ~1
    (bench/NOTES.md, twenty-first session). The same body compiled without the kernel
    options keeps the check, which shows the test can fail."""
    from numba import njit

    from fastopt.cpu import _jit
    from fastopt.cpu.convert import bf16_to_float, float_to_bf16

    def body(params, grads, state0, state2, active):
        for i in range(params.shape[0]):
            m = state0[i] + np.float32(0.1) * (grads[i] - state0[i])
            if active:
                state2[i] = max(state2[i], m)
            state0[i] = m
            params[i] = float_to_bf16(bf16_to_float(params[i]) - np.float32(1e-3) * m)

    kernel = njit(**{**_jit.KERNEL_OPTIONS, "cache": False})(body)  # (a cached one has no IR)
    plain = njit(error_model="numpy")(body)
    params, grads, state = (np.ones(64, np.uint16), np.ones(64, np.float32),
                            np.zeros(64, np.float32))
    for f in (kernel, plain):
        f(params, grads, state, state, False)  # (the stand-in: the same buffer)
    [kernel_ir] = kernel.inspect_llvm().values()
    [plain_ir] = plain.inspect_llvm().values()
    assert "vector.body" in kernel_ir and "vector.memcheck" not in kernel_ir
    assert "vector.memcheck" in plain_ir
