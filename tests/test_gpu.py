"""GPU backend on a real device (marked gpu; skipped where CuPy finds no CUDA device)."""

import numpy as np
import pytest
from optimizer_cases import CASES, make, schedule_for

import fastopt
from fastopt import functional as F
from fastopt import schedules as S
from fastopt.algorithms import CLASSES, REGISTRY

cupy = pytest.importorskip("cupy", reason="cupy not installed")
if not cupy.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

SCHED = S.warmup(S.cosine(1e-2, 80, end_lr=1e-4), 10)


def _maker(name: str, cls: str, hypers: dict):
    schedule = schedule_for(name, SCHED)  # (Rprop takes a constant lr)
    return lambda p, **kw: make(cls, p, lr=schedule, **hypers, **kw)


#: every definition in the registry, with the last two options of its test entry
MAKERS = {f"{cls}-{i}": _maker(name, cls, hypers) for name, case in CASES.items()
          for i, (cls, hypers) in enumerate(case.options[-2:])}


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
    steps = 100 if n < 1 << 20 else 10  # (the large case checks the launch shapes; on the
    for g in _grads(n, steps):          # fake device its 100 steps took 40 s of CI)
        cpu.step(g)
        gpu.step(cupy.asarray(g))
    np.testing.assert_allclose(p_gpu.get(), p_cpu, rtol=1e-5, atol=1e-5)
    assert gpu.step_count == steps == gpu.sync_step_count()
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
    np.testing.assert_allclose(opt.state["master_param"].get(), cpu.state["master_param"],
                               rtol=1e-5, atol=1e-6)
    assert int((p16.get() != cpu.params).sum()) <= n // 100  # rounding of ulp-close masters


def test_functional_on_gpu():
    n = 777
    p = cupy.random.standard_normal(n, dtype=cupy.float32)
    p_cpu = p.get()
    m, v = cupy.zeros(n, cupy.float32), cupy.zeros(n, cupy.float32)
    m_cpu, v_cpu = np.zeros(n, np.float32), np.zeros(n, np.float32)
    grads = [(g, cupy.asarray(g)) for g in _grads(n, 20)]
    for k, (g, g_gpu) in enumerate(grads, start=1):
        F.adamw(p, g_gpu, m, v, step=k, schedule=SCHED)
        F.adamw(p_cpu, g, m_cpu, v_cpu, step=k, schedule=SCHED)
    np.testing.assert_allclose(p.get(), p_cpu, rtol=1e-5, atol=1e-6)
    counter = getattr(cupy, "transfers", None)  # the fake device counts host-to-device copies
    if counter is not None:
        before = counter["host_to_device"]
        F.adamw(p, grads[0][1], m, v, step=21, schedule=SCHED)
        assert counter["host_to_device"] == before  # the table stays on the device


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
    before = p_gpu.copy()
    assert not gpu.step(bad, skip_if_nonfinite=True) and gpu.step_count == 10
    cupy.testing.assert_array_equal(p_gpu, before)
    assert gpu.step(cupy.asarray(data[1]), skip_if_nonfinite=True) and gpu.step_count == 11


