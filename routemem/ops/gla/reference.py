"""Scalar-decay linear attention as a plain loop over time: the ground truth."""

from __future__ import annotations

import torch


def gla_reference(q, k, v, log_alpha, scale, initial_state):
    """Inputs checked by ``gated_linear_attention``. Returns (o, final state)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        alpha = log_alpha[:, t].exp()[:, :, None, None]
        state = alpha * state + v[:, t, :, :, None] * k[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhvk,bhk->bhv", state, q[:, t]))
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, Dv)
    return o, state
