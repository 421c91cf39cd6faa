import os

# Two test processes share CI's two cores, each with OpenMP thread pools (Numba's parallel
# loops on GNU OpenMP, torch's intra-op threads): OpenMP's default waiting policy spins
# between parallel regions, so the processes' threads spin against each other. Passive
# waiting (threads sleep) took tests/test_adafactor.py and test_muon.py from 166 to 32 s
# under -n 2 on a 2-core host (bench/NOTES.md). Set before torch or an OpenMP runtime loads,
# and inherited by the tests' subprocesses; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from hypothesis import settings

# CI runs the same property-test examples every time (no flaky red); locally they vary.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_problem(rng, n, scale=1.0):
    """Random float32 params and a list-producing gradient generator (never zeros)."""
    params = (rng.standard_normal(n) * scale).astype(np.float32)
    return params


def random_grads(rng, n, steps):
    """Gradients with varied magnitudes per step (some tiny, some large)."""
    scales = np.exp(rng.uniform(-3, 2, size=steps)).astype(np.float32)
    return [(rng.standard_normal(n).astype(np.float32) * s) for s in scales]
