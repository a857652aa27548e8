"""Shared test setup: a fixed seed per test and one intra-op thread (the machine is shared)."""

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared machine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