def test_clipped_and_skippable_steps_capture_in_a_graph():
    """max_grad_norm and skip_if_nonfinite need no host sync on the GPU: a step with both is
    captured once; replays with finite gradients equal eager clipped steps (schedule
    advancing in the kernel), and a replay with a NaN gradient changes nothing and does not
    advance the step."""
    n = 3001
    rng = np.random.default_rng(21)
    p0 = rng.standard_normal(n).astype(np.float32)
    eager_p, graph_p = cupy.asarray(p0), cupy.asarray(p0)
    eager = fastopt.AdamW(eager_p, lr=SCHED)
    replayed = fastopt.AdamW(graph_p, lr=SCHED)
    g = cupy.asarray(rng.standard_normal(n).astype(np.float32) * 5)
    # (a non-blocking stream does not wait for the copies above, issued on the null stream)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        replayed.step(g, max_grad_norm=1.0, skip_if_nonfinite=True)
        eager.step(g, max_grad_norm=1.0, skip_if_nonfinite=True)
        stream.begin_capture()
        replayed.step(g, max_grad_norm=1.0, skip_if_nonfinite=True)
        graph = stream.end_capture()
        for k in range(30):
            g[...] = cupy.asarray(rng.standard_normal(n).astype(np.float32) * (1 + k % 5))
            graph.launch(stream)
            eager.step(g, max_grad_norm=1.0, skip_if_nonfinite=True)
        before = graph_p.copy()
        g[7] = cupy.nan
        graph.launch(stream)
    stream.synchronize()
    cupy.testing.assert_array_equal(graph_p, before)
    assert replayed.sync_step_count() == 31 == eager.step_count
    cupy.testing.assert_array_equal(graph_p, eager_p)
    assert replayed.last_lr == eager.last_lr


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


INT8_OPTIONS = [(name, cls, hypers) for name, d in sorted(REGISTRY.items())
                if d.int8_refusal is None for cls, hypers in CASES[name].options[-1:]]


@pytest.mark.parametrize("name,cls,hypers", INT8_OPTIONS, ids=[o[1] for o in INT8_OPTIONS])
def test_gpu_int8_state_equals_cpu(name, cls, hypers):
    """int8 state on the GPU (a warp per block, the absmax by shuffles): the params follow the
    CPU's, and the codes are the CPU's (the same stochastic-rounding bits) but where a value
    an ulp away rounds to the next code; with clipping and a skipped step on the device."""
    n = 5 * 256 + 77
    data = _grads(n, 20, seed=21)
    p_cpu = np.random.default_rng(22).standard_normal(n).astype(np.float32)
    p_gpu = cupy.asarray(p_cpu)
    schedule = schedule_for(name, SCHED)
    cpu = make(cls, p_cpu, lr=schedule, state_dtype="int8", **hypers)
    gpu = make(cls, p_gpu, lr=schedule, state_dtype="int8", **hypers)
    for k, g in enumerate(data):
        if k == 7:  # a skipped step: nothing changes on the device
            bad = g.copy()
            bad[3] = np.nan
            assert not bool(gpu.step(cupy.asarray(bad), skip_if_nonfinite=True))
        cpu.step(g, max_grad_norm=20.0)
        gpu.step(cupy.asarray(g), max_grad_norm=20.0)
    np.testing.assert_allclose(p_gpu.get(), p_cpu, rtol=1e-4, atol=1e-5)
    for key, state in cpu.state.items():
        codes = gpu.state[key].codes.get()
        assert codes.dtype == np.uint8 and np.mean(codes == state.codes) > 0.99, key
        np.testing.assert_allclose(gpu.state[key].absmax.get(), state.absmax, rtol=1e-4)


@pytest.mark.parametrize("mode,dtype,state_dtype", [
    ("remainder", "bfloat16", "float32"), ("remainder", "bfloat16", "int8"),
    ("none", "bfloat16", "int8"), ("none", "float16", "float32")])
