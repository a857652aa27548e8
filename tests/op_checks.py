"""Helpers shared by the op tests: run an op with fixed random cotangents, compare dicts of outputs
and gradients each at its own scale, mark the modes that need a C++ compiler, and pair modes with
the devices they run on (the fused kernels are CPU code)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from devices import on_cuda


def outputs_and_grads(op, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``o, final = op(**leaves)``, then backward with fixed random cotangents on both.
    Returns {name: tensor} for o, the final state and the gradient of every leaf."""
    o, final = op(**leaves)
    gen = torch.Generator().manual_seed(1)

    def cotangent(t):  # drawn in float64 on the CPU: the same cotangents whatever the dtype and device
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)

    ((o * cotangent(o)).sum() + (final * cotangent(final)).sum()).backward()
    out = {"o": o.detach(), "final_state": final.detach()}
    out.update({f"grad {n}": t.grad for n, t in leaves.items()})
    return out


def assert_close_scaled(actual: dict, expected: dict, rtol: float) -> None:
    """Max abs error of each tensor within rtol of that tensor's own scale (its max abs)."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got is not None and torch.isfinite(got).all(), name
        err = (got - want).abs().max().item()
        assert err <= rtol * max(want.abs().max().item(), 1e-6), f"{name}: max error {err:.3g}"


HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++"))


def needs_compiler(mode: str):
    """A ``mode`` test parameter that is skipped where there is no C++ compiler (fused kernels)."""
    return pytest.param(mode, marks=pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler"))


CPU_ONLY_MODES = ("fused",)  # the compiled kernels: a CUDA tensor gets a ValueError (tested apart)
GPU_MODES = ("triton",)  # compiled by Triton for a GPU (on a CPU only its interpreter runs them, uncompiled)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it where torch sees no GPU
NOT_INTERPRETED = "Triton kernels run on a CPU only under TRITON_INTERPRET=1 (set where there is no GPU)"


def on_devices(*modes: str) -> list:
    """(mode, device) parameters: every mode on the CPU (``fused`` and ``auto`` need a compiler
    there), and every mode but the CPU kernels on CUDA (``auto`` picks the PyTorch form there)."""
    cpu = [pytest.param(m, "cpu", id=f"{m}-cpu",
                        marks=[pytest.mark.skipif(m in ("fused", "auto") and not HAS_COMPILER,
                                                  reason="no C++ compiler"),
                               pytest.mark.skipif(m in GPU_MODES and not INTERPRETED, reason=NOT_INTERPRETED)])
           for m in modes]
    return cpu + [on_cuda(m, "cuda", id=f"{m}-cuda") for m in modes if m not in CPU_ONLY_MODES]
