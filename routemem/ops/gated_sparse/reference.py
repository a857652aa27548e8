"""Causal softmax attention over the full T x T matrix with a boolean mask and an additive bias:
one formula for every gating, plain and obviously right, the ground truth for the fast forms."""

from __future__ import annotations

import torch


def masked_softmax_attention(q, k, v, allowed, bias, scale):
    """q, k [B, T, H, Dk]; v [B, T, H, Dv]; allowed bool broadcastable to [B, H, T, T] (already
    causal, at least one key per query); bias None or [B, H, T, T] added to the logits.
    Returns [B, T, H, Dv]."""
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if bias is not None:
        logits = logits + bias
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, v)