def test_gpu_master_weights_equal_cpu(mode, dtype, state_dtype):
    """master_weights='remainder' and 'none' on the GPU (the kernel's master_mode): with
    remainders the master is the float32 master's of a GPU 'fp32' run bit for bit; without a
    master the params follow the CPU kernel's (the same random bits)."""
    from fastopt import _bf16

    n = 3 * 256 + 5
    rng = np.random.default_rng(31)
    p0 = rng.standard_normal(n).astype(np.float32)
    bits = (_bf16.encode(p0) if dtype == "bfloat16"
            else p0.astype(np.float16).view(np.uint16))
    grads = [(_bf16.encode(g) if dtype == "bfloat16" else g.astype(np.float16)).view(np.uint16)
             for g in _grads(n, 12, seed=32)]
    kw = dict(dtype=dtype, lr=SCHED, state_dtype=state_dtype)
    cpu = fastopt.AdamW(bits.copy(), master_weights=mode, **kw)
    gpu = fastopt.AdamW(cupy.asarray(bits), master_weights=mode, **kw)
    ref = fastopt.AdamW(cupy.asarray(bits), **kw)  # (the GPU's float32 master)
    for g in grads:
        cpu.step(g)
        gpu.step(cupy.asarray(g))
        ref.step(cupy.asarray(g))
    if mode == "remainder":
        made = _bf16.join_remainder(gpu.params, gpu.state["master_remainder"]).get()
        master = ref.state["master_param"].get()
        np.testing.assert_array_equal(made.view(np.uint32), master.view(np.uint32))
        np.testing.assert_array_equal(gpu.params.get(), _bf16.split_master(master)[0])
    else:
        assert "master_param" not in gpu.state
        close = np.abs(gpu.params.get().astype(np.int32) - cpu.params.astype(np.int32)) <= 1
        assert close.all() and np.mean(gpu.params.get() == cpu.params) > 0.98


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_int8_state_with_16_bit_params_equals_cpu(dtype):
    from fastopt import _bf16

    n = 3 * 256 + 5
    rng = np.random.default_rng(23)
    p0 = rng.standard_normal(n).astype(np.float32)
    bits = (_bf16.encode(p0) if dtype == "bfloat16"
            else p0.astype(np.float16).view(np.uint16))
    cpu = fastopt.AdamW(bits.copy(), dtype=dtype, lr=SCHED, state_dtype="int8")
    gpu = fastopt.AdamW(cupy.asarray(bits), dtype=dtype, lr=SCHED, state_dtype="int8")
    for g in _grads(n, 10, seed=24):
        g16 = (_bf16.encode(g) if dtype == "bfloat16" else g.astype(np.float16)).view(np.uint16)
        cpu.step(g16)
        gpu.step(cupy.asarray(g16))
    np.testing.assert_allclose(gpu.state["master_param"].get(), cpu.state["master_param"],
                               rtol=1e-4, atol=1e-5)
    assert np.mean(gpu.state["exp_avg"].codes.get() == cpu.state["exp_avg"].codes) > 0.99


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_16_bit_clipping_and_skip_equal_cpu(dtype):
    """The norm of 16-bit grads given as raw bits is taken of their values, not their bits."""
    from fastopt import _bf16

    n = 3000
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal(n).astype(np.float32)
    bits = (_bf16.encode(p0) if dtype == "bfloat16"
            else p0.astype(np.float16).view(np.uint16))
    cpu = fastopt.AdamW(bits.copy(), dtype=dtype)
    gpu = fastopt.AdamW(cupy.asarray(bits), dtype=dtype)
    for g in _grads(n, 8, seed=12):
        g16 = _bf16.encode(g * 3) if dtype == "bfloat16" else (g * 3).astype(np.float16)
        g16 = g16.view(np.uint16)
        cpu.step(g16, grad_scale=2.0, max_grad_norm=1.0)
        gpu.step(cupy.asarray(g16), grad_scale=2.0, max_grad_norm=1.0)
        assert gpu.last_grad_norm == pytest.approx(cpu.last_grad_norm, rel=1e-5)
    np.testing.assert_allclose(gpu.state["master_param"].get(), cpu.state["master_param"],
                               rtol=1e-5, atol=1e-6)
    bad = cupy.asarray(np.full(n, 0x7FC0 if dtype == "bfloat16" else 0x7E00, np.uint16))
    assert not gpu.step(bad, skip_if_nonfinite=True) and gpu.step_count == 8


# (bf16 state with each optimizer's last option, the one tests/test_cuda_host.py checks
# bf16 state with: the same CPU specialisation, not one more for CI to compile)
@pytest.mark.parametrize("name,state_dtype", [
    (name, state_dtype) for name in sorted(MAKERS) for state_dtype in ("float32", "bfloat16")
    if state_dtype == "float32" or (CLASSES[name.split("-")[0]][0].factored is None
                                    and name.endswith("-1"))])
