"""Chunked scalar-decay linear attention: the same recurrence as ``gla_reference``

    S_t = alpha_t S_{t-1} + v_t k_t^T,    o_t = scale * S_t q_t,

computed chunk by chunk. Inside a chunk of length C, with g_t the cumulative log decay since the
chunk start (g_t = sum of log_alpha over the chunk up to and including t) and S_0 the state the
chunk starts from, unrolling the recurrence gives

    S_t = exp(g_t) S_0 + sum_{s<=t} exp(g_t - g_s) v_s k_s^T,

so the outputs of a whole chunk are two matrix products,

    o_t = scale * [ exp(g_t) S_0 q_t + sum_{s<=t} exp(g_t - g_s) (q_t . k_s) v_s ],

and the state handed to the next chunk is S_C. Everything except S_0 is independent between
chunks, so it is computed for all chunks at once; the only Python loop is the cheap
[B, H, Dv, Dk] recurrence S_0 -> S_C over chunks.

Numerics: every exponent is a sum of log_alpha over a segment (see ``causal_decay``) or g_t
itself, so it is <= 0 and nothing overflows however strong the decay. Forms that factor
exp(g_t - g_s) as exp(g_t) * exp(-g_s) would need exp(-g), which overflows float32 once a chunk's
decay passes exp(-88) (18 steps of log_alpha = -5). log_alpha = -inf (alpha = 0, a hard reset) is
exact as well, because masks here select (tril) rather than multiply: -inf * 0 would be NaN.

The helpers ``to_chunks``, ``from_chunks`` and ``causal_decay`` are shared with the chunked delta
rule, whose chunk form has the same decay structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, *D] -> [B, H, N, C, *D], zero-padding T up to N * C.

    Zero padding is harmless for every input of these ops: a padded step has k = v = q = 0,
    beta = 0 and log_alpha = 0 (alpha = 1), so it leaves the state unchanged."""
    x = x.movedim(1, 2)  # [B, H, T, *D]
    T = x.shape[2]
    pad = -T % chunk_size
    if pad:
        # F.pad lists (left, right) pairs from the last dim backwards; T sits before the D dims.
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], (T + pad) // chunk_size, chunk_size, *x.shape[3:])


def from_chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, N, C, D] -> [B, T, H, D], dropping the padding beyond ``length``."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, :length].transpose(1, 2).contiguous()


def causal_decay(log_alpha: torch.Tensor) -> torch.Tensor:
    """log_alpha: [..., C] per-step log decays of each chunk -> [..., C, C] with entry (t, s)
    equal to exp(g_t - g_s) = exp(sum_{s<r<=t} log_alpha_r) for s <= t, the decay from step s to
    step t, and 0 above the diagonal.

    The segment sums are accumulated directly rather than as g_t - g_s from a cumsum g: with
    strong decay g reaches hundreds within a chunk, and the difference of two such float32 numbers
    loses ~|g| * 1e-7 absolute, i.e. ~1e-5 relative error on the decays that matter most."""
    C = log_alpha.shape[-1]
    # terms[r, s] = log_alpha_r for r > s; a cumsum over r then sums exactly the segment (s, t].
    terms = log_alpha[..., :, None].expand(*log_alpha.shape, C).tril(-1)  # [..., C, C]
    segment = terms.cumsum(-2)  # [..., C, C]; 0 on and above the diagonal (empty segments)
    # Above the diagonal the exponent is 0, not a positive number that could overflow, so
    # zeroing after the exp is safe in the backward too (no inf * 0).
    return segment.exp().tril()


def gla_chunk(q, k, v, log_alpha, scale, initial_state, chunk_size):
    """Inputs checked by ``gated_linear_attention``. Returns (o [B,T,H,Dv], final [B,H,Dv,Dk])."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), state
    C = min(chunk_size, T)  # a chunk longer than the sequence would only add padding
    q = to_chunks(q * scale, C)  # [B, H, N, C, Dk], scale folded in once
    k, v = to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, Dk], [B, H, N, C, Dv]
    log_alpha = to_chunks(log_alpha, C)  # [B, H, N, C]
    decay = causal_decay(log_alpha)  # [B, H, N, C, C]
    gamma = log_alpha.cumsum(-1).exp()[..., None]  # [B, H, N, C, 1]: exp(g_t), chunk start -> t

    # Within-chunk part of every output, all chunks at once.
    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C]
    o = scores @ v  # [B, H, N, C, Dv]

    # What each chunk adds to the state, decayed to the chunk end: sum_s exp(g_C - g_s) v_s k_s^T
    # (the last row of ``decay`` holds exp(g_C - g_s)).
    writes = v.transpose(-1, -2) @ (k * decay[..., -1, :, None])  # [B, H, N, Dv, Dk]
    chunk_decay = gamma[..., -1:, :]  # [B, H, N, 1, 1]: exp(g_C)

    starts = []  # the state each chunk starts from
    # unbind once: indexing [:, :, n] in the loop would cost a full-size gradient per chunk.
    for write_n, decay_n in zip(writes.unbind(2), chunk_decay.unbind(2)):
        starts.append(state)
        state = torch.addcmul(write_n, decay_n, state)  # [B, H, Dv, Dk]
    starts = torch.stack(starts, dim=2)  # [B, H, N, Dv, Dk]

    # Contribution of the chunk's start state, decayed to each step: exp(g_t) S_0 q_t.
    o = o + (gamma * q) @ starts.transpose(-1, -2)  # [B, H, N, C, Dv]
    return from_chunks(o, T), state
