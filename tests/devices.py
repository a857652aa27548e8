"""The devices a test runs on: the CPU always, CUDA where torch sees a GPU.

``DEVICES`` parametrizes the ``device`` fixture (conftest.py); ``on_cuda(value)`` is a parameter that
carries the ``cuda`` marker and is skipped, with the reason, where there is no GPU.
``pytest -m cuda`` selects every CUDA parameter: what ``scripts/device-check.sh`` runs."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = (f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
           "the cuda variant runs on a GPU machine (scripts/device-check.sh)")


def on_cuda(*values, id: str | None = None):
    """A parameter set that runs on CUDA only: marked ``cuda``, skipped without a GPU."""
    return pytest.param(*values, id=id, marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)])


DEVICES = ["cpu", on_cuda("cuda", id="cuda")]