def test_graph_replay_every_optimizer(name, state_dtype):
    """Each optimizer's step, bf16 state included, is captured once in a CUDA graph; 100
    replays equal 100 eager steps, the lr following the schedule (read from the device)."""
    n = 3001
    p0 = np.random.default_rng(13).standard_normal(n).astype(np.float32)
    g = cupy.asarray(np.random.default_rng(14).standard_normal(n).astype(np.float32))
    eager_p, graph_p = cupy.asarray(p0), cupy.asarray(p0)
    eager = MAKERS[name](eager_p, state_dtype=state_dtype)
    replayed = MAKERS[name](graph_p, state_dtype=state_dtype)
    # (a non-blocking stream does not wait for the copies above, issued on the null stream)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        replayed.step(g)
        eager.step(g)
        stream.begin_capture()
        if replayed.definition.matrix is not None:  # (CuPy refuses cuBLAS in capture)
            with pytest.raises(RuntimeError, match="CUDA graph"):
                replayed.step(g)
            stream.end_capture()  # nothing was launched: the capture ends empty
            replayed.step(g)
            eager.step(g)
            stream.synchronize()
            cupy.testing.assert_array_equal(graph_p, eager_p)
            return
        replayed.step(g)
        graph = stream.end_capture()
        for _ in range(100):
            graph.launch(stream)
            eager.step(g)
    stream.synchronize()
    assert replayed.sync_step_count() == 101
    cupy.testing.assert_array_equal(graph_p, eager_p)
    assert replayed.last_lr == eager.last_lr == pytest.approx(replayed.schedule.at(100),
                                                              rel=1e-12)


def test_checkpoint_round_trip_on_gpu(tmp_path):
    n = 1500
    p = cupy.asarray(np.random.default_rng(15).standard_normal(n).astype(np.float32))
    opt = fastopt.Adagrad(p, lr=SCHED)
    for g in _grads(n, 4):
        opt.step(cupy.asarray(g))
    fastopt.save(opt, tmp_path / "ckpt.npz")
    q = cupy.zeros(n, cupy.float32)
    other = fastopt.load(tmp_path / "ckpt.npz", q, optimizer="Adagrad")
    cupy.testing.assert_array_equal(q, p)
    for g in _grads(n, 4, seed=3):
        opt.step(cupy.asarray(g))
        other.step(cupy.asarray(g))
    cupy.testing.assert_array_equal(q, p)
    assert other.sync_step_count() == 8


