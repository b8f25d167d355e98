"""Fixtures every test shares: a fixed seed, and one torch thread.

The tests use tiny models, which gain nothing from intra-op threads; `make test` runs two
pytest workers (pytest-xdist) on two cores, and OpenMP threads spin-waiting for a busy core
make a 0.4 s test take 20 s. Processes the tests start (servers, CLIs) inherit
OMP_NUM_THREADS=1.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
