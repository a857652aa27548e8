"""Modern-Hopfield retrieval (Ramsauer et al. 2020) and its two energies.

Stored patterns are the rows of ``keys`` [.., N, d] (with ``values`` [.., N, dv] read out); state
patterns are the rows of ``queries`` [.., Lq, d]. One retrieval step gives each query the weights

    p = softmax(beta * q K^T)                                         [.., Lq, N]

and the retrieved pattern p V. These weights are the closed-form minimiser over the simplex of the
free energy (strictly convex in p for beta > 0)

    F(p) = -sum_j p_j <q, k_j> + (1/beta) sum_j p_j log p_j           (``hopfield_energy``)

whose minimum value is -(1/beta) logsumexp(beta q K^T): setting the Lagrangian gradient
-<q, k_j> + (1/beta)(log p_j + 1) + lambda to zero gives p_j proportional to exp(beta <q, k_j>).

``steps > 1`` first moves the state patterns in key space, q <- softmax(beta q K^T) K (the classical
update of hopfield-layers' ``update_steps_max``; ``steps=1`` is one attention pass), then reads out
with the final weights. That update is the CCCP step on the state energy (``hopfield_state_energy``)

    E(xi) = -(1/beta) logsumexp(beta K xi) + 0.5 xi.xi + (1/beta) log N + 0.5 M^2,   M = max_j |k_j|

so it never raises E, and 0 <= E <= 2 M^2 along it (Ramsauer et al., Theorem 1 and its lemma).

Leading dims broadcast as in ``torch.matmul`` (one set of learned queries [H, Lq, d] against a batch
of keys [B, H, N, d]). ``beta``: a number > 0, or a positive tensor broadcastable to the weights
[.., Lq, N] (one per head: shape [H, 1, 1]); default 1 / sqrt(d), hopfield-layers' scaling.
"""

from __future__ import annotations

import math

import torch

from routemem.ops.checks import checking_values

__all__ = ["default_beta", "hopfield_energy", "hopfield_retrieve", "hopfield_state_energy"]


def default_beta(d: int) -> float:
    """hopfield-layers' default inverse temperature: 1 / sqrt(pattern dimension)."""
    return 1.0 / math.sqrt(d)


def _check_tensor(name: str, x, min_dim: int = 2) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < min_dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [.., rows, dim], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_patterns(queries, keys) -> None:
    _check_tensor("queries", queries)
    _check_tensor("keys", keys)
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError(f"queries and keys must share the pattern dimension, got {queries.shape[-1]} "
                         f"and {keys.shape[-1]}")
    if queries.dtype != keys.dtype:
        raise ValueError(f"keys have dtype {keys.dtype} but queries have {queries.dtype}; cast to one dtype")


def _beta(beta, d: int, like: torch.Tensor):
    """None -> 1/sqrt(d); a number or tensor is checked to be finite and > 0."""
    if beta is None:
        return default_beta(d)
    if isinstance(beta, torch.Tensor):
        if checking_values() and not bool(torch.isfinite(beta).all() & (beta > 0).all()):
            raise ValueError("beta must be finite and > 0 everywhere")
        return beta.to(like.dtype)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a finite number > 0 or a tensor of them, got {beta!r}")
    return float(beta)


def _weights(queries: torch.Tensor, keys: torch.Tensor, beta) -> torch.Tensor:
    return torch.softmax(beta * (queries @ keys.transpose(-2, -1)), dim=-1)


def hopfield_retrieve(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta=None, *,
                      steps: int = 1, return_weights: bool = False):
    """queries [.., Lq, d], keys [.., N, d], values [.., N, dv] -> retrieved [.., Lq, dv]
    (and the final weights [.., Lq, N] when ``return_weights``).

    ``steps - 1`` state updates q <- softmax(beta q K^T) K, then p = softmax(beta q K^T), out = p V."""
    _check_patterns(queries, keys)
    _check_tensor("values", values)
    if values.shape[-2] != keys.shape[-2]:
        raise ValueError(f"keys and values must hold the same number of patterns, got {keys.shape[-2]} "
                         f"and {values.shape[-2]}")
    if values.dtype != keys.dtype:
        raise ValueError(f"values have dtype {values.dtype} but keys have {keys.dtype}; cast to one dtype")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    beta = _beta(beta, queries.shape[-1], queries)
    state = queries
    for _ in range(steps - 1):  # the classical update, in key space
        state = _weights(state, keys, beta) @ keys
    p = _weights(state, keys, beta)
    out = p @ values
    return (out, p) if return_weights else out


def hopfield_energy(p: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, beta=None) -> torch.Tensor:
    """The free energy F(p) = -sum_j p_j <q, k_j> + (1/beta) sum_j p_j log p_j of weights
    p [.., Lq, N] (rows on the simplex; 0 log 0 = 0) for queries [.., Lq, d] and keys [.., N, d]
    -> [.., Lq]. Its minimiser over the simplex is softmax(beta q K^T)."""
    _check_patterns(queries, keys)
    _check_tensor("p", p)
    if p.shape[-1] != keys.shape[-2]:
        raise ValueError(f"p must weigh the {keys.shape[-2]} stored patterns, got last dim {p.shape[-1]}")
    beta = _beta(beta, queries.shape[-1], queries)
    scores = queries @ keys.transpose(-2, -1)
    return -(p * scores).sum(-1) + (torch.xlogy(p, p) / beta).sum(-1)


def hopfield_state_energy(queries: torch.Tensor, keys: torch.Tensor, beta=None) -> torch.Tensor:
    """The classical MHN energy of state patterns xi = queries [.., Lq, d] against stored patterns
    keys [.., N, d] -> [.., Lq]:
    E(xi) = -(1/beta) logsumexp(beta K xi) + 0.5 xi.xi + (1/beta) log N + 0.5 M^2, M = max_j |k_j|.
    A tensor ``beta`` broadcasts against the weights [.., Lq, N] with a last dim of 1 ([H, 1, 1])."""
    _check_patterns(queries, keys)
    beta = _beta(beta, queries.shape[-1], queries)
    if isinstance(beta, torch.Tensor) and (beta.dim() == 0 or beta.shape[-1] != 1):
        raise ValueError(f"a beta tensor must end in a dim of 1 (one per state pattern), got {tuple(beta.shape)}")
    scores = beta * (queries @ keys.transpose(-2, -1))  # [.., Lq, N]
    inv_beta = 1.0 / (beta.squeeze(-1) if isinstance(beta, torch.Tensor) else beta)  # [.., Lq] or a number
    M = keys.norm(dim=-1).amax(dim=-1, keepdim=True)  # [.., 1]: the largest stored norm of each set
    return (-inv_beta * torch.logsumexp(scores, dim=-1) + 0.5 * (queries * queries).sum(-1)
            + inv_beta * math.log(keys.shape[-2]) + 0.5 * M ** 2)
