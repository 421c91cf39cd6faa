import numba
import pytest


@pytest.fixture(scope="session", autouse=True)
def same_threads_for_torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(numba.get_num_threads())
