"""Shared test setup: one torch thread (the CI machine is shared) and a fixed seed."""
import os

import pytest
import torch

torch.set_num_threads(1)
# the runtime takes the kernel graphs of MoE exports without timing them against the
# .onnx graphs (that choice depends on the CPU; test_rt_encoder_choice.py tests it)
os.environ["WENET_MOE_KERNEL_EXPERTS"] = "on"


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield
