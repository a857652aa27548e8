"""Rotary position embedding (half-split form), applied to [B, T, H, Dh] heads."""

from __future__ import annotations

import torch


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0, device=None):
    """cos, sin of shape [seq_len, head_dim // 2] in float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = halves of the head dim; cos/sin are [T, Dh/2] for x's positions."""
    # Half-precision inputs rotate in float32 (angles at long positions need it); float32 and
    # float64 keep their own precision, so float64 gradcheck sees an exact float64 computation.
    work = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(work), sin[:, None, :].to(work)  # broadcast over heads
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)
