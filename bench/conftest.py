import numba
import pytest

from fastopt.benchmark import torch_on_huge_pages

torch_on_huge_pages()  # (before torch allocates: torch's state on huge pages, as fastopt's)


@pytest.fixture(scope="session", autouse=True)
def same_threads_for_torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(numba.get_num_threads())
