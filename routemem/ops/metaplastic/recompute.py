"""Chunked metaplastic attention with a hand-written backward that recomputes the chunk states.

Autograd through the chunked form keeps every step's [Dv, Dk] states (memory ~ T * Dv * Dk).
``MetaplasticChunkFn`` saves only its inputs and the states (M, J) at each chunk start; backward
walks the chunks in reverse and rebuilds one chunk's per-step states at a time.

A chunk of L steps is ns sub-chunks of c steps. The sub-chunk start states come from a small
[ns+1, ns] decay matrix over the sub-chunks' own decayed sums E_j = sum_s w_s v_s k_s^T (plus the
chunk start); then every step's M (and I) is one [c, c+2] matrix times [the sub-chunk's c writes;
its start state; the prior]: ~c + 2 multiply-adds per state entry instead of L for a flat
[L, L] decay matrix. All large temporaries are buffers reused across chunks: on CPU, fresh
multi-megabyte tensors cost page faults that take longer than the arithmetic.

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

from routemem.ops.metaplastic.chunk import causal_decay, from_chunks, to_chunks

SUB_CHUNK = 8  # target sub-chunk length: ~sqrt(chunk_size) balances the two matrix products


def _sub_chunk(L: int) -> int:
    """The largest divisor of L that is <= SUB_CHUNK (1 for a prime L: still exact, just slower)."""
    return max(c for c in range(1, min(L, SUB_CHUNK) + 1) if L % c == 0)


class _Chunks:
    """Inputs split into [N, B, H, ns, (2,) c, D] for all chunks, the decay matrices, and reused
    buffers; ``states(n, start)`` builds chunk n's per-step [M; I] into ``self.MI``.
    The "2" axis holds the two recurrences side by side: M (v k^T) first, J (beta (k^2)^T) second."""

    def __init__(self, q, k, v, beta, log_alpha, prior, scale, L, backward=False):
        B, _, H, Dk = q.shape
        Dv = v.shape[-1]
        self.c = c = _sub_chunk(L)
        self.ns = ns = L // c
        self.split = lambda x: to_chunks(x, L).unflatten(3, (ns, c))  # noqa: E731 [N,B,H,ns,c,..]
        self.qs = self.split(q) * scale  # scale folded into q: o = R qs, uncertainty = (1/I) qs^2
        k, v, beta = self.split(k), self.split(v), self.split(beta)
        self.N = N = self.qs.shape[0]
        self.kk = torch.stack([k, k * k], 4)  # [N, B, H, ns, 2, c, Dk]
        self.vb = torch.stack([v, beta], 4)  # [N, B, H, ns, 2, c, Dv]
        gs = self.split(log_alpha).cumsum(-1)  # [N, B, H, ns, c]: log decay since sub-chunk start
        self.A = causal_decay(gs)  # [N, B, H, ns, c, c]: step s -> step t
        self.into = gs.exp()  # [N, B, H, ns, c]: sub-chunk start -> step t
        self.w = (gs[..., -1:] - gs).exp()  # [N, B, H, ns, c]: step s -> sub-chunk end
        # E_j = (w [v, beta])^T [k, k^2]: each sub-chunk's own writes, summed at its end.
        self.wvb_t = (self.vb * self.w[:, :, :, :, None, :, None]).transpose(-1, -2).contiguous()
        gend = gs[..., -1].cumsum(-1)  # [N, B, H, ns]: chunk start -> end of sub-chunk i
        gstart = F.pad(gend, (1, 0))  # [N, B, H, ns+1]: chunk start -> start of sub-chunk j
        later = torch.ones(ns + 1, ns, dtype=torch.bool, device=q.device).triu()  # i >= j
        # start of sub-chunk j (row ns: of the next chunk) = D[j] @ E + D_start[j] * chunk start
        self.D = (gstart[..., :, None] - gend[..., None, :]).masked_fill(later, float("-inf")).exp()
        self.D_start = gstart.exp()[..., None]  # [N, B, H, ns+1, 1]
        # [M; I]_t = [A | into | 1] @ [writes; sub-chunk start; [0; prior]].
        coeff = torch.cat([self.A, self.into[..., None], torch.ones_like(self.into)[..., None]], -1)
        # Forward keeps M and I of one step together ([.., c, 2, Dv, Dk]: mu_t q_t is one batched
        # product); backward keeps each recurrence's steps together ([.., 2, c+1, Dv, Dk]: its
        # contractions over (step, Dv) are plain matrix products) and adds a zero row, the slot
        # for the adjoint of E_j.
        self.backward = backward
        if backward:
            coeff = F.pad(coeff, (0, 0, 0, 1))[:, :, :, :, None]  # [N,B,H,ns,1,c+1,c+2]
        self.coeff = coeff
        rows = c + backward
        self.U = q.new_empty(B, H, ns, c + 2, 2, Dv, Dk).transpose(3, 4)  # [B,H,ns,2,c+2,Dv,Dk]
        self.MI = q.new_empty(B, H, ns, rows, 2, Dv, Dk).transpose(3, 4)  # [B,H,ns,2,rows,Dv,Dk]
        if backward:
            self.U = self.U.contiguous()
            self.MI = self.MI.contiguous()
        self.U[:, :, :, 0, c + 1] = 0
        self.U[:, :, :, 1, c + 1] = prior.view(1, H, 1, 1, 1)
        self.E = q.new_empty(B, H, ns, 2 * Dv * Dk)
        self.S = q.new_empty(B, H, ns + 1, 2 * Dv * Dk)  # [sub-chunk starts; next chunk start]

    def states(self, n: int, start: torch.Tensor) -> torch.Tensor:
        """Fill ``self.MI`` ([B, H, ns, 2, rows, Dv, Dk]) with chunk n's per-step M and I from its
        start state [B, H, 2 Dv Dk]; return the next chunk's start state (a view into self.S)."""
        c, ns, U = self.c, self.ns, self.U
        torch.mul(self.vb[n, :, :, :, 0, :, :, None], self.kk[n, :, :, :, 0, :, None, :], out=U[:, :, :, 0, :c])
        torch.mul(self.vb[n, :, :, :, 1, :, :, None], self.kk[n, :, :, :, 1, :, None, :], out=U[:, :, :, 1, :c])
        torch.matmul(self.wvb_t[n], self.kk[n], out=self.E.view(U[:, :, :, :, 0].shape))
        torch.matmul(self.D[n], self.E, out=self.S).addcmul_(self.D_start[n], start[:, :, None])
        U[:, :, :, :, c] = self.S[:, :, :ns].view(U[:, :, :, :, c].shape)
        if self.backward:  # one [rows, c+2] matrix for both recurrences, broadcast
            torch.matmul(self.coeff[n], U.flatten(-2), out=self.MI.flatten(-2))
        else:  # U, MI stored [.., c+2 (rows), 2, Dv, Dk]
            U, MI = U.transpose(3, 4), self.MI.transpose(3, 4)
            torch.matmul(self.coeff[n], U.flatten(-3), out=MI.flatten(-3))
        return self.S[:, :, ns]


