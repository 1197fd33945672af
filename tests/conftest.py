"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The golden models' tensors are tiny: intra-op threads only add synchronisation,
    which becomes seconds per step when the 2 cores are shared with other jobs.
    Integer results do not depend on the thread count. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
