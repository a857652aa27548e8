"""The gated delta rule as a plain loop over time: the ground truth."""

from __future__ import annotations

import torch


def delta_rule_reference(q, k, v, beta, log_alpha, scale, initial_state):
    """Inputs checked by ``gated_delta_rule``. Returns (o, final state)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        k_t, b_t = k[:, t], beta[:, t, :, None]  # [B, H, Dk], [B, H, 1]
        state = log_alpha[:, t].exp()[:, :, None, None] * state
        recalled = torch.einsum("bhvk,bhk->bhv", state, k_t)  # what S currently returns for k_t
        # S (I - b k k^T) + b v k^T  ==  S + b (v - S k) k^T: move the recall towards v.
        state = state + (b_t * (v[:, t] - recalled))[:, :, :, None] * k_t[:, :, None, :]
        outputs.append(scale * torch.einsum("bhvk,bhk->bhv", state, q[:, t]))
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, Dv)
    return o, state
