"""Similarity routing for Attractor Patch Networks: cosine scores against prototypes, top-k,
softmax over the kept scores; the Switch-style load-balance loss; and routing diagnostics.

The load-balance loss is K * sum_i f_i P_i with f_i the fraction of (token, slot) assignments
that went to patch i (a count: no gradient) and P_i the mean router probability of patch i over
all K (differentiable), so the gradient pushes probability away from overloaded patches. A loss
built from counts alone would have no gradient at all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from routemem.ops.checks import checking_values


class Routing(NamedTuple):
    indices: torch.Tensor  # [N, k] long: the kept patches, best first
    weights: torch.Tensor  # [N, k]: softmax over the kept scores (rows sum to 1)
    scores: torch.Tensor  # [N, K]: cos(z, p_i) / tau for every patch


def route(z: torch.Tensor, prototypes: torch.Tensor, top_k: int, tau: float | torch.Tensor) -> Routing:
    """z [N, d], prototypes [K, d] -> Routing. tau (> 0) is a float or a 0-dim tensor (learned)."""
    if z.dim() != 2 or prototypes.dim() != 2 or z.shape[1] != prototypes.shape[1]:
        raise ValueError(f"z must be [N, d] and prototypes [K, d] with the same d, got {tuple(z.shape)} "
                         f"and {tuple(prototypes.shape)}")
    if not 1 <= top_k <= prototypes.shape[0]:
        raise ValueError(f"top_k must be in [1, K={prototypes.shape[0]}], got {top_k}")
    if checking_values() and not bool(torch.as_tensor(tau) > 0):
        raise ValueError(f"tau must be > 0, got {float(tau)}")
    scores = F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T / tau
    kept, indices = scores.topk(top_k, dim=-1)
    return Routing(indices, kept.softmax(-1), scores)


def patch_load(indices: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[K] fraction of all (token, slot) assignments that went to each patch (sums to 1)."""
    counts = torch.bincount(indices.flatten(), minlength=n_patches)
    return counts.float() / max(1, indices.numel())


def router_probs(routing: Routing) -> torch.Tensor:
    """[N, K] softmax over all K scores (the router's full distribution per token)."""
    return routing.scores.softmax(-1)


def load_balance_loss(routing: Routing, probs: torch.Tensor | None = None) -> torch.Tensor:
    """K * sum_i f_i * P_i: 1 when routing is uniform, up to K when everything goes to one patch.
    ``probs``: ``router_probs(routing)`` if already computed (shared with ``routing_stats``)."""
    n_patches = routing.scores.shape[-1]
    if routing.scores.shape[0] == 0:
        return routing.scores.sum()  # no tokens, no imbalance (and no NaN from an empty mean)
    fraction = patch_load(routing.indices, n_patches).to(routing.scores.dtype)
    mean_prob = (router_probs(routing) if probs is None else probs).mean(0)
    return n_patches * (fraction * mean_prob).sum()


@torch.no_grad()
def routing_stats(routing: Routing, probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diagnostics as 0-dim tensors (no device sync until someone reads them): load entropy
    (nats; log K is perfectly balanced), the mean per-token router entropy over all K, the
    largest load, and the fraction of patches no token was routed to."""
    n_patches = routing.scores.shape[-1]
    load = patch_load(routing.indices, n_patches)
    probs = router_probs(routing) if probs is None else probs
    return {
        "load_entropy": -(load * load.clamp_min(1e-12).log()).sum(),
        "router_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(),
        "max_load": load.max(),
        "unused_fraction": (load == 0).float().mean(),
    }
