"""Chunked gated delta rule: the same recurrence as ``delta_rule_reference``,

    S_t = alpha_t S_{t-1} + delta_t k_t^T,    delta_t = beta_t (v_t - alpha_t S_{t-1} k_t),

computed chunk by chunk with the WY / UT-transform trick of DeltaNet and Gated DeltaNet
(Yang et al. 2024, 2025). Derivation, per head, inside one chunk with start state S_0, g_t the
cumulative log decay since the chunk start (including step t) and gamma_t = exp(g_t):

1. Unrolling the recurrence, every state is the decayed start plus decayed writes,
       S_t = gamma_t S_0 + sum_{s<=t} exp(g_t - g_s) delta_s k_s^T.
2. Putting S_{i-1} from (1) into delta_i:
       delta_i + beta_i sum_{j<i} exp(g_i - g_j) (k_i . k_j) delta_j
           = beta_i (v_i - gamma_i S_0 k_i),
   i.e. with rows indexed by time, (I + A) Delta = diag(beta) (V - diag(gamma) K S_0^T), where
   A = tril(diag(beta) (K K^T) * exp(g_i - g_j), -1) is strictly lower triangular.
3. Hence Delta = U - W S_0^T with the pseudo-values U = (I + A)^{-1} diag(beta) V and
   W = (I + A)^{-1} diag(beta) diag(gamma) K. U and W do not depend on S_0, so one batched
   triangular solve gives them for all chunks at once.
4. Only Delta needs S_0, which is a [C, Dk] x [Dk, Dv] product per chunk; the loop over chunks
   does that and the state update S_C = gamma_C S_0 + Delta^T diag(exp(g_C - g)) K.
5. The outputs then follow for all chunks at once from (1):
       O = scale * [ diag(gamma) Q S_0^T + (Q K^T * exp(g_t - g_s) masked to s<=t) Delta ].

As in the GLA chunk form, every exponent is <= 0 (see ``causal_decay``), so strong decay cannot
overflow. (I + A) has a unit diagonal, so the solve never divides: it is well defined for any
beta in [0, 1], including beta = 0 (then A = 0 and U = W = 0: nothing is written).
"""

from __future__ import annotations

import torch

from routemem.ops.gla.chunk import causal_decay, from_chunks, to_chunks


def delta_rule_chunk(q, k, v, beta, log_alpha, scale, initial_state, chunk_size):
    """Inputs checked by ``gated_delta_rule``. Returns (o [B,T,H,Dv], final [B,H,Dv,Dk])."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), state
    C = min(chunk_size, T)  # a chunk longer than the sequence would only add padding
    q = to_chunks(q * scale, C)  # [B, H, N, C, Dk], scale folded in once
    k, v = to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, Dk], [B, H, N, C, Dv]
    beta = to_chunks(beta, C)[..., None]  # [B, H, N, C, 1]
    log_alpha = to_chunks(log_alpha, C)  # [B, H, N, C]
    decay = causal_decay(log_alpha)  # [B, H, N, C, C]: exp(g_t - g_s) for s <= t, else 0
    gamma = log_alpha.cumsum(-1).exp()[..., None]  # [B, H, N, C, 1]: exp(g_t), chunk start -> t

    # Steps 2-3: one solve for [U | W]. With upper=False and unitriangular=True the solver reads
    # only the strictly lower triangle of A (and its gradient is that triangle's), so the
    # diagonal that ``decay`` includes needs no masking.
    A = beta * (k @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C], used strictly below diagonal
    rhs = beta * torch.cat([v, gamma * k], dim=-1)  # [B, H, N, C, Dv + Dk]
    uw = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u, w = uw.split([Dv, Dk], dim=-1)  # [B, H, N, C, Dv], [B, H, N, C, Dk]

    # Step 4: the only sequential part. k decayed to the chunk end turns Delta into the write.
    k_to_end = k * decay[..., -1, :, None]  # [B, H, N, C, Dk]: exp(g_C - g_s) k_s
    chunk_decay = gamma[..., -1:, :]  # [B, H, N, 1, 1]: exp(g_C)
    starts, deltas = [], []
    # unbind once: indexing [:, :, n] in the loop would cost a full-size gradient per chunk.
    per_chunk = (t.unbind(2) for t in (u, w, k_to_end, chunk_decay))
    for u_n, w_n, k_n, decay_n in zip(*per_chunk):
        starts.append(state)
        delta = u_n - w_n @ state.transpose(-1, -2)  # [B, H, C, Dv]
        deltas.append(delta)
        state = decay_n * state + delta.transpose(-1, -2) @ k_n  # [B, H, Dv, Dk]
    starts = torch.stack(starts, dim=2)  # [B, H, N, Dv, Dk]
    deltas = torch.stack(deltas, dim=2)  # [B, H, N, C, Dv]

    # Step 5: outputs of all chunks at once.
    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C], diagonal included
    o = scores @ deltas + (gamma * q) @ starts.transpose(-1, -2)  # [B, H, N, C, Dv]
    return from_chunks(o, T), state
