"""Numba's threading layers: threads and fork() with parallel-sized buffers (100k elements, the
kernels' prange loops), each case in a fresh interpreter with the layer forced.

The subprocesses share the test run's Numba cache (the environment is inherited), so only the
first one compiles. A hang fails the test through a timeout instead of stalling CI.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fastopt

ROOT = str(Path(fastopt.__file__).resolve().parents[1])

COMMON = r"""
import os, sys
import numpy as np
import numba
import fastopt
from fastopt import functional as F

N = 100_000  # the kernels' parallel loop runs from 16,384 float32 elements
rng = np.random.default_rng(0)
P0 = [rng.standard_normal(N, dtype=np.float32) for _ in range(2)]
G = [rng.standard_normal(N, dtype=np.float32) for _ in range(2)]


def class_steps(p, g, steps):
    # the class API with clipping: a grad_sq_norm launch and an adam launch per step
    opt = fastopt.AdamW(p)
    for _ in range(steps):
        opt.step(g, max_grad_norm=100.0)
    return p


def functional_steps(p, g, steps):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for k in range(1, steps + 1):
        F.adam(p, g, m, v, step=k)
    return p


def check(got, want):
    # parallel and serial loops give the same adam update; the clipping norm's float64 sum
    # may differ in its last bits between them
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[1], want[1])
"""

THREADS = COMMON + r"""
import threading

STEPS = 50
jobs = [class_steps, functional_steps]
want = [job(p.copy(), g, STEPS) for job, p, g in zip(jobs, P0, G)]  # one after the other
assert numba.threading_layer() == sys.argv[1], numba.threading_layer()
got = [p.copy() for p in P0]
errors = []

def run(job, p, g):
    try:
        job(p, g, STEPS)
    except BaseException as exc:
        errors.append(exc)

threads = [threading.Thread(target=run, args=a) for a in zip(jobs, got, G)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
check(got, want)
print("ok")
"""

FORK = COMMON + r"""
import multiprocessing

def both(_=None):
    return [class_steps(P0[0].copy(), G[0], 2), functional_steps(P0[1].copy(), G[1], 2)]

# the parent steps in parallel first, which starts the threading layer
inherited_p = P0[0].copy()
inherited = fastopt.AdamW(inherited_p)
inherited.step(G[0])
assert numba.threading_layer() == sys.argv[1], numba.threading_layer()
want = both()
want_inherited = fastopt.AdamW(P0[0].copy())
for _ in range(2):
    want_inherited.step(G[0])

# a tensor-aware optimizer too (its own helpers: Adafactor's square sums zeroed its sums
# with slice assignments, which Numba made parallel loops whatever the flag: the child died)
factored_p = P0[1].copy()
factored = fastopt.Adafactor(factored_p, segments=[(400, 250)])
factored.step(G[1])
want_factored = fastopt.Adafactor(P0[1].copy(), segments=[(400, 250)])
for _ in range(2):
    want_factored.step(G[1])

pid = os.fork()
if pid == 0:  # the child: step the optimizers it inherited, then fresh ones
    code = 1
    try:
        inherited.step(G[0])
        np.testing.assert_array_equal(inherited_p, want_inherited.params)
        factored.step(G[1])
        np.testing.assert_allclose(factored_p, want_factored.params, rtol=1e-6, atol=1e-7)
        check(both(), want)
        code = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, f"forked child: {os.waitstatus_to_exitcode(status)}"

with multiprocessing.get_context("fork").Pool(2) as pool:  # a DataLoader's workers, say
    results = pool.map_async(both, range(3)).get(timeout=60)
for got in results:
    check(got, want)
print("ok")
"""


def layer_available(layer: str) -> bool:
    modules = {"omp": "numba.np.ufunc.omppool", "workqueue": "numba.np.ufunc.workqueue"}
    try:
        __import__(modules[layer])
    except ImportError:
        return False
    return True


def run_script(script: str, layer: str | None, timeout: float = 240) -> str:
    """Run ``script`` in a fresh interpreter under this threading layer (None: Numba's default)
    with the layer's name as argv[1]; kill its whole process group if it hangs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    else:
        layer = subprocess.run(
            [sys.executable, "-c", "import numba; numba.get_num_threads(); "
             "print(numba.threading_layer())"], env=env, capture_output=True, text=True,
            check=True, timeout=120).stdout.strip()
    proc = subprocess.Popen([sys.executable, "-c", script, layer], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no answer in {timeout} s (a hang?)\n{out}\n{err[-4000:]}")
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{out}\n{err[-4000:]}"
    assert out.strip().endswith("ok")
    return out


@pytest.mark.skipif(not layer_available("workqueue"), reason="no workqueue layer")
def test_two_threads_under_workqueue_layer_equal_sequential():
    """Numba's workqueue pool aborts the process on concurrent parallel launches; fastopt
    serialises its own under that layer, so separate optimizers in separate threads work."""
    run_script(THREADS, "workqueue")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
@pytest.mark.parametrize("layer", [None, "omp", "workqueue"], ids=["default", "omp", "workqueue"])
def test_children_forked_after_a_parallel_step_can_step(layer):
    """After a parallel step in the parent, a forked child and a fork-context Pool's workers
    step (the inherited optimizer, new ones, the functional API) with the parent's results;
    under GNU OpenMP they run the kernels' serial loop instead of being killed."""
    if layer is not None and not layer_available(layer):
        pytest.skip(f"no {layer} layer")
    run_script(FORK, layer)


OPENMP_COUNT = r"""
import os, sys
import numpy as np
import numba
order = os.environ["ORDER"]
if order == "torch_first":
    import torch
    torch.set_num_threads(1)
    import fastopt.torch as ft
    p = torch.nn.Parameter(torch.zeros(100_000))
    opt = ft.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
else:  # fastopt's numpy API steps first; torch (and its OpenMP) comes later
    import fastopt
    p = np.zeros(100_000, np.float32)
    fastopt.AdamW(p).step(np.ones_like(p))
    import torch
assert numba.threading_layer() == sys.argv[1], numba.threading_layer()
assert torch.get_num_threads() == 1, torch.get_num_threads()

@numba.njit(parallel=True)
def thread_ids(out):
    for i in numba.prange(out.size):
        out[i] = numba.get_thread_id()

ids = np.zeros(1_000_000, np.int64)
thread_ids(ids)
used = np.unique(ids)
assert len(used) == numba.get_num_threads() == 2, (used, numba.get_num_threads())
assert torch.get_num_threads() == 1, torch.get_num_threads()
print("ok")
"""


@pytest.mark.skipif(not layer_available("omp"), reason="no omp layer")
@pytest.mark.parametrize("order", ["torch_first", "numba_first"])
def test_starting_the_omp_layer_keeps_torchs_thread_count(order, monkeypatch):
    """Numba's omp layer sets the OpenMP thread count when it starts, and torch reads it:
    torch.set_num_threads(1) (or OMP_NUM_THREADS=1) came back as 2 after fastopt's first
    parallel step. The count stays torch's; Numba's loops still use Numba's 2 threads."""
    pytest.importorskip("torch")
    monkeypatch.setenv("ORDER", order)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    run_script(OPENMP_COUNT, "omp")
