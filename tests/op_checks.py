"""Helpers shared by the op tests: run an op with fixed random cotangents, compare dicts of outputs
and gradients each at its own scale, and mark the modes that need a C++ compiler."""

from __future__ import annotations

import shutil

import pytest
import torch


def outputs_and_grads(op, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``o, final = op(**leaves)``, then backward with fixed random cotangents on both.
    Returns {name: tensor} for o, the final state and the gradient of every leaf."""
    o, final = op(**leaves)
    gen = torch.Generator().manual_seed(1)

    def cotangent(t):  # drawn in float64: the same cotangents whatever the dtype
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)

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