def test_functional_bf16_bits_on_gpu():
    from fastopt import _bf16

    n = 999
    p0 = np.random.default_rng(16).standard_normal(n).astype(np.float32)
    bits = _bf16.encode(p0)
    host = [bits.copy(), _bf16.decode(bits), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    dev = [cupy.asarray(a) for a in host]
    for k, g in enumerate(_grads(n, 6), start=1):
        gb = _bf16.encode(g)
        F.adamw(host[0], gb, host[2], host[3], step=k, master_param=host[1], dtype="bfloat16")
        F.adamw(dev[0], cupy.asarray(gb), dev[2], dev[3], step=k, master_param=dev[1],
                dtype="bfloat16")
    np.testing.assert_allclose(dev[1].get(), host[1], rtol=1e-5, atol=1e-6)


def test_flat_buffer_on_gpu():
    """FlatBuffer of cupy arrays: a GPU buffer with aligned views; stepping it equals the CPU."""
    from fastopt import FlatBuffer

    rng = np.random.default_rng(17)
    host = [rng.standard_normal(s).astype(np.float32) for s in [(7, 5), (13,), (3, 3, 3)]]
    fb = FlatBuffer([cupy.asarray(a) for a in host])
    assert fb.buffer.data.ptr % 64 == 0 and all(v.data.ptr % 64 == 0 for v in fb.views)
    grads = fb.like()
    assert type(grads.buffer) is type(fb.buffer) and grads.offsets == fb.offsets
    cpu_fb = FlatBuffer(host)
    cpu, gpu = fastopt.AdamW(cpu_fb, lr=SCHED), fastopt.AdamW(fb, lr=SCHED)
    for g in _grads(cpu_fb.buffer.size, 10, seed=18):
        grads.buffer[...] = cupy.asarray(g)
        cpu.step(g)
        gpu.step(grads.buffer)
    for view, ref in zip(fb.views, cpu_fb.views, strict=True):
        np.testing.assert_allclose(view.get(), ref, rtol=1e-5, atol=1e-6)
    empty = FlatBuffer.empty([(4, 4)], xp=cupy)
    assert type(empty.buffer) is type(fb.buffer) and float(empty.buffer.sum()) == 0.0


def test_step_returns_before_the_device_finishes():
    """step() only enqueues: behind a kernel that keeps the stream busy for ~0.5 s, two steps
    return while the stream is still running (no host sync), and then take effect in order."""
    if hasattr(cupy, "transfers"):
        pytest.skip("the fake device runs every kernel synchronously")
    spin = cupy.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
        const long long t0 = clock64();
        while (clock64() - t0 < cycles) {}
    }""", "spin")
    p = cupy.random.standard_normal(1 << 20, dtype=cupy.float32)
    g = cupy.random.standard_normal(1 << 20, dtype=cupy.float32)
    opt = fastopt.AdamW(p, lr=SCHED)
    opt.step(g)  # compiles and loads the kernel
    stream = cupy.cuda.get_current_stream()
    stream.synchronize()
    spin((1,), (1,), (np.int64(1_000_000_000),))
    opt.step(g)
    opt.step(g)
    assert not stream.done
    stream.synchronize()
    assert opt.sync_step_count() == 3 and opt.last_lr == pytest.approx(SCHED.at(2), rel=1e-12)




#: a multi-tensor launch's tensors: several chunks with a short last one, one element, one
#: exactly whole chunk
MULTI_SIZES = [70001, 1, 1031, 65536, 300]


@pytest.mark.parametrize("name,state,dtype", [
    ("adam", "float32", "float32"), ("adam", "bfloat16", "float32"), ("adam", "int8", "float32"),
    ("sgd", "float32", "float32"), ("lion", "int8", "bfloat16"), ("adagrad", "float32", "float16")])
def test_multi_tensor_launch_equals_a_launch_per_tensor(name, state, dtype):
    """fastopt.gpu.launch.bind_multi: one launch over a table of tensors (a block per chunk of
    65,536 elements) steps each tensor bit for bit as a launch over it alone, advances the
    shared step counter once a step and reports the lr (on the fake device: the tables, the
    argument packing and the chunks' tiling, each tensor run by the Numba kernel)."""
    from optimizer_cases import full_hypers, initial_state

    from fastopt import _bf16, _int8
    from fastopt.engine import Prepared, device_table
    from fastopt.gpu import launch

    d = REGISTRY[name]
    cls, hypers = CASES[name].options[-1]  # (its state buffers all used)
    full, schedule = full_hypers(cls, hypers), schedule_for(name, SCHED)
    table = device_table(schedule, cupy.cuda.Device().id)

    def tensors():
        rng = np.random.default_rng(31)
        out = []
        for n in MULTI_SIZES:
            values = rng.standard_normal(n).astype(np.float32)
            start = initial_state(d, full, values, schedule)
            states = {}
            for key in d.active_state(full):
                v = np.broadcast_to(np.zeros(n) if start.get(key) is None else start[key],
                                    (n,)).astype(np.float32)
                states[key] = _int8.quantize(cupy.asarray(v), _int8.signed(d, key)) \
                    if state == "int8" else cupy.asarray(_bf16.encode(v) if state == "bfloat16"
                                                         else v)
            grads = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
            if dtype == "float32":
                params, master = cupy.asarray(values), None
            elif dtype == "float16":
                params = cupy.asarray(values.astype(np.float16))
                master = cupy.asarray(values.astype(np.float16).astype(np.float32))
                grads = [g.astype(np.float16) for g in grads]
            else:
                params = cupy.asarray(_bf16.encode(values))
                master = cupy.asarray(_bf16.decode(_bf16.encode(values)))
                grads = [_bf16.encode(g) for g in grads]
            out.append((params, master, states, [cupy.asarray(g) for g in grads],
                        Prepared(d, params, master, states, full, dtype, on_gpu=True)))
        return out

    alone, together = tensors(), tensors()
    counters = [cupy.zeros(2, dtype=cupy.uint64) for _ in alone]
    shared, lr_out = cupy.zeros(2, dtype=cupy.uint64), cupy.zeros(1, dtype=cupy.float64)
    for k in range(1, 5):
        for (_, _, _, grads, prepared), counter in zip(alone, counters, strict=True):
            launch.bind(name, dtype, prepared.kernel_values(
                grads[k - 1], table, table.shape[0], counter, cupy.zeros(1, dtype=cupy.float64),
                1.0, 1.0, fresh=k == 1))()
        launch.bind_multi(name, dtype, [prepared.kernel_values(
            grads[k - 1], table, table.shape[0], shared, lr_out, 1.0, 1.0, fresh=k == 1)
            for _, _, _, grads, prepared in together])()
        assert int(shared[0]) == k and int(shared[1]) == 0
        assert float(lr_out[0]) == pytest.approx(schedule.at(k - 1), rel=1e-12)

    def bits(a):
        return a.get().view(np.uint8)

    for (p, m, st, _, _), (q, m2, st2, _, _) in zip(alone, together, strict=True):
        np.testing.assert_array_equal(bits(q), bits(p))
        if m is not None:
            np.testing.assert_array_equal(bits(m2), bits(m))
        for key in st:
            if state == "int8":
                np.testing.assert_array_equal(bits(st2[key].codes), bits(st[key].codes))
                np.testing.assert_array_equal(bits(st2[key].absmax), bits(st[key].absmax))
            else:
                np.testing.assert_array_equal(bits(st2[key]), bits(st[key]))
    assert not np.array_equal(bits(alone[0][0]), bits(tensors()[0][0]))  # (they moved)


def test_multi_tensor_launch_refuses_tensors_that_differ():
    """bind_multi takes tensors alike in every kernel argument but their buffers: another
    state format, hyperparameter or kernel (other arguments) raises before anything is
    launched."""
    from optimizer_cases import full_hypers

    from fastopt.engine import Prepared, device_table
    from fastopt.gpu import launch

    d = REGISTRY["adam"]
    table = device_table(SCHED, cupy.cuda.Device().id)
    counter, lr_out = cupy.zeros(2, dtype=cupy.uint64), cupy.zeros(1, dtype=cupy.float64)

    def values(state_dtype=cupy.float32, **changed):
        params = cupy.zeros(300, dtype=cupy.float32)
        states = {k: cupy.zeros(300, dtype=state_dtype) for k in ("exp_avg", "exp_avg_sq")}
        prepared = Prepared(d, params, None, states, full_hypers("Adam", changed), "float32",
                            on_gpu=True)
        return prepared.kernel_values(cupy.zeros(300, dtype=cupy.float32), table,
                                      table.shape[0], counter, lr_out, 1.0, 1.0, 0)

    launch.bind_multi("adam", "float32", [values(), values()])  # (alike: bound)
    another_kernel = {k: v for k, v in values().items() if k != "h0"}  # (fewer slots)
    for other, what in ((values(cupy.uint16), "type of 'state0'"),
                        (values(weight_decay=0.1), "'weight_decay'"),
                        (another_kernel, "take different kernels")):
        with pytest.raises(ValueError, match=what):
            launch.bind_multi("adam", "float32", [values(), other])
