"""pytest-benchmark suite: every optimizer + cosine schedule, fastopt vs torch's fused / foreach /
for-loop paths vs the same-traffic kernel, on one buffer of 1e3..1e8 params and on the model
shape lists (ResNet-50, GPT-2 small), one benchmark group per (optimizer, case).

Run: ``pytest bench/ --benchmark-only`` (not part of the default test run; several minutes).
``FASTOPT_BENCH_SIZES=1e4,1e6`` and ``FASTOPT_BENCH_MODELS=resnet50`` (or ``''``) narrow it.
Sizes that would need more than half of this machine's memory are skipped. Compare the rows of
one group measured in one run; absolute times depend on the machine.
"""

import os

import numpy as np
import pytest

from fastopt import benchmark as engine
from fastopt import schedules

OPTIMIZERS = list(engine.OPTIMIZERS)  # every public optimizer in the registry
SIZES = [int(float(s)) for s in
         os.environ.get("FASTOPT_BENCH_SIZES", "1e3,1e4,1e5,1e6,1e7,1e8").split(",") if s]
MODELS = [m for m in os.environ.get("FASTOPT_BENCH_MODELS", "resnet50,gpt2_small").split(",")
          if m]
SCHEDULE = schedules.cosine(1e-3, 10**6)
#: float32 buffers alive at once in the worst case: params, grads, fastopt's copy and state,
#: a torch path's params, grads and state, and the roofline kernel's four
BUFFERS_AT_ONCE = 14

CASES = [(f"{n:.2g}", [(n,)]) for n in SIZES] + [engine.load_shapes(m) for m in MODELS]


def _fits(shapes) -> bool:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return sum(int(np.prod(s)) for s in shapes) * 4 * BUFFERS_AT_ONCE < memory / 2


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c[0])
def problem(request):
    label, shapes = request.param
    if not _fits(shapes):
        pytest.skip(f"{label} needs more than half of this machine's memory")
    return label, engine.Problem(shapes)


@pytest.fixture(scope="session", autouse=True)
def results_agree():
    """fastopt and torch must agree before their speed means anything."""
    for name in OPTIMIZERS:
        assert engine.check_agreement(name, 4099) <= 1e-5, name
        assert engine.check_agreement(name, engine.load_shapes("resnet50")[1]) <= 1e-5, name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fastopt(benchmark, problem, name):
    label, prob = problem
    benchmark.group = f"{name}-{label}"
    opt, _ = prob.fastopt(name, SCHEDULE)
    benchmark(opt.step, prob.grads.buffer)


@pytest.mark.parametrize("mode", ["fused", "foreach", "forloop"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_torch(benchmark, problem, name, mode):
    label, prob = problem
    if mode not in engine.torch_modes(name):
        pytest.skip(f"torch has no {mode} {name}")
    if mode == "forloop" and len(prob.shapes) == 1 and prob.params.buffer.size > 1_000_000:
        pytest.skip("on one big tensor the for-loop path equals foreach; fastopt bench has it")
    benchmark.group = f"{name}-{label}"
    benchmark(prob.torch(name, mode, 10**6)[0])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_roofline(benchmark, problem, name):
    """A kernel with the optimizer's memory traffic and no arithmetic: the memory limit."""
    label, prob = problem
    benchmark.group = f"{name}-{label}"
    benchmark(engine.roofline(name, prob.params.buffer.size))
