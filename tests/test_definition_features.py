"""What the definition layer offers beyond today's optimizers, on a test definition registered
for these tests only: per-step scalars kept by the kernel (NAdam's mu_product; on a GPU one
device element the last block updates), state that starts as a copy of the params
(Schedule-Free's z) and state that starts at the first step's lr (Rprop's step_size). Each
layer (core class, functional, fastopt.torch, checkpoints, the CUDA kernel built for the CPU)
is checked against a float64 reference."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _bf16, codegen
from fastopt import schedules as S
from fastopt._core import FlatOptimizer
from fastopt.algorithms import (
    INIT_LR,
    INIT_PARAMS,
    ClassSpec,
    Definition,
    Hyper,
    Scalar,
    State,
)
from fastopt.algorithms._spec import KERNEL_SIGNATURE
from fastopt.engine import Prepared
from fastopt.gpu import build
from fastopt.gpu.launch import pack_args


# (fastopt.codegen reads every name these assign; ruff sees unused locals)
def prologue(step, lr, rho, rho_product):
    rho_product = rho_product * rho  # noqa: F841


def element(p, g, anchor, step_size, *, rho_product):
    step_size = step_size * 0.5
    p = anchor - step_size * rho_product * g  # noqa: F841


TOY = Definition(
    name="toyfeatures", doc="p = anchor - step_size * rho^k * g; step_size halves each step.",
    classes=(ClassSpec("ToyFeatures", "a test definition"),),
    hypers=(Hyper("rho", 0.9, float, slots=("rho",)), Hyper("weight_decay", 0.0, float),
            Hyper("maximize", False, bool)),
    state=(State("anchor", init=INIT_PARAMS), State("step_size", init=INIT_LR)),
    scalars=(Scalar("rho_product", 1.0),),
    decay="l2", prologue=prologue, element=element, lr_default=0.1)


def reference(p0, grads, lr0, rho):
    """Float64: (params, step_size, rho_product) after the steps."""
    anchor, step_size, product = np.asarray(p0, np.float64), lr0, 1.0
    p = anchor
    for g in grads:
        product *= rho
        step_size *= 0.5
        p = anchor - step_size * product * np.asarray(g, np.float64)
    return p, step_size, product


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """The test definition's Numba kernel where the engine looks for it."""
    path = tmp_path_factory.mktemp("ops") / "toyfeatures.py"
    path.write_text(codegen.numba_source(TOY))
    spec = importlib.util.spec_from_file_location("fastopt.cpu.ops.toyfeatures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield
    del sys.modules[spec.name]


class ToyFeatures(FlatOptimizer):
    definition = TOY
    fixed = {}

    def __init__(self, params, lr=0.1, rho=0.9, weight_decay=0.0, maximize=False, *,
                 dtype=None, state_dtype="float32", master_weights="fp32"):
        super().__init__(params, lr, dict(rho=rho, weight_decay=weight_decay, maximize=maximize),
                         dtype, state_dtype, master_weights=master_weights)


def _grads(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("n", [100, 40_000])  # serial and parallel loops
def test_core_class(n):
    p0 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    p = p0.copy()
    opt = ToyFeatures(p, lr=S.cosine(0.2, 100), rho=0.8)
    np.testing.assert_array_equal(opt.state["anchor"], p0)  # a copy of the params
    assert opt.state["anchor"] is not p
    np.testing.assert_array_equal(opt.state["step_size"], np.float32(0.2))  # lr of step 1
    grads = _grads(n, 7)
    for g in grads:
        opt.step(g)
    want_p, want_size, want_product = reference(p0, grads, 0.2, 0.8)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.state["step_size"], want_size, rtol=1e-6)
    d = opt.state_dict()
    assert d["rho_product"] == pytest.approx(want_product, rel=1e-14)
    # a state dict carries the scalar: a resumed run goes on from it
    q = p.copy()
    again = ToyFeatures(q, lr=S.cosine(0.2, 100), rho=0.8)
    again.load_state_dict(d)
    more = _grads(n, 3, seed=9)
    for g in more:
        opt.step(g)
        again.step(g)
    np.testing.assert_array_equal(q, p)
    assert again.state_dict()["rho_product"] == opt.state_dict()["rho_product"]
    bad = dict(d, rho_product=float("nan"))
    with pytest.raises(ValueError, match="rho_product"):
        again.load_state_dict(bad)


def test_checkpoint_keeps_the_scalar(tmp_path, monkeypatch):
    monkeypatch.setattr(fastopt.optimizers, "ToyFeatures", ToyFeatures, raising=False)
    monkeypatch.setattr(fastopt.checkpoint, "OPTIMIZERS",
                        (*fastopt.checkpoint.OPTIMIZERS, "ToyFeatures"))
    monkeypatch.setattr(fastopt.checkpoint, "_STATE_MEMBERS",
                        fastopt.checkpoint._STATE_MEMBERS | set(TOY.state_names))
    p = np.random.default_rng(2).standard_normal(50).astype(np.float32)
    opt = ToyFeatures(p, rho=0.7)
    for g in _grads(50, 4):
        opt.step(g)
    fastopt.save(opt, tmp_path / "c.npz")
    q = np.zeros_like(p)
    back = fastopt.load(tmp_path / "c.npz", q)
    assert back.state_dict()["rho_product"] == opt.state_dict()["rho_product"] == \
        pytest.approx(0.7**4)
    np.testing.assert_array_equal(q, p)


def test_functional_updates_the_scalar_in_place():
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(64).astype(np.float32)
    p, anchor = p0.copy(), p0.copy()
    size = np.full(64, 0.1, np.float32)
    product = np.ones(1)
    grads = _grads(64, 5)
    for k, g in enumerate(grads, start=1):
        fastopt._functional.run(TOY, {}, p, g, {"anchor": anchor, "step_size": size}, step=k,
                                lr=0.1, schedule=None, master=None, dtype=None,
                                hypers={"rho": 0.9}, lr_scale=1.0, grad_scale=1.0, fresh=None,
                                scalars={"rho_product": product})
    want_p, want_size, want_product = reference(p0, grads, 0.1, 0.9)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
    assert product[0] == pytest.approx(want_product, rel=1e-14)
    with pytest.raises(TypeError, match="float64"):
        fastopt._functional.run(TOY, {}, p, g, {"anchor": anchor, "step_size": size}, step=1,
                                lr=0.1, schedule=None, master=None, dtype=None, hypers={},
                                lr_scale=1.0, grad_scale=1.0, fresh=None,
                                scalars={"rho_product": np.ones(1, np.float32)})


def test_torch_layer_per_param_scalars_and_first_step_state():
    torch = pytest.importorskip("torch")
    from fastopt.torch import FlatOptimizer as TorchFlat

    class TorchToy(TorchFlat):
        definition = TOY
        fixed = {}
        twin = None

        def __init__(self, params, lr=0.1, rho=0.9, weight_decay=0.0, maximize=False):
            super().__init__(params, dict(lr=lr, rho=rho, weight_decay=weight_decay,
                                          maximize=maximize))

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = TorchToy([a, b], lr=0.3, rho=0.8)
    ga = [torch.randn(5, 3) for _ in range(4)]
    gb = [torch.randn(7) for _ in range(4)]
    b.data += 1.0  # changed before its first step: its anchor is the value at that step
    b1 = b.detach().clone()
    for k in range(4):
        a.grad = ga[k]
        b.grad = gb[k] if k >= 1 else None  # b skips the first step
        opt.step()
    want_a, _, prod_a = reference(a0.numpy(), [g.numpy() for g in ga], 0.3, 0.8)
    want_b, _, prod_b = reference(b1.numpy(), [g.numpy() for g in gb[1:]], 0.3, 0.8)
    np.testing.assert_allclose(a.detach().numpy(), want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), want_b, rtol=1e-5, atol=1e-6)
    state = opt.state_dict()["state"]
    assert float(state[0]["rho_product"]) == pytest.approx(prod_a, rel=1e-12)
    assert float(state[1]["rho_product"]) == pytest.approx(prod_b, rel=1e-12)
    assert not torch.equal(b1, b0)


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the CUDA kernel for the CPU")
    from test_cuda_host import HERE, _c_type

    out = tmp_path_factory.mktemp("toy_cuda")
    (out / "toyfeatures.cu").write_text(codegen.cuda_source(TOY))
    params = ", ".join(f"{_c_type(t, '')} {n}" for n, t in KERNEL_SIGNATURE)
    names = ", ".join(n for n, _ in KERNEL_SIGNATURE)
    (out / "wrap.cpp").write_text(
        '#include "toyfeatures.cu"\n'
        f'extern "C" void emulate(unsigned grid, unsigned block, {params}) '
        f'{{ fo_emulate_launch(grid, block, [&] {{ toyfeatures_f32({names}); }}); }}\n')
    so = out / "toy.so"
    done = subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared",
                           "-Wall", "-Werror", "-Wno-unknown-pragmas", "-include",
                           str(HERE / "shim.h"), f"-I{build.kernel_dir()}", f"-I{out}",
                           str(out / "wrap.cpp"), "-o", str(so)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from test_cuda_host import CTYPES

    lib = ctypes.CDLL(str(so))
    lib.emulate.argtypes = [ctypes.c_uint, ctypes.c_uint] + [CTYPES.get(t, ctypes.c_void_p)
                                                            for _, t in KERNEL_SIGNATURE]
    return lib


