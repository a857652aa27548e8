"""The metaplastic recurrence as a plain loop over time: slow, obviously right, the ground truth
that every faster form is tested against."""

from __future__ import annotations

import torch


def metaplastic_reference(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty):
    """Inputs checked by ``metaplastic_attention``; i_prior is a [H] tensor.
    Returns (o, uncertainty or None, (mu, importance))."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    prior = i_prior.view(1, H, 1, 1)
    if initial_state is None:
        mu = q.new_zeros(B, H, Dv, Dk)
        importance = prior.expand(B, H, Dv, Dk)
    else:
        mu, importance = initial_state
    outputs, uncertainties = [], []
    for t in range(T):
        alpha = log_alpha[:, t].exp()[:, :, None, None]  # [B, H, 1, 1]
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t]  # [B, H, Dk] / [B, H, Dv]
        kept = alpha * importance  # the old evidence, decayed towards the prior
        importance = kept + (1 - alpha) * prior + beta[:, t, :, :, None] * (k_t * k_t)[:, :, None, :]
        mu = (kept * mu + v_t[:, :, :, None] * k_t[:, :, None, :]) / importance
        outputs.append(scale * torch.einsum("bhvk,bhk->bhv", mu, q_t))
        if with_uncertainty:
            uncertainties.append(scale**2 * torch.einsum("bhvk,bhk->bhv", 1 / importance, q_t * q_t))
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, Dv)
    unc = (torch.stack(uncertainties, dim=1) if T else v.new_zeros(B, 0, H, Dv)) if with_uncertainty else None
    return o, unc, (mu, importance)
