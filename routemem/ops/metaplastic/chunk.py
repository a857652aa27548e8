"""Chunked metaplastic attention: the reference recurrence rewritten as two linear recurrences.

With M = mu * I (the importance-weighted mean) and J = I - I_prior (the evidence above the prior),
the reference update unrolls to

    M_t = alpha_t M_{t-1} + v_t k_t^T,    J_t = alpha_t J_{t-1} + beta_t (k_t^2)^T,
    mu_t = M_t / (J_t + I_prior),         o_t = scale * mu_t q_t,

(I_t = alpha_t I_{t-1} + (1 - alpha_t) I_prior + ... is J_t + I_prior; mu_t I_t = alpha_t I_{t-1}
mu_{t-1} + v_t k_t^T is M_t). Both are scalar-decay linear recurrences, so inside a chunk, with g_t
the cumulative log decay since the chunk start,

    M_t = exp(g_t) M_start + sum_{s<=t} exp(g_t - g_s) v_s k_s^T,

i.e. a [C, C] decay matrix times the per-step writes. Unlike plain linear attention the output
needs the elementwise ratio M_t / I_t, so every step's [Dv, Dk] state is materialised (the cost the
paper states); only the carry of the state from chunk to chunk is a Python loop.

Numerics: exponents are always g_t - g_s with s <= t, or g_t itself, so they are <= 0; the s > t
entries are set to -inf *before* the exp. exp(-g) is never formed: with log_alpha down to ~-5 a
chunk's decay reaches exp(-300), whose inverse overflows.

Two backward paths: ``recompute=True`` (default, ``recompute.py``) keeps only the inputs and the
chunk-start states and rebuilds each chunk's per-step states in backward; ``recompute=False`` is
plain autograd through ``_chunk_autograd`` below, which keeps several [B, H, T, Dv, Dk] tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_chunks(x: torch.Tensor, chunk: int, copy: bool = True) -> torch.Tensor:
    """[B, T, H, *D] -> [N, B, H, chunk, *D] (chunk index first so that one chunk is one
    contiguous slice; ``copy=False`` returns a strided view where no padding is needed),
    zero-padding T up to N * chunk. A padded step has k = v = beta = 0 and log_alpha = 0
    (alpha = 1), so it leaves both states unchanged."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    pad = -T % chunk
    if pad:
        x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad))  # pads dim 1 (time)
    x = x.reshape(B, (T + pad) // chunk, chunk, H, *rest)  # [B, N, C, H, *D]
    x = x.permute(1, 0, 3, 2, *range(4, x.dim()))
    return x.contiguous() if copy else x


def from_chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """[N, B, H, C, D] -> [B, T, H, D], dropping the padding beyond ``length``."""
    N, B, H, C = x.shape[:4]
    return x.permute(1, 0, 3, 2, *range(4, x.dim())).reshape(B, N * C, H, *x.shape[4:])[:, :length]


def causal_decay(g: torch.Tensor) -> torch.Tensor:
    """g: [..., C] cumulative log decay -> [..., C, C], entry (t, s) = exp(g_t - g_s) for s <= t
    (the decay from step s to step t), 0 above the diagonal."""
    C = g.shape[-1]
    above = torch.ones(C, C, dtype=torch.bool, device=g.device).triu(1)
    return (g[..., :, None] - g[..., None, :]).masked_fill(above, float("-inf")).exp()


def linear_state(initial_state, prior: torch.Tensor, like: torch.Tensor, shape: tuple):
    """(mu, importance) -> (M, J) = (mu * I, I - prior); the default start is M = 0, J = 0."""
    if initial_state is None:
        zeros = like.new_zeros(shape)
        return zeros, zeros
    mu, importance = initial_state
    return mu * importance, importance - prior.view(1, -1, 1, 1)


def metaplastic_chunk(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty,
                      chunk_size, *, recompute=True):
    """Inputs checked by ``metaplastic_attention``; i_prior is a [H] tensor.
    Returns (o, uncertainty or None, (mu, importance)), equal to ``metaplastic_reference``.

    ``recompute`` (default) saves only the inputs and one pair of states per chunk for backward
    (memory O(T / chunk_size * Dv * Dk)); ``recompute=False`` is plain autograd (O(T * Dv * Dk))."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0:
        empty = v.new_zeros(B, 0, H, Dv)
        state = initial_state or (q.new_zeros(B, H, Dv, Dk),
                                  i_prior.view(1, H, 1, 1).expand(B, H, Dv, Dk))
        return empty, (empty if with_uncertainty else None), tuple(state)
    M0, J0 = linear_state(initial_state, i_prior, q, (B, H, Dv, Dk))
    if recompute:
        from routemem.ops.metaplastic.recompute import chunk_forward  # it imports helpers here
        o, unc, M, J, _ = chunk_forward(q, k, v, beta, log_alpha, i_prior, M0, J0, scale,
                                        with_uncertainty, chunk_size)
    else:
        o, unc, M, J = _chunk_autograd(q, k, v, beta, log_alpha, i_prior, M0, J0, scale,
                                       with_uncertainty, min(chunk_size, T))
    importance = J + i_prior.view(1, H, 1, 1)
    return o, (unc if with_uncertainty else None), (M / importance, importance)


def _chunk_autograd(q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, C):
    """The chunked form in plain differentiable ops: every chunk's per-step states at once
    ([N, B, H, C, Dv, Dk]), a Python loop over chunks only to carry the chunk-start states.
    Returns (o, uncertainty or None, final M, final J)."""
    T = q.shape[1]
    q, k, v, beta = (to_chunks(x, C) for x in (q, k, v, beta))  # [N, B, H, C, D]
    g = to_chunks(log_alpha, C).cumsum(-1)  # [N, B, H, C]
    decay = causal_decay(g)  # [N, B, H, C, C]
    # Per-step writes of both recurrences, then their within-chunk decayed sums.
    writes_m = v[..., :, None] * k[..., None, :]  # [N, B, H, C, Dv, Dk]
    writes_j = beta[..., :, None] * (k * k)[..., None, :]
    local_m = torch.einsum("nbhts,nbhsvk->nbhtvk", decay, writes_m)
    local_j = torch.einsum("nbhts,nbhsvk->nbhtvk", decay, writes_j)
    chunk_decay = g[..., -1].exp()[..., None, None]  # [N, B, H, 1, 1]
    # Each chunk's own writes summed at its end, sliced once: indexing the big per-step tensors
    # inside the loop would make autograd build a full-size zero gradient per chunk.
    ends_m, ends_j = local_m[:, :, :, -1], local_j[:, :, :, -1]  # [N, B, H, Dv, Dk]
    starts_m, starts_j = [], []  # the states each chunk starts from
    M, J = M0, J0
    for n in range(g.shape[0]):
        starts_m.append(M)
        starts_j.append(J)
        M = chunk_decay[n] * M + ends_m[n]
        J = chunk_decay[n] * J + ends_j[n]
    into = g.exp()[..., None, None]  # [N, B, H, C, 1, 1]: decay from the chunk start to step t
    M_steps = local_m + into * torch.stack(starts_m)[:, :, :, None]
    I_steps = local_j + into * torch.stack(starts_j)[:, :, :, None] + prior.view(1, 1, -1, 1, 1, 1)
    o = scale * torch.einsum("nbhtvk,nbhtk->nbhtv", M_steps / I_steps, q)
    unc = None
    if with_uncertainty:
        unc = from_chunks(scale**2 * torch.einsum("nbhtvk,nbhtk->nbhtv", 1 / I_steps, q * q), T)
    return from_chunks(o, T), unc, M, J