class MetaplasticChunkFn(torch.autograd.Function):
    """(q, k, v, beta, log_alpha, prior [H], M0, J0, scale, with_uncertainty, chunk_size) ->
    (o, uncertainty or None, M_T, J_T); saves the inputs and the chunk-start states only."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, chunk_size):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        L = min(chunk_size, T)
        ch = _Chunks(q, k, v, beta, log_alpha, prior, scale, L)
        M, I = ch.MI[:, :, :, 0], ch.MI[:, :, :, 1]  # [B, H, ns, c, Dv, Dk]
        o = q.new_empty(ch.N, B, H, ch.ns, ch.c, 1, Dv)
        unc = torch.empty_like(o) if with_uncertainty else None
        starts = q.new_empty(ch.N + 1, B, H, 2 * Dv * Dk)  # [M, J] at each chunk start, and the end
        starts[0] = torch.cat([M0.flatten(-2), J0.flatten(-2)], -1)
        for n in range(ch.N):
            starts[n + 1] = ch.states(n, starts[n])
            R = M.div_(I)  # mu_t, in place of M
            torch.matmul(ch.qs[n][..., None, :], R.transpose(-1, -2), out=o[n])
            if with_uncertainty:
                torch.matmul((ch.qs[n] ** 2)[..., None, :], I.reciprocal_().transpose(-1, -2), out=unc[n])
        ctx.save_for_backward(q, k, v, beta, log_alpha, prior, starts)
        ctx.scale, ctx.with_uncertainty, ctx.L = scale, with_uncertainty, L
        o = from_chunks(o.view(ch.N, B, H, L, Dv), T)
        if with_uncertainty:
            unc = from_chunks(unc.view(ch.N, B, H, L, Dv), T)
        M_T, J_T = starts[-1].view(B, H, 2, Dv, Dk).unbind(2)
        return o, unc, M_T, J_T

    @staticmethod
    def backward(ctx, do, du, dM_T, dJ_T):
        q, k, v, beta, log_alpha, prior, starts = ctx.saved_tensors
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        ch = _Chunks(q, k, v, beta, log_alpha, prior, ctx.scale, ctx.L, backward=True)
        c, ns, N = ch.c, ch.ns, ch.N
        neg_do = -ch.split(do)  # [N, B, H, ns, c, Dv]
        du = ch.split(du) if ctx.with_uncertainty and du is not None else None
        # Adjoint of the write at step t: L_t = sum_s A[s, t] G_s + w_t dE_j over rows s of G.
        adj = torch.cat([ch.A, ch.w[..., None, :]], -2)[:, :, :, :, None]  # [N,B,H,ns,1,c+1,c]
        into = F.pad(ch.into, (0, 1))[:, :, :, :, None, None]  # [N, B, H, ns, 1, 1, c+1]
        # In place of [M; I] the buffer G becomes [dJ; dM] (that order), so pair with [k^2; k].
        kk_t = ch.kk.flip(4).transpose(-1, -2)  # [N, B, H, ns, 2, Dk, c]
        vb = ch.vb.flip(4)  # [N, B, H, ns, 2, c, Dv]: [beta; v]
        G = ch.MI  # [B, H, ns, 2, c+1, Dv, Dk]; row c: the adjoint of E_j
        dS_sub = q.new_empty(B, H, ns, 2, 1, Dv * Dk)
        dE = q.new_empty(B, H, ns, 2 * Dv * Dk)
        X = q.new_empty(B, H, ns, 2, c + 1, Dv, c)  # G_s k_t (resp. k_t^2)
        weights = q.new_empty(B, H, ns, 2, c, c + 1, Dv)  # adj[s, t] v_t (resp. beta_t)
        dqs = torch.empty_like(ch.qs)
        dvb, dkb = q.new_empty(N, B, H, ns, 2, Dv, c), q.new_empty(N, B, H, ns, 2, c, Dk)
        dG = q.new_empty(N, B, H, ns, c)  # dL/dG_t (see the module docstring)
        dM_T = q.new_zeros(B, H, Dv, Dk) if dM_T is None else dM_T
        dJ_T = q.new_zeros(B, H, Dv, Dk) if dJ_T is None else dJ_T
        M_T, J_T = starts[-1].view(B, H, 2, Dv, Dk).unbind(2)
        final_dot = (dM_T * M_T + dJ_T * J_T).sum((-2, -1))  # [B, H]: <dS_T, S_T>
        carry = torch.cat([dJ_T.flatten(-2), dM_T.flatten(-2)], -1)  # [B, H, F], [dJ, dM]
        minus_one, prior_ = q.new_tensor(-1.0), prior.view(1, H, 1, 1)
        dprior = torch.zeros_like(prior) if ctx.needs_input_grad[5] else None
        for n in reversed(range(N)):
            ch.states(n, starts[n])
            M, I = G[:, :, :, 0, :c], G[:, :, :, 1, :c]  # [B, H, ns, c, Dv, Dk]
            Iinv_neg = torch.div(minus_one, I, out=I)  # -1/I
            R_neg = M.mul_(Iinv_neg)  # -mu
            torch.matmul(neg_do[n][..., None, :], R_neg, out=dqs[n][..., None, :])  # mu^T do
            direct = 0  # -du . u: the uncertainty's share of <dMJ_t, [M, J]_t>
            if du is not None:
                qs2 = ch.qs[n] ** 2
                du_Iinv = (du[n][..., None, :] @ Iinv_neg).squeeze(-2)  # -(1/I)^T du
                dqs[n] -= 2 * ch.qs[n] * du_Iinv
                direct = (du_Iinv * qs2).sum(-1)
                extra = Iinv_neg * du[n][..., :, None] * qs2[..., None, :] * Iinv_neg
            dM = Iinv_neg.mul_(neg_do[n][..., :, None]).mul_(ch.qs[n][..., None, :])
            dJ = R_neg.mul_(dM)  # -mu * dM
            if du is not None:
                dJ -= extra
            sum_dJ = dJ.sum((-2, -1))  # [B, H, ns, c]
            # Sub-chunk start states: their direct use (row c of G is still 0), then back
            # through D to the sub-chunk sums E_j and to this chunk's start (the new carry).
            torch.matmul(into[n], G.flatten(-2), out=dS_sub)
            dS = dS_sub.view(B, H, ns, -1)
            torch.matmul(ch.D[n][:, :, :ns].transpose(-1, -2), dS, out=dE)
            dE.addcmul_(ch.D[n][:, :, ns, :, None], carry[:, :, None])
            carry = (ch.D_start[n][:, :, :ns] * dS).sum(2) + ch.D_start[n][:, :, ns] * carry
            G[:, :, :, :, c] = dE.view(G[:, :, :, :, c].shape)
            # dv_t = sum_s adj[s, t] G_s k_t;  dk_t = sum_s adj[s, t] G_s^T v_t  (and J alike).
            torch.matmul(G.flatten(-3, -2), kk_t[n], out=X.flatten(-3, -2))
            dvb[n] = X.mul_(adj[n][..., None, :]).sum(-3)
            torch.mul(adj[n].transpose(-1, -2)[..., None], vb[n][..., None, :], out=weights)
            torch.matmul(weights.flatten(-2), G.flatten(-3, -2), out=dkb[n])
            dG[n] = direct - prior_ * sum_dJ - (vb[n] * dvb[n].transpose(-1, -2)).sum((-3, -1))
            if dprior is not None:  # I_t = J_t + prior at every step
                dprior += sum_dJ.sum((0, 2, 3))

        dk = dkb[:, :, :, :, 1] + 2 * ch.kk[:, :, :, :, 0] * dkb[:, :, :, :, 0]
        dvb = dvb.transpose(-1, -2)  # [N, B, H, ns, 2, c, Dv]
        dG = dG.flatten(-2)  # [N, B, H, L]
        dG[-1, :, :, -1] += final_dot
        flat = lambda x: from_chunks(x.flatten(3, 4), T)  # noqa: E731 [N,B,H,ns,c,..] -> [B,T,H,..]
        dJ0, dM0 = carry.view(B, H, 2, Dv, Dk).unbind(2)
        return (flat(dqs) * ctx.scale, flat(dk), flat(dvb[:, :, :, :, 1]), flat(dvb[:, :, :, :, 0]),
                _reverse_cumsum(dG, T), dprior, dM0, dJ0, None, None, None)


def _reverse_cumsum(dG: torch.Tensor, T: int) -> torch.Tensor:
    """dG [N, B, H, L] per step -> [B, T, H]: sums over all steps >= t of the whole sequence."""
    N, B, H, L = dG.shape
    seq = dG.permute(1, 2, 0, 3).reshape(B, H, N * L)
    return seq.flip(-1).cumsum(-1).flip(-1)[:, :, :T].transpose(1, 2)
