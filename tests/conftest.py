"""Shared test setup: one torch thread (the CI machine is shared) and a fixed seed."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield
