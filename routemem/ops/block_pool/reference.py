"""Plain loops over tokens and blocks: slow, obviously right, the ground truth for the fast forms."""

from __future__ import annotations

import math

import torch


def pool_reference(x: torch.Tensor, P: int) -> torch.Tensor:
    """[B, T, D] -> [B, ceil(T/P), D]: the mean of each block of P tokens (the last block may be
    shorter and is the mean of the tokens it has)."""
    T = x.shape[1]
    blocks = [x[:, start : min(start + P, T)].mean(dim=1) for start in range(0, T, P)]
    return torch.stack(blocks, dim=1)


def broadcast_reference(y: torch.Tensor, P: int, T: int) -> torch.Tensor:
    """[B, N, D] -> [B, T, D]: token t gets the output of the last block whose every token is at a
    position <= t, i.e. block c with (c + 1) * P - 1 <= t; zeros while no block is complete."""
    B, _, D = y.shape
    rows = []
    for t in range(T):
        complete = [c for c in range(y.shape[1]) if (c + 1) * P - 1 <= t]
        rows.append(y[:, complete[-1]] if complete else y.new_zeros(B, D))
    return torch.stack(rows, dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over blocks, one query at a time: q, k, v [B, N, H, Dh]."""
    N, Dh = q.shape[1], q.shape[-1]
    out = []
    for c in range(N):
        scores = torch.einsum("bhd,bshd->bhs", q[:, c], k[:, : c + 1]) / math.sqrt(Dh)
        out.append(torch.einsum("bhs,bshd->bhd", scores.softmax(dim=-1), v[:, : c + 1]))
    return torch.stack(out, dim=1)
