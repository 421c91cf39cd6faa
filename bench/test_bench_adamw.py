"""pytest-benchmark suite: AdamW + cosine, fastopt vs torch paths vs the same-traffic kernel.

Run: ``pytest bench/ --benchmark-only`` (not part of the default test run). Compare the rows of
one group measured in one run; absolute times depend on the machine.
"""

import numpy as np
import pytest

from fastopt import benchmark as engine
from fastopt import schedules

SIZES = [10_000, 1_000_000, 16_000_000]
SCHEDULE = schedules.cosine(1e-3, 10**6)


CASES = [(f"{n:.2g}", [(n,)]) for n in SIZES] + [engine.load_shapes("resnet50")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c[0])
def problem(request):
    label, shapes = request.param
    return label, engine.Problem(shapes)


@pytest.fixture(scope="session", autouse=True)
def results_agree():
    """fastopt and torch must agree before their speed means anything."""
    assert engine.check_agreement("adamw", 4099) <= 1e-5
    assert engine.check_agreement("adamw", engine.load_shapes("resnet50")[1]) <= 1e-5


def test_fastopt_adamw(benchmark, problem):
    label, prob = problem
    benchmark.group = f"adamw-{label}"
    opt, _ = prob.fastopt("adamw", SCHEDULE)
    benchmark(opt.step, prob.grads.buffer)


@pytest.mark.parametrize("mode", ["fused", "foreach", "forloop"])
def test_torch_adamw(benchmark, problem, mode):
    label, prob = problem
    if mode == "forloop" and prob.params.buffer.size > 1_000_000:
        pytest.skip("the for-loop path here takes minutes of rounds; fastopt bench has it")
    benchmark.group = f"adamw-{label}"
    benchmark(prob.torch("adamw", mode, 10**6)[0])


def test_roofline_4r3w(benchmark, problem):
    label, prob = problem
    benchmark.group = f"adamw-{label}"
    n = prob.params.buffer.size
    bufs = [np.ones(n, np.float32) for _ in range(4)]
    benchmark(engine.copy_traffic_4r3w, *bufs)
