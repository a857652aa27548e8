"""Attractor Patch Network ops: similarity routing, and the routed mixture of low-rank patches

    out_n = sum_{i in topk(n)} w_ni U_i (u_n * sigmoid(a_i * u_n + b_i)),    u_n = V^T z_n

with z [N, d], V [d, r] (the shared code projection), U [K, d, r], a, b [K, r].
"""

from __future__ import annotations

import torch

from routemem.ops.apn import fused
from routemem.ops.apn.fused import patch_mixture_fused
from routemem.ops.apn.grouped import group_by_patch, patch_mixture_grouped
from routemem.ops.apn.grouped_mm import patch_mixture_grouped_mm
from routemem.ops.apn.reference import patch_mixture_reference
from routemem.ops.apn.routing import (
    Routing,
    load_balance_loss,
    patch_load,
    route,
    router_probs,
    routing_stats,
)
from routemem.ops.checks import check_mode, checking_values, expect_shape

# fused: the compiled CPU kernel (fused.py); grouped_mm: torch's grouped_mm (grouped_mm.py);
# auto: what measured fastest where it applies (``_auto_mode``).
MODES = ("reference", "grouped", "fused", "grouped_mm", "auto")

__all__ = ["MODES", "Routing", "group_by_patch", "load_balance_loss", "patch_load", "patch_mixture",
           "route", "router_probs", "routing_stats"]


def patch_mixture(z, indices, weights, V, U, a, b, *, mode="grouped"):
    """z [N, d]; indices [N, k] long in [0, K); weights [N, k]; V [d, r]; U [K, d, r]; a, b [K, r].
    Returns [N, d]. ``mode="reference"`` loops over patches; ``"grouped"`` sorts by patch (any
    device); ``"fused"`` is the compiled CPU kernel; ``"grouped_mm"`` sorts by patch and runs
    torch's grouped_mm (float32, bfloat16, float16; float64 runs grouped); ``"auto"`` is fused where
    it applies, else grouped_mm for float32 on a CPU, else grouped. All compute the same function."""
    check_mode(mode, MODES)
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be [N, d], got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    N, d = z.shape
    if not isinstance(U, torch.Tensor) or U.dim() != 3 or U.shape[1] != d:
        raise ValueError(f"U must be [K, d={d}, r], got {tuple(U.shape) if isinstance(U, torch.Tensor) else U}")
    K, _, r = U.shape
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != N:
        raise ValueError(f"indices must be [N={N}, k], got {tuple(getattr(indices, 'shape', ()))}")
    if indices.dtype != torch.long:
        raise ValueError(f"indices must be torch.long, got {indices.dtype}")
    if checking_values() and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
        raise ValueError(f"indices must lie in [0, {K}) (K = number of patches); range is "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    expect_shape("weights", weights, tuple(indices.shape), "[N, k] like indices")
    expect_shape("V", V, (d, r), "[d, r]")
    expect_shape("a", a, (K, r), "[K, r]")
    expect_shape("b", b, (K, r), "[K, r]")
    for name, tensor in (("weights", weights), ("V", V), ("U", U), ("a", a), ("b", b)):
        if tensor.dtype != z.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but z has {z.dtype}; cast all inputs to one dtype")
    if mode == "auto":
        mode = _auto_mode(z)
    fn = {"reference": patch_mixture_reference, "grouped": patch_mixture_grouped,
          "fused": patch_mixture_fused, "grouped_mm": patch_mixture_grouped_mm}[mode]
    return fn(z, indices, weights, V, U, a, b)


def _auto_mode(z: torch.Tensor) -> str:
    """The fastest form measured for z's device and dtype (``routemem bench apn``). On a CPU the
    fused kernel beats grouped_mm, which beats grouped in float32 (torch's CPU grouped_mm is one
    matmul per group). On CUDA grouped stays: grouped_mm is not measured there yet, and torch's
    fast grouped_mm kernel takes bfloat16 on sm90/sm100; other cases loop over the groups."""
    if fused.applies_to(z):
        return "fused"
    if z.device.type == "cpu" and z.dtype == torch.float32:
        return "grouped_mm"
    return "grouped"
