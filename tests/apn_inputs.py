"""Inputs, the mixture run with gradients, and the comparison shared by the APN op tests (the
grouped and fused forms against the reference). Inputs are drawn on the CPU (the same numbers on
every device), then moved to ``device``."""

import math

import torch

from routemem.ops.apn import patch_mixture, route


def make_inputs(N, d, K, r, dtype=torch.float64, *, unbalanced=False, device="cpu"):
    """z [N, d], prototypes [K, d], V [d, r], U [K, d, r], a, b [K, r] (a, b non-zero so the gate
    matters). ``unbalanced``: every token is a small perturbation of prototype 0, so nearly all
    tokens pick patch 0 first."""
    gen = torch.Generator().manual_seed(N * 1000 + d * 100 + K * 10 + r)

    def randn(*shape):  # drawn in float64: the same numbers whatever the dtype
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    prototypes = randn(K, d)
    z = randn(N, d)
    if unbalanced:
        z = prototypes[0] + 0.3 * z
    out = {"z": z, "prototypes": prototypes, "V": randn(d, r) / math.sqrt(d), "U": randn(K, d, r),
           "a": randn(K, r), "b": randn(K, r)}
    return {name: t.to(device, dtype) for name, t in out.items()}


def assert_close_scaled(actual: dict, expected: dict, rtol: float) -> None:
    """Max abs error of each tensor within rtol of that tensor's own scale (its max abs)."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got is not None and got.shape == want.shape, name
        if not got.is_floating_point():
            assert torch.equal(got, want), f"{name} differs"
            continue
        assert torch.isfinite(got).all(), name
        err = (got - want).abs().max().item() if got.numel() else 0.0
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-6)
        assert err <= rtol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def forward_backward(mode, x, k, tau=0.5, indices=None, weights=None):
    """Route (or take fixed ``indices``/``weights``), mix, and backprop a fixed random cotangent.
    Returns the output, the indices and the gradient of every input (weights included)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    if indices is None:
        routing = route(leaves["z"], leaves["prototypes"], k, tau)
        indices, w = routing.indices, routing.weights
        w.retain_grad()
    else:
        w = weights.detach().clone().requires_grad_()
    out = patch_mixture(leaves["z"], indices, w, leaves["V"], leaves["U"], leaves["a"], leaves["b"], mode=mode)
    gen = torch.Generator().manual_seed(1)
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    (out * cotangent).sum().backward()
    result = {"out": out.detach(), "indices": indices, "grad weights": w.grad}
    for n, t in leaves.items():
        if n != "prototypes" or weights is None:
            result[f"grad {n}"] = t.grad if t.grad is not None else torch.zeros_like(t)
    return result


N0, D0, K0, R0, KK = 6, 4, 3, 2, 2


def good_inputs(dtype=torch.float32, device="cpu"):
    x = make_inputs(N0, D0, K0, R0, dtype, device=device)
    return {"z": x["z"], "indices": torch.randint(0, K0, (N0, KK)).to(device),
            "weights": torch.rand(N0, KK, dtype=torch.float64).to(device, dtype),
            "V": x["V"], "U": x["U"], "a": x["a"], "b": x["b"]}
