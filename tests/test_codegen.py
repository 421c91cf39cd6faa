"""The generated kernels and APIs are what fastopt.codegen writes from the definitions, and
the generator handles a definition it has never seen (a new optimizer needs no other file)."""

import importlib.util
import warnings

import numpy as np
import pytest

from fastopt import codegen
from fastopt.algorithms import ClassSpec, Definition, Hyper, State
from fastopt.algorithms._spec import KERNEL_SIGNATURE


def test_checked_in_files_are_what_the_generator_writes():
    stale = codegen.differences()
    assert not stale, f"run `python -m fastopt.codegen`: {[str(p) for p in stale]}"
    assert codegen.main(["--check"]) == 0


def _toy_prologue(step, lr, beta):
    one_minus_beta = 1.0 - beta  # noqa: F841  (read by the generator)


def _toy_element(p, g, velocity, *, lr, beta, one_minus_beta, clip):
    velocity = beta * velocity + one_minus_beta * min(max(g, -clip), clip)
    p = p - lr * velocity


TOY = Definition(
    name="toyball", doc="A heavy ball with a clipped gradient (a test definition).",
    classes=(ClassSpec("Toyball", "toy"),),
    hypers=(Hyper("beta", 0.9, float, slots=("beta",)), Hyper("clip", 1.0, float, slots=("clip",)),
            Hyper("weight_decay", 0.0, float), Hyper("maximize", False, bool)),
    state=(State("velocity"),), decay="decoupled", prologue=_toy_prologue,
    element=_toy_element, lr_default=0.1)


def test_a_new_definition_generates_a_working_numba_kernel(tmp_path):
    path = tmp_path / "toyball.py"
    path.write_text(codegen.numba_source(TOY))
    spec = importlib.util.spec_from_file_location("fastopt.cpu.ops.toyball", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Numba may not cache a module outside the package
        spec.loader.exec_module(module)
        rng = np.random.default_rng(0)
        p = rng.standard_normal(100).astype(np.float32)
        v = np.zeros(100, np.float32)
        ref_p, ref_v = p.astype(np.float64), np.zeros(100)
        table = np.array([[0, 0, 0, 0.1, 0, 0, 0, 0, 0]], np.float64)
        for k in range(1, 6):
            g = rng.standard_normal(100).astype(np.float32) * 2
            one = np.zeros(1)  # the (unused) per-step scalar slots
            lr = module.toyball(params=p, master=p, state0=v, state1=v, state2=v, state3=v,
                                scalar0=one, scalar1=one, scalar2=one, scalar3=one,
                                weight_decay=0.01, decoupled=True, maximize=False, h0=0.9,
                                h1=0.5, h2=0.0, h3=0.0, h4=0.0, h5=0.0, h6=0.0, h7=0.0, fmt=0,
                                l2=None, grads=g, table=table, step=k, lr_scale=1.0, grad_mult=1.0,
                                fresh=0, parallel=False)
            assert lr == 0.1
            ref_p = ref_p * (1 - 0.1 * 0.01)
            ref_v = 0.9 * ref_v + 0.1 * np.clip(g, -0.5, 0.5)
            ref_p = ref_p - 0.1 * ref_v
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p, ref_p, rtol=1e-5, atol=1e-6)


def test_a_new_definition_generates_cuda_that_nvrtc_compiles():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings not installed")
    from test_cuda_compile import compile_source

    source = codegen.cuda_source(TOY)
    # the uniform signature (and a chunk of a multi-tensor launch's table)
    assert "FO_D void toyball(FO_KERNEL_PARAMS(T, S), FoSpan span = FoSpan())" in source
    header = codegen.signature_header()
    assert all(f"{ctype} {name}" in header for name, ctype in KERNEL_SIGNATURE)
    log, binary = compile_source("toyball.cu", "compute_90", code=source)  # (PTX: no ptxas)
    assert "warning" not in log.lower(), log
    assert b"toyball_bf16_sbf16" in binary
    assert TOY.multi_launch and b"toyball_multi_bf16_sbf16" in binary


def _no_prologue(step, lr):
    pass


def _bad_element(p, g, velocity, *, lr):
    velocity = velocity ** 2
    p = p - lr * velocity


def _unknown_call(p, g, velocity, *, lr):
    p = p - lr * np.tanh(g)


@pytest.mark.parametrize("element,match", [(_bad_element, r"\*\*"),
                                           (_unknown_call, "not in the definition subset")])
def test_definitions_outside_the_subset_are_refused(element, match):
    bad = Definition(name="bad", doc="", classes=(ClassSpec("Bad", ""),), hypers=(),
                     state=(State("velocity"),), decay="l2", prologue=_no_prologue,
                     element=element, lr_default=0.1)
    with pytest.raises(codegen.DefinitionError, match=match):
        codegen.numba_source(bad)
