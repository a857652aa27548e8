"""Chunked metaplastic attention with a hand-written backward that recomputes the chunk states.

Autograd through the chunked form keeps every step's [Dv, Dk] states (memory ~ T * Dv * Dk).
``chunk_forward`` saves only its inputs and the states (M, J) at each chunk start; backward
walks the chunks in reverse and rebuilds one chunk's per-step states at a time.

A chunk of L steps is ns sub-chunks of c steps. The sub-chunk start states come from a small
[ns+1, ns] decay matrix over the sub-chunks' own decayed sums E_j = sum_s w_s v_s k_s^T (plus the
chunk start); then every step's M (and I) is one [c, c+2] matrix times [the sub-chunk's c writes;
its start state; the prior]: ~c + 2 multiply-adds per state entry instead of L for a flat
[L, L] decay matrix. Large temporaries are buffers written in place (``out=``) and reused from
chunk to chunk. The cost is memory traffic: ~10 passes over the per-step states forward and ~25
backward (recompute included), against a handful of small products for plain linear attention.

Backward per step (R = M / I = mu, q pre-scaled):
    dM = (do q^T) / I,   dJ = -dM * R  [- (du (q^2)^T) / I^2],   dq = R^T do [+ 2 q (1/I)^T du].
The adjoints L_t of the per-step writes run the decays backwards (transposed matrices) and give
    dv = L_M k,   dbeta = L_J k^2,   dk = L_M^T v + 2 k * (L_J^T beta);
they are contracted with k, v, beta in factored form, never materialised.
log_alpha_j enters every later state through the cumulative decay G_t. Differentiating
M_t = exp(G_t) M_0 + sum_s exp(G_t - G_s) U_s in G gives dL/dG_t = <dMJ_t, [M, J]_t> - <L_t, U_t>
with <L_t, U_t> = v . dv + beta . dbeta and <dMJ_t, [M, J]_t> = -du . u - I_prior * sum(dJ_t)
(mu is unchanged when M and J are scaled together), so dlog_alpha is a reverse cumulative sum of
per-step scalars, plus <dS_T, S_T> from the final state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routemem.ops.metaplastic.autograd import register_autograd
from routemem.ops.metaplastic.chunk import causal_decay, from_chunks, to_chunks

SUB_CHUNK = 8  # target sub-chunk length: ~sqrt(chunk_size) balances the two matrix products


def _sub_chunk(L: int) -> int:
    """The largest divisor of L that is <= SUB_CHUNK (1 for a prime L: still exact, just slower)."""
    return max(c for c in range(1, min(L, SUB_CHUNK) + 1) if L % c == 0)


class _Chunks:
    """Everything one pass over the chunks needs: inputs split into [N, (2,) B, H, ns, c, D],
    the decay matrices of every chunk, and buffers reused from chunk to chunk. ``states(n, start)``
    builds chunk n's per-step states into ``self.MI``.

    The two recurrences are stacked on a leading axis of size 2 (M: writes v k^T; J: writes
    beta (k^2)^T), outermost so that every slice is a uniformly strided batch of matrices
    (``torch.matmul`` copies operands whose batch strides are not)."""

    def __init__(self, q, k, v, beta, log_alpha, prior, scale, L, backward=False):
        B, _, H, Dk = q.shape
        Dv = v.shape[-1]
        self.c = c = _sub_chunk(L)
        self.ns = ns = L // c
        self.split = lambda x, copy=True: to_chunks(x, L, copy).unflatten(3, (ns, c))  # noqa: E731
        self.N = N = -(-q.shape[1] // L)
        self.qs = torch.mul(self.split(q, False), scale)  # [N, B, H, ns, c, Dk]; o = mu qs
        self.kk = q.new_empty(N, 2, B, H, ns, c, Dk)  # (k, k^2)
        self.kk[:, 0] = self.split(k, False)
        torch.mul(self.kk[:, 0], self.kk[:, 0], out=self.kk[:, 1])
        self.vb = q.new_empty(N, 2, B, H, ns, c, Dv)  # (v, beta)
        self.vb[:, 0], self.vb[:, 1] = self.split(v, False), self.split(beta, False)
        gs = self.split(log_alpha).cumsum(-1)  # [N, B, H, ns, c]: log decay since sub-chunk start
        self.A = causal_decay(gs)  # [N, B, H, ns, c, c]: step s -> step t
        self.into = gs.exp()  # [N, B, H, ns, c]: sub-chunk start -> step t
        self.w = (gs[..., -1:] - gs).exp()  # [N, B, H, ns, c]: step s -> sub-chunk end
        # E_j = [v, beta]^T (w [k, k^2]): each sub-chunk's own writes, summed at its end.
        self.kk_w = self.kk * self.w[:, None, ..., None]
        gend = gs[..., -1].cumsum(-1)  # [N, B, H, ns]: chunk start -> end of sub-chunk i
        gstart = F.pad(gend, (1, 0))  # [N, B, H, ns+1]: chunk start -> start of sub-chunk j
        later = torch.ones(ns + 1, ns, dtype=torch.bool, device=q.device).triu()  # i >= j
        # start of sub-chunk j (row ns: of the next chunk) = D[j] @ E + D_start[j] * chunk start
        self.D = (gstart[..., :, None] - gend[..., None, :]).masked_fill(later, float("-inf")).exp()
        self.D_start = gstart.exp()[..., None]  # [N, B, H, ns+1, 1]
        # [M; I]_t = [A | into | 1] @ [the c writes; sub-chunk start; [0; prior]]. Backward adds
        # a zero row: the slot it fills with the adjoint of E_j.
        coeff = torch.cat([self.A, self.into[..., None], torch.ones_like(self.into)[..., None]], -1)
        self.coeff = F.pad(coeff, (0, 0, 0, 1)) if backward else coeff  # [N, B, H, ns, rows, c+2]
        self.U = q.new_empty(2, B, H, ns, c + 2, Dv, Dk)
        self.U[0, :, :, :, c + 1] = 0
        self.U[1, :, :, :, c + 1] = prior.view(1, H, 1, 1, 1)
        self.E = q.new_empty(2, B, H, ns, Dv * Dk)
        self.S = q.new_empty(2, B, H, ns + 1, Dv * Dk)  # [sub-chunk starts; next chunk start]
        self.MI = q.new_empty(2, B, H, ns, c + backward, Dv, Dk)

    def states(self, n: int, start: torch.Tensor) -> torch.Tensor:
        """Fill ``self.MI`` [2, B, H, ns, rows, Dv, Dk] with chunk n's per-step M and I from its
        start state [2, B, H, Dv Dk] (M, J); return the next chunk's start (a view into self.S)."""
        c, ns, U = self.c, self.ns, self.U
        torch.mul(self.vb[n][..., :, None], self.kk[n][..., None, :], out=U[:, :, :, :, :c])
        E = self.E.view(U[:, :, :, :, 0].shape)  # [2, B, H, ns, Dv, Dk]
        torch.matmul(self.vb[n].transpose(-1, -2), self.kk_w[n], out=E)
        torch.matmul(self.D[n], self.E, out=self.S).addcmul_(self.D_start[n], start[:, :, :, None])
        U[:, :, :, :, c] = self.S[:, :, :, :ns].view(U[:, :, :, :, c].shape)
        torch.matmul(self.coeff[n], U.flatten(-2), out=self.MI.flatten(-2))
        return self.S[:, :, :, ns]


