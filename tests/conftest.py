"""Shared test setup: a fixed seed per test, one intra-op thread (the machine is shared), the
``cuda`` marker and the ``device`` fixture.

A test that takes ``device`` runs once on the CPU and once on CUDA. The CUDA run carries the
``cuda`` marker (``pytest -m cuda`` selects exactly these: what ``scripts/device-check.sh`` runs on a
GPU machine) and is skipped, with the reason, where torch sees no GPU. Inputs are drawn on the CPU
and moved, so both devices see the same numbers.

Precision on CUDA: TF32 is turned off for the whole session (cuBLAS matmuls and cuDNN convolutions
would otherwise round float32 operands to 10 mantissa bits, ~1e-3 relative), so float32 and float64
comparisons hold CUDA to the same tolerances as the CPU.
"""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (each program in numpy), which is how
# the CPU tests check mode="triton". Read by Triton when a kernel is defined: set before any test
# module imports routemem's Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from devices import DEVICES, HAS_CUDA  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared machine



def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs on a CUDA GPU (skipped without one); `pytest -m cuda` selects them")
    if HAS_CUDA:  # exact float32 matmuls and convolutions: see the module docstring
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """cpu, then cuda (marked ``cuda``; skipped without a GPU)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
