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


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n:.2g}")
def problem(request):
    n = request.param
    rng = np.random.default_rng(n)
    return n, rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)


@pytest.fixture(scope="session", autouse=True)
def results_agree():
    """fastopt and torch must agree before their speed means anything."""
    assert engine.check_agreement("adamw", 4099) <= 1e-5


def test_fastopt_adamw(benchmark, problem):
    n, p0, g = problem
    benchmark.group = f"adamw-{n:.2g}"
    opt, _ = engine.fastopt_setup("adamw", p0, SCHEDULE)
    benchmark(opt.step, g)


@pytest.mark.parametrize("mode", ["fused", "foreach", "forloop"])
def test_torch_adamw(benchmark, problem, mode):
    n, p0, g = problem
    if mode == "forloop" and n > 1_000_000:
        pytest.skip("the for-loop path at 1.6e7 takes minutes of rounds; fastopt bench has it")
    benchmark.group = f"adamw-{n:.2g}"
    step, _ = engine.torch_setup("adamw", p0, g, SCHEDULE, mode, 10**6)
    benchmark(step)


def test_roofline_4r3w(benchmark, problem):
    n, p0, g = problem
    benchmark.group = f"adamw-{n:.2g}"
    bufs = [p0.copy(), g.copy(), p0.copy(), g.copy()]
    benchmark(engine.copy_traffic_4r3w, *bufs)
