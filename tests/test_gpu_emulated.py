"""The GPU backend's Python path on every CI machine: tests/test_gpu.py and bench/gpu_check.py
run against the fake CuPy in tests/fake_cupy (Numba kernels behind CuPy's launch interface,
strict about argument types, host syncs in graph capture and numpy/cupy mixing). On a
machine with a real GPU, tests/test_gpu.py also runs directly against CuPy."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fastopt.algorithms import CLASSES

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_cupy"


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAKE), str(ROOT)]))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)


def test_gpu_tests_pass_on_the_fake_device(tmp_path):
    gpu_tests = ROOT / "tests" / "test_gpu.py"
    # the fake device runs kernels synchronously: the asynchrony check needs a real one
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(gpu_tests),
                 "-k", "not test_step_returns_before_the_device_finishes"],
                tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "passed" in last and "skipped" not in last and "failed" not in last, last
    assert "1 deselected" in last, last


def test_gpu_check_script_runs(tmp_path):
    shapes = tmp_path / "tiny.json"
    shapes.write_text(json.dumps({"model": "tiny", "shapes": [{"shape": [64, 33]},
                                                               {"shape": [33]}]}))
    report = tmp_path / "report.md"
    done = _run([str(ROOT / "bench" / "gpu_check.py"), "--size", "3e4", "--model", str(shapes),
                 "--report", str(report), "--no-tests"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    for case in ("fp32 3e+04", "fp32 tiny", "bf16 3e+04", "bf16 tiny"):
        assert f"| {case} | fastopt |" in text and f"| {case} | copy-same-bytes |" in text
    for cls in CLASSES:  # every optimizer of the registry: its bytes, its counterpart
        if CLASSES[cls][0].matrix is not None:  # (Muon: the model's matrices, vs torch's)
            assert f"| {cls} tiny matrices | fastopt |" in text, cls
        elif cls != "AdamW":
            assert f"| {cls} 3e+04 | copy-same-bytes |" in text, cls
            assert f"| {cls} tiny | fastopt |" in text, cls


def test_gpu_ab_script_runs(tmp_path):
    """bench/gpu_ab.py builds each variant's source (patched common.cuh inlined) and times it."""
    done = _run([str(ROOT / "bench" / "gpu_ab.py"), "--size", "3e4", "--rounds", "1"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.endswith("%) |")]
    assert len(rows) == 3 and "as shipped" in rows[0], done.stdout


def test_gpu_ab_variant_sources_compile():
    """The patched sources gpu_ab.py builds compile with NVRTC (no GPU needed)."""
    import importlib.util

    import pytest

    pytest.importorskip("cuda.bindings.nvrtc")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_ab", ROOT / "bench" / "gpu_ab.py")
        gpu_ab = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_ab)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from test_cuda_compile import compile_source

    patched = [make() for make, _ in gpu_ab.VARIANTS.values() if make() is not None]
    assert patched
    for code in patched:  # (sm_90's front end; ptxas, 60 % of an sm_90 build, is not needed
        # to find an error the patch makes, and tests/test_cuda_compile.py runs it on adam.cu)
        log, ptx = compile_source("adam.cu", "compute_90", code=code)  # asserts success
        assert not log and b".entry adam_bf16" in ptx