def _chunk_length(T: int, chunk_size: int) -> int:
    return min(chunk_size, -(-T // SUB_CHUNK) * SUB_CHUNK)  # a short sequence: one padded chunk


# Forward and backward are torch.library ops (docs/architecture.md, "Registering an op"): their
# bodies write into reused buffers in place (``out=``), which dynamo cannot trace, so
# torch.compile sees each as one node (the fakes give the shapes) and runs the body as written.
@torch.library.custom_op("routemem::metaplastic_chunk_forward", mutates_args=())
def chunk_forward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, prior: Tensor,
                  M0: Tensor, J0: Tensor, scale: float, with_uncertainty: bool, chunk_size: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (o, uncertainty (empty without with_uncertainty), M_T, J_T, the chunk-start states
    [chunks + 1, 2, B, H, Dv * Dk] that backward rebuilds each chunk from)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    L = _chunk_length(T, chunk_size)
    ch = _Chunks(q, k, v, beta, log_alpha, prior, scale, L)
    M, I = ch.MI  # [B, H, ns, c, Dv, Dk]
    o = q.new_empty(ch.N, B, H, ch.ns, ch.c, 1, Dv)
    unc = torch.empty_like(o) if with_uncertainty else None
    starts = q.new_empty(ch.N + 1, 2, B, H, Dv * Dk)  # (M, J) at each chunk start, and the end
    starts[0] = torch.stack([M0.flatten(-2), J0.flatten(-2)])
    for n in range(ch.N):
        starts[n + 1] = ch.states(n, starts[n])
        mu = M.div_(I)  # in place of M
        torch.matmul(ch.qs[n][..., None, :], mu.transpose(-1, -2), out=o[n])
        if with_uncertainty:
            inv = I.reciprocal_()
            torch.matmul((ch.qs[n] ** 2)[..., None, :], inv.transpose(-1, -2), out=unc[n])
    o = from_chunks(o.view(ch.N, B, H, L, Dv), T).contiguous()
    unc = from_chunks(unc.view(ch.N, B, H, L, Dv), T).contiguous() if with_uncertainty else v.new_empty(0)
    M_T, J_T = (state.clone() for state in starts[-1].view(2, B, H, Dv, Dk))  # outputs may not alias
    return o, unc, M_T, J_T, starts


@chunk_forward.register_fake
def _(q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, chunk_size):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = -(-T // _chunk_length(T, chunk_size))
    return (v.new_empty(v.shape), v.new_empty(v.shape if with_uncertainty else 0),
            q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk), q.new_empty(N + 1, 2, B, H, Dv * Dk))


@torch.library.custom_op("routemem::metaplastic_chunk_backward", mutates_args=())
def chunk_backward(do: Tensor, du: Tensor | None, dM_T: Tensor | None, dJ_T: Tensor | None, q: Tensor,
                   k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, prior: Tensor, starts: Tensor,
                   scale: float, chunk_size: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> the gradients of (q, k, v, beta, log_alpha, prior, M0, J0). A None gradient is zero."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    ch = _Chunks(q, k, v, beta, log_alpha, prior, scale, _chunk_length(T, chunk_size), backward=True)
    c, ns, N = ch.c, ch.ns, ch.N
    neg_do = F.pad(-ch.split(do), (0, 0, 0, 1)).unbind()  # N x [B, H, ns, c+1, Dv], row c = 0
    du = ch.split(du) if du is not None else None
    # Adjoint of the write at step t: L_t = sum_s adj[s, t] G_s over the rows s of G (row c
    # holds the adjoint of E_j, the sub-chunk's sum).
    adj = torch.cat([ch.A, ch.w[..., None, :]], -2)  # [N, B, H, ns, c+1, c]
    into = F.pad(ch.into, (0, 1))[..., None, :]  # [N, B, H, ns, 1, c+1]
    # The sub-chunk recurrence transposed: [dE_j; d chunk start] = D_adj dS_sub + D_last carry.
    D_adj = torch.cat([ch.D[:, :, :, :ns], ch.D_start[:, :, :, :ns]], -1).mT  # [.., ns+1, ns]
    D_last = torch.cat([ch.D[:, :, :, ns], ch.D_start[:, :, :, ns]], -1)[..., None]
    # In place of (M, I) the buffer G becomes (dJ, -dM): pair it with (k^2, k), (beta, v).
    # A column of ones after k^2 gives the row sums of G, i.e. sum(dJ_t).
    kk_t = q.new_ones(N, 2, B, H, ns, Dk, c + 1)
    kk_t[:, 0, ..., :c], kk_t[:, 1, ..., :c] = ch.kk[:, 1].mT, ch.kk[:, 0].mT
    G = ch.MI  # [2, B, H, ns, c+1, Dv, Dk]
    dq_rows = q.new_empty(B, H, ns, c + 1, 1, Dk)
    outer = q.new_empty(B, H, ns, c, Dv, Dk)  # -do q^T
    dS_sub = q.new_empty(2, B, H, ns, 1, Dv * Dk)
    dES = [q.new_empty(2, B, H, ns + 1, Dv * Dk) for _ in range(2)]  # ping-pong: the carry
    X = q.new_empty(2, B, H, ns, c + 1, Dv, c + 1)  # G_s [k_t^2 | 1] (resp. [k_t | 1])
    weights = q.new_empty(2, B, H, ns, c, c + 1, Dv)  # adj[s, t] beta_t (resp. v_t)
    dqs = torch.empty_like(ch.qs)
    dvb, dkb = q.new_empty(N, 2, B, H, ns, Dv, c), q.new_empty(N, 2, B, H, ns, c, Dk)
    dG = q.new_empty(N, B, H, ns, c)  # dL/dG_t (see the module docstring)
    dM_T = q.new_zeros(B, H, Dv, Dk) if dM_T is None else dM_T
    dJ_T = q.new_zeros(B, H, Dv, Dk) if dJ_T is None else dJ_T
    M_T, J_T = starts[-1].view(2, B, H, Dv, Dk)
    final_dot = (dM_T * M_T + dJ_T * J_T).sum((-2, -1))  # [B, H]: <dS_T, S_T>
    carry = torch.stack([dJ_T.flatten(-2), -dM_T.flatten(-2)])  # [2, B, H, Dv Dk] like G
    prior_ = prior.view(1, H, 1, 1)
    dprior = torch.zeros_like(prior)
    for n in reversed(range(N)):
        ch.states(n, starts[n])
        M, I = G[0, :, :, :, :c], G[1, :, :, :, :c]  # [B, H, ns, c, Dv, Dk]
        mu = M.div_(I)
        torch.matmul(neg_do[n][..., None, :], G[0], out=dq_rows)  # -mu^T do; row c of G is 0
        dqs[n] = dq_rows[:, :, :, :c, 0]
        direct = 0  # -du . u: the uncertainty's share of <dMJ_t, [M, J]_t>
        if du is not None:
            qs2 = ch.qs[n] ** 2
            du_Iinv = (du[n][..., None, :] @ I.reciprocal()).squeeze(-2)  # (1/I)^T du
            dqs[n] -= 2 * ch.qs[n] * du_Iinv
            direct = -(du_Iinv * qs2).sum(-1)
            extra = du[n][..., :, None] * qs2[..., None, :] / (I * I)
        torch.mul(neg_do[n][..., :c, :, None], ch.qs[n][..., None, :], out=outer)
        dJ = mu.mul_(torch.div(outer, I, out=I))  # -mu * dM, with -dM in place of I
        if du is not None:
            dJ -= extra
        # Sub-chunk start states: their direct use (row c of G is still 0), then back
        # through D to the sub-chunk sums E_j and to this chunk's start (the new carry).
        torch.matmul(into[n], G.flatten(-2), out=dS_sub)
        dE = torch.matmul(D_adj[n], dS_sub.view(2, B, H, ns, -1), out=dES[n % 2])
        carry = dE.addcmul_(D_last[n], carry[:, :, :, None])[:, :, :, ns]
        G[:, :, :, :, c] = dE[:, :, :, :ns].view(G[:, :, :, :, c].shape)
        # dv_t = sum_s adj[s, t] G_s k_t;  dk_t = sum_s adj[s, t] G_s^T v_t  (and J alike).
        torch.matmul(G.flatten(-3, -2), kk_t[n], out=X.flatten(-3, -2))
        sum_dJ = X[0, :, :, :, :c, :, c].sum(-1)  # [B, H, ns, c]
        dvb[n] = X[..., :c].mul_(adj[n][..., None, :]).sum(-3)  # (dbeta, -dv)^T
        adj_t = adj[n].mT[..., None]  # [B, H, ns, c, c+1, 1]
        torch.mul(adj_t, ch.vb[n, 1, ..., None, :], out=weights[0])
        torch.mul(adj_t, ch.vb[n, 0, ..., None, :], out=weights[1])
        torch.matmul(weights.flatten(-2), G.flatten(-3, -2), out=dkb[n])
        b_db = (ch.vb[n, 1] * dvb[n, 0].mT).sum(-1)  # beta . dbeta
        v_dv = (ch.vb[n, 0] * dvb[n, 1].mT).sum(-1)  # -v . dv
        dG[n] = direct - prior_ * sum_dJ - b_db + v_dv
        dprior += sum_dJ.sum((0, 2, 3))  # I_t = J_t + prior at every step

    dk = 2 * ch.kk[:, 0] * dkb[:, 0] - dkb[:, 1]
    dbeta, dv = dvb.mT.unbind(1)  # [N, B, H, ns, c, Dv]; dv negated
    dG = dG.flatten(-2)  # [N, B, H, L]
    dG[-1, :, :, -1] += final_dot
    flat = lambda x: from_chunks(x.flatten(3, 4), T)  # noqa: E731 [N,B,H,ns,c,..] -> [B,T,H,..]
    dJ0, dM0 = carry.view(2, B, H, Dv, Dk)
    grads = (flat(dqs) * -scale, flat(dk), -flat(dv), flat(dbeta), _reverse_cumsum(dG, T), dprior, -dM0, dJ0)
    return tuple(g.contiguous() for g in grads)  # the layout the fake promises


register_autograd(chunk_forward, chunk_backward)


def _reverse_cumsum(dG: torch.Tensor, T: int) -> torch.Tensor:
    """dG [N, B, H, L] per step -> [B, T, H]: sums over all steps >= t of the whole sequence."""
    N, B, H, L = dG.shape
    seq = dG.permute(1, 2, 0, 3).reshape(B, H, N * L)
    return seq.flip(-1).cumsum(-1).flip(-1)[:, :, :T].transpose(1, 2)
