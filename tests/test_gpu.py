"""GPU backend on a real device (marked gpu; skipped where CuPy finds no CUDA device)."""

import numpy as np
import pytest

import fastopt
from fastopt import functional as F
from fastopt import schedules as S

cupy = pytest.importorskip("cupy", reason="cupy not installed")
if not cupy.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

SCHED = S.warmup(S.cosine(1e-2, 80, end_lr=1e-4), 10)
MAKERS = {
    "adam": lambda p: fastopt.Adam(p, lr=SCHED, weight_decay=0.1, amsgrad=True),
    "adamw": lambda p: fastopt.AdamW(p, lr=SCHED, maximize=True),
    "adagrad": lambda p: fastopt.Adagrad(p, lr=SCHED, lr_decay=0.01,
                                         initial_accumulator_value=0.1),
    "adadelta": lambda p: fastopt.Adadelta(p, lr=SCHED, weight_decay=0.01),
}


def _grads(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("n,offset", [(1, 0), (1031, 0), (1031, 1), (1 << 20, 3)])
def test_gpu_equals_cpu(name, n, offset):
    p0 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    p_cpu = p0.copy()
    cpu = MAKERS[name](p_cpu)
    base = cupy.zeros(n + offset, dtype=cupy.float32)
    p_gpu = base[offset:]
    p_gpu[...] = cupy.asarray(p0)
    gpu = MAKERS[name](p_gpu)
    for g in _grads(n, 100):
        cpu.step(g)
        gpu.step(cupy.asarray(g))
    np.testing.assert_allclose(p_gpu.get(), p_cpu, rtol=1e-5, atol=1e-5)
    assert gpu.step_count == 100 == gpu.sync_step_count()
    assert gpu.last_lr == pytest.approx(cpu.last_lr, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_params(dtype):
    """16-bit params on the GPU: float16 arrays, or bfloat16 as uint16 bits + dtype= (CuPy has
    no bfloat16); the master equals the CPU backend's, the params are it rounded."""
    from fastopt import _bf16

    n = 4099
    p0 = np.random.default_rng(2).standard_normal(n).astype(np.float32)

    def as16(x):  # host float32 -> 16-bit device buffer in the form the optimizer takes
        return cupy.asarray(_bf16.encode(x) if dtype == "bfloat16" else x.astype(np.float16))

    kwargs = {"dtype": "bfloat16"} if dtype == "bfloat16" else {}
    cpu = fastopt.AdamW(as16(p0).get(), lr=SCHED, **kwargs)
    p16 = as16(p0)
    opt = fastopt.AdamW(p16, lr=SCHED, **kwargs)
    with pytest.raises(TypeError, match="grads must have dtype"):
        opt.step(cupy.asarray(p0))  # float32 grads: the CUDA kernels read the params' type
    for g in _grads(n, 50):
        cpu.step(as16(g).get())
        opt.step(as16(g))
    np.testing.assert_allclose(opt.state["master_params"].get(), cpu.state["master_params"],
                               rtol=1e-5, atol=1e-6)
    assert int((p16.get() != cpu.params).sum()) <= n // 100  # rounding of ulp-close masters


def test_graph_replay_equals_eager():
    n = 1 << 16
    grads = cupy.asarray(_grads(n, 1)[0])
    p0 = cupy.random.standard_normal(n, dtype=cupy.float32)
    eager_p, graph_p = p0.copy(), p0.copy()
    eager = fastopt.AdamW(eager_p, lr=SCHED)
    replayed = fastopt.AdamW(graph_p, lr=SCHED)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        replayed.step(grads)  # compile and warm up outside the capture
        eager.step(grads)
        stream.begin_capture()
        replayed.step(grads)
        graph = stream.end_capture()
        for _ in range(100):
            graph.launch(stream)
            eager.step(grads)
    stream.synchronize()
    assert replayed.sync_step_count() == 101
    cupy.testing.assert_array_equal(graph_p, eager_p)
    assert replayed.last_lr == eager.last_lr == pytest.approx(SCHED.at(100), rel=1e-12)


def test_functional_on_gpu():
    n = 777
    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    p_cpu = p.get()
    m, v = cupy.zeros(n, cupy.float32), cupy.zeros(n, cupy.float32)
    m_cpu, v_cpu = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for k, g in enumerate(_grads(n, 20), start=1):
        F.adamw(p, cupy.asarray(g), m, v, step=k, schedule=SCHED)
        F.adamw(p_cpu, g, m_cpu, v_cpu, step=k, schedule=SCHED)
    np.testing.assert_allclose(p.get(), p_cpu, rtol=1e-5, atol=1e-6)


def test_gpu_state_dict_round_trip():
    n = 2048
    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    opt = fastopt.Adam(p, lr=SCHED, amsgrad=True)
    for g in _grads(n, 5):
        opt.step(cupy.asarray(g))
    d = opt.state_dict()
    assert isinstance(d["exp_avg"], np.ndarray) and d["step"] == 5
    q = p.copy()
    other = fastopt.Adam(q, amsgrad=True)
    other.load_state_dict(d)
    for g in _grads(n, 5, seed=9):
        opt.step(cupy.asarray(g))
        other.step(cupy.asarray(g))
    cupy.testing.assert_array_equal(p, q)


def test_mixed_devices_refused():
    p = cupy.zeros(16, cupy.float32)
    opt = fastopt.Adam(p)
    with pytest.raises(TypeError, match="numpy"):
        opt.step(np.zeros(16, np.float32))


def test_gpu_clipping_and_skip_equal_cpu():
    n = 5000
    data = _grads(n, 10, seed=4)
    p_cpu = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    p_gpu = cupy.asarray(p_cpu)
    cpu, gpu = fastopt.AdamW(p_cpu), fastopt.AdamW(p_gpu)
    for g in data:
        cpu.step(g * 4, grad_scale=4.0, max_grad_norm=1.0)
        gpu.step(cupy.asarray(g) * 4, grad_scale=4.0, max_grad_norm=1.0)
        assert gpu.last_grad_norm == pytest.approx(cpu.last_grad_norm, rel=1e-5)
    np.testing.assert_allclose(p_gpu.get(), p_cpu, rtol=1e-5, atol=1e-6)
    bad = cupy.asarray(data[0])
    bad[3] = cupy.nan
    assert gpu.step(bad, skip_if_nonfinite=True) is False and gpu.step_count == 10


def test_gpu_bf16_state_equals_cpu():
    n = 4099
    data = _grads(n, 30, seed=6)
    p_cpu = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    p_gpu = cupy.asarray(p_cpu)
    cpu = fastopt.AdamW(p_cpu, lr=SCHED, state_dtype="bfloat16")
    gpu = fastopt.AdamW(p_gpu, lr=SCHED, state_dtype="bfloat16")
    for g in data:
        cpu.step(g)
        gpu.step(cupy.asarray(g))
    np.testing.assert_allclose(p_gpu.get(), p_cpu, rtol=1e-4, atol=1e-5)