@pytest.mark.parametrize("grid,block", [(1, 1), (3, 4), (2, 32)])
def test_cuda_kernel_keeps_the_scalar_on_the_device(host_kernel, grid, block):
    """Every block reads the old scalar; the last one stores the new value."""
    n = 203
    p0 = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    p, anchor, size = p0.copy(), p0.copy(), np.full(n, 0.25, np.float32)
    product = np.ones(1)
    prepared = Prepared(TOY, p, None, {"anchor": anchor, "step_size": size},
                        {"rho": 0.6, "weight_decay": 0.0, "maximize": False}, "float32",
                        on_gpu=True, scalars={"rho_product": product})
    table = np.ascontiguousarray(S.constant(0.25).table)
    step_state, lr_out = np.zeros(2, np.uint64), np.zeros(1)
    grads = _grads(n, 6)
    for g in grads:
        values = prepared.kernel_values(g, table, 1, step_state, lr_out, 1.0, 1.0, 0)
        args = [a.ctypes.data if isinstance(a, np.ndarray) else a.item()
                for a in pack_args(values)]
        host_kernel.emulate(grid, block, *args)
    want_p, want_size, want_product = reference(p0, grads, 0.25, 0.6)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(size, want_size, rtol=1e-6)
    assert product[0] == pytest.approx(want_product, rel=1e-14)
    assert step_state[0] == 6


def test_bf16_state_and_16bit_params_start_from_the_params():
    p16 = np.random.default_rng(5).standard_normal(300).astype(np.float16)
    opt = ToyFeatures(p16, state_dtype="bfloat16")
    np.testing.assert_array_equal(_bf16.decode(opt.state["anchor"]),
                                  _bf16.decode(_bf16.encode(p16.astype(np.float32))))
