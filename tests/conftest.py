import os

import pytest
import torch

# Tests never reach for the network, and stay on one thread each: the CI machine has two cores.
os.environ.setdefault("BPFREE_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def digits():
    from bpfree.data import load

    return load("digits")
