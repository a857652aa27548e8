"""The two T x T maps that gated sparse attention reads: the gate's scores and the dense attention
probabilities (the oracle's source). Both cost O(T^2) memory per head by nature."""

from __future__ import annotations

import math

import torch

from routemem.ops.checks import expect_shape


def causal_mask(T: int, device=None) -> torch.Tensor:
    """[T, T] bool, True where key j <= query i (the keys query i may see)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def gate_scores(gq: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    """The low-rank bilinear gate, per head: s_ij = gq_i . gk_j / sqrt(r), with gq = A x and
    gk = B x already projected (the projections are the caller's parameters).

    gq, gk: [B, T, H, r]. Returns [B, H, T, T] (query i, key j), -inf where j > i, so that a
    future key is never chosen and soft gating sees log sigmoid(-inf) = -inf there."""
    if not isinstance(gq, torch.Tensor) or gq.dim() != 4:
        got = tuple(gq.shape) if isinstance(gq, torch.Tensor) else type(gq).__name__
        raise ValueError(f"gq must be [B, T, H, r], got {got}")
    expect_shape("gk", gk, tuple(gq.shape), "[B, T, H, r] like gq")
    if not gq.is_floating_point() or gk.dtype != gq.dtype:
        raise ValueError(f"gq and gk must share one floating-point dtype, got {gq.dtype} and {gk.dtype}")
    r = gq.shape[-1]
    if r < 1:
        raise ValueError("gq has rank r = 0; the gate needs r >= 1")
    scores = torch.einsum("bihr,bjhr->bhij", gq, gk) / math.sqrt(r)
    return scores.masked_fill(~causal_mask(gq.shape[1], gq.device), float("-inf"))


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Dense causal softmax attention probabilities, q, k [B, T, H, Dk] -> [B, H, T, T] (rows sum to
    1, zeros where j > i): what the oracle mask and attention concentration are measured on."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be [B, T, H, Dk], got {got}")
    expect_shape("k", k, tuple(q.shape), "[B, T, H, Dk] like q")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    return logits.masked_fill(~causal_mask(q.shape[1], q.device), float("-inf")).softmax(dim=-1)
