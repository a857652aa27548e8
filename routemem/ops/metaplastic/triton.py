"""``mode="triton"``: metaplastic attention as a Triton time scan (CUDA; the CPU through Triton's
interpreter, ``TRITON_INTERPRET=1``, which is how the tests run it without a GPU).

The state is elementwise per head, so there is no matmul form: each step is a rank-1 update of two
[Dv, Dk] states (M, the importance-weighted mean, and J = I - I_prior, the evidence) followed by a
reduction over Dk. One program owns one (batch, head, Dv tile): it holds its [BV, Dk] tile of both
states in registers, steps through time, and writes the outputs of its Dv rows. Dk is not split,
so each output's reduction stays inside the program; states are float32 whatever the inputs.

The forward saves both states every ``chunk_size`` steps. The backward walks the chunks in reverse:
it rebuilds a chunk's per-step states from its saved start into a scratch buffer of its own, then
runs the adjoint recurrence backwards through them (the same scheme as the CPU kernel, fused.py):

    gM_t = dM_t + alpha_{t+1} gM_{t+1},   gJ_t = dJ_t + alpha_{t+1} gJ_{t+1}
    dM_t = s do q^T / I,   dJ_t = dI_t = -s do q^T R / I - s^2 du (q^2)^T / I^2   (R = M / I)
    dv = gM k,  dbeta = gJ k^2,  dk = gM^T v + 2 k (gJ^T beta),  dq = s R^T do + 2 s^2 q (1/I)^T du
    dlog_alpha_t = alpha_t <gM_t, M_{t-1}> + alpha_t <gJ_t, J_{t-1}>,   dprior = sum_t sum dI_t

dq, dk, dlog_alpha and dprior sum over the Dv tiles of one head: those are float32 atomic adds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from routemem.ops.metaplastic.autograd import call_with_states, register_autograd

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton when the kernels are defined
BLOCK_V = 32  # Dv rows per program: with Dk <= 128, two [32, 128] float32 states fit in registers


def applies_to(x: Tensor) -> bool:
    """Whether the kernels run on tensors like ``x``: CUDA, or the CPU under the interpreter."""
    return x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETED)


@triton.jit
def _step_inputs(q, k, v, beta, log_alpha, row, rk, rv, mk, mv, Dk, Dv):
    """Step t's q, k [BK], v, beta [BV] and alpha, in float32 (``row`` = (b * T + t) * H + h)."""
    qt = tl.load(q + row * Dk + rk, mask=mk, other=0.0).to(tl.float32)
    kt = tl.load(k + row * Dk + rk, mask=mk, other=0.0).to(tl.float32)
    vt = tl.load(v + row * Dv + rv, mask=mv, other=0.0).to(tl.float32)
    bt = tl.load(beta + row * Dv + rv, mask=mv, other=0.0).to(tl.float32)
    alpha = tl.exp(tl.load(log_alpha + row).to(tl.float32))
    return qt, kt, vt, bt, alpha


@triton.jit
def _program_tile(H, Dk, Dv, BK: tl.constexpr, BV: tl.constexpr):
    """This program's (batch * H + head, batch, head), its Dk lanes and Dv rows with their masks, and
    the offsets and mask of its [BV, BK] tile within one head's [Dv, Dk] state."""
    bh = tl.program_id(0)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mk, mv = rk < Dk, rv < Dv
    return bh, bh // H, bh % H, rk, rv, mk, mv, rv[:, None] * Dk + rk[None, :], mv[:, None] & mk[None, :]


@triton.jit
def _forward_kernel(q, k, v, beta, log_alpha, prior, M0, J0, o, unc, starts, scale, T, H, Dk, Dv,
                    CHUNK: tl.constexpr, WITH_UNC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh, b, h, rk, rv, mk, mv, tile, in_tile = _program_tile(H, Dk, Dv, BK, BV)
    M = tl.load(M0 + bh * Dv * Dk + tile, mask=in_tile, other=0.0).to(tl.float32)
    J = tl.load(J0 + bh * Dv * Dk + tile, mask=in_tile, other=0.0).to(tl.float32)
    p = tl.load(prior + h).to(tl.float32)
    saved = starts + bh * (tl.cdiv(T, CHUNK) + 1) * 2 * Dv * Dk  # [chunks + 1, 2, Dv, Dk]
    tl.store(saved + tile, M, mask=in_tile)
    tl.store(saved + Dv * Dk + tile, J, mask=in_tile)
    for t in range(0, T):
        row = (b * T + t) * H + h
        qt, kt, vt, bt, alpha = _step_inputs(q, k, v, beta, log_alpha, row, rk, rv, mk, mv, Dk, Dv)
        M = alpha * M + vt[:, None] * kt[None, :]
        J = alpha * J + bt[:, None] * (kt * kt)[None, :]
        I = J + p
        tl.store(o + row * Dv + rv, tl.sum(M / I * qt[None, :], axis=1) * scale, mask=mv)
        if WITH_UNC:
            tl.store(unc + row * Dv + rv, tl.sum((qt * qt)[None, :] / I, axis=1) * (scale * scale), mask=mv)
        if ((t + 1) % CHUNK == 0) | (t + 1 == T):
            at = saved + tl.cdiv(t + 1, CHUNK) * 2 * Dv * Dk
            tl.store(at + tile, M, mask=in_tile)
            tl.store(at + Dv * Dk + tile, J, mask=in_tile)


@triton.jit
def _backward_kernel(q, k, v, beta, log_alpha, prior, starts, do, du, dM_T, dJ_T, scratch,
                     dq, dk, dv, dbeta, dlog_alpha, dprior, dM0, dJ0, scale, T, H, Dk, Dv,
                     CHUNK: tl.constexpr, WITH_DU: tl.constexpr, WITH_DM: tl.constexpr,
                     WITH_DJ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh, b, h, rk, rv, mk, mv, tile, in_tile = _program_tile(H, Dk, Dv, BK, BV)
    p = tl.load(prior + h).to(tl.float32)
    gM = tl.zeros([BV, BK], dtype=tl.float32)
    gJ = tl.zeros([BV, BK], dtype=tl.float32)
    if WITH_DM:
        gM = tl.load(dM_T + bh * Dv * Dk + tile, mask=in_tile, other=0.0).to(tl.float32)
    if WITH_DJ:
        gJ = tl.load(dJ_T + bh * Dv * Dk + tile, mask=in_tile, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(T, CHUNK)
    saved = starts + bh * (n_chunks + 1) * 2 * Dv * Dk
    # this program's scratch: the states before each step of one chunk, [CHUNK, 2, BV, BK]
    mine = scratch + (bh * tl.num_programs(1) + tl.program_id(1)) * CHUNK * 2 * BV * BK
    local = tl.arange(0, BV)[:, None] * BK + rk[None, :]
    dp = tl.zeros([BV, BK], dtype=tl.float32)
    for back in range(0, n_chunks):
        c = n_chunks - 1 - back
        t0 = c * CHUNK
        L = tl.minimum(T - t0, CHUNK)
        M = tl.load(saved + c * 2 * Dv * Dk + tile, mask=in_tile, other=0.0)
        J = tl.load(saved + c * 2 * Dv * Dk + Dv * Dk + tile, mask=in_tile, other=0.0)
        for i in range(0, L):  # rebuild the chunk: the state before each of its steps
            tl.store(mine + i * 2 * BV * BK + local, M)
            tl.store(mine + i * 2 * BV * BK + BV * BK + local, J)
            row = (b * T + t0 + i) * H + h
            qt, kt, vt, bt, alpha = _step_inputs(q, k, v, beta, log_alpha, row, rk, rv, mk, mv, Dk, Dv)
            M = alpha * M + vt[:, None] * kt[None, :]
            J = alpha * J + bt[:, None] * (kt * kt)[None, :]
        for j in range(0, L):  # and back through it
            i = L - 1 - j
            row = (b * T + t0 + i) * H + h
            qt, kt, vt, bt, alpha = _step_inputs(q, k, v, beta, log_alpha, row, rk, rv, mk, mv, Dk, Dv)
            M_prev = tl.load(mine + i * 2 * BV * BK + local)
            J_prev = tl.load(mine + i * 2 * BV * BK + BV * BK + local)
            M = alpha * M_prev + vt[:, None] * kt[None, :]
            I = alpha * J_prev + bt[:, None] * (kt * kt)[None, :] + p
            R = M / I
            do_t = tl.load(do + row * Dv + rv, mask=mv, other=0.0).to(tl.float32)
            dR = scale * do_t[:, None] * qt[None, :]
            gM += dR / I
            dI = -dR * R / I
            dq_t = scale * tl.sum(do_t[:, None] * R, axis=0)
            if WITH_DU:
                du_t = tl.load(du + row * Dv + rv, mask=mv, other=0.0).to(tl.float32)
                dI -= (scale * scale) * du_t[:, None] * (qt * qt)[None, :] / (I * I)
                dq_t += 2.0 * (scale * scale) * qt * tl.sum(du_t[:, None] / I, axis=0)
            dI = tl.where(in_tile, dI, 0.0)
            gJ += dI
            dp += dI
            tl.store(dv + row * Dv + rv, tl.sum(gM * kt[None, :], axis=1), mask=mv)
            tl.store(dbeta + row * Dv + rv, tl.sum(gJ * (kt * kt)[None, :], axis=1), mask=mv)
            dk_t = tl.sum(gM * vt[:, None], axis=0) + 2.0 * kt * tl.sum(gJ * bt[:, None], axis=0)
            tl.atomic_add(dq + row * Dk + rk, dq_t, mask=mk)
            tl.atomic_add(dk + row * Dk + rk, dk_t, mask=mk)
            tl.atomic_add(dlog_alpha + row, alpha * tl.sum(gM * M_prev + gJ * J_prev))
            gM = alpha * gM
            gJ = alpha * gJ
    tl.store(dM0 + bh * Dv * Dk + tile, gM, mask=in_tile)
    tl.store(dJ0 + bh * Dv * Dk + tile, gJ, mask=in_tile)
    tl.atomic_add(dprior + h, tl.sum(dp))


def _blocks(Dk: int, Dv: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(Dk)), min(BLOCK_V, max(16, triton.next_power_of_2(Dv)))


@triton_op("routemem::metaplastic_triton_forward", mutates_args=())
def triton_forward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, prior: Tensor,
                   M0: Tensor, J0: Tensor, scale: float, with_uncertainty: bool, chunk_size: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same signature and outputs as ``routemem::metaplastic_fused_forward``: (o, uncertainty (empty
    without with_uncertainty), M_T, J_T, the float32 chunk-start states [B, H, chunks + 1, 2, Dv, Dk])."""
    q, k, v, beta, log_alpha, prior, M0, J0 = (
        x.contiguous() for x in (q, k, v, beta, log_alpha, prior, M0, J0))
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = triton.cdiv(T, chunk_size)
    o = v.new_empty(v.shape)
    unc = v.new_empty(v.shape if with_uncertainty else 0)
    starts = q.new_empty(B, H, N + 1, 2, Dv, Dk, dtype=torch.float32)
    BK, BV = _blocks(Dk, Dv)
    wrap_triton(_forward_kernel)[(B * H, triton.cdiv(Dv, BV))](
        q, k, v, beta, log_alpha, prior, M0, J0, o, unc, starts, scale, T, H, Dk, Dv,
        CHUNK=chunk_size, WITH_UNC=with_uncertainty, BK=BK, BV=BV)
    M_T, J_T = (starts[:, :, N, i].to(q.dtype, copy=True) for i in (0, 1))  # outputs may not alias
    return o, unc, M_T, J_T, starts


@triton_op("routemem::metaplastic_triton_backward", mutates_args=())
def triton_backward(do: Tensor, du: Tensor | None, dM_T: Tensor | None, dJ_T: Tensor | None, q: Tensor,
                    k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, prior: Tensor, starts: Tensor,
                    scale: float, chunk_size: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> the gradients of (q, k, v, beta, log_alpha, prior, M0, J0). A None gradient is zero."""
    q, k, v, beta, log_alpha, prior, do = (x.contiguous() for x in (q, k, v, beta, log_alpha, prior, do))
    du, dM_T, dJ_T = (None if x is None else x.contiguous() for x in (du, dM_T, dJ_T))
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    BK, BV = _blocks(Dk, Dv)
    grid = (B * H, triton.cdiv(Dv, BV))
    f32 = dict(dtype=torch.float32)
    dq, dk = q.new_zeros(q.shape, **f32), q.new_zeros(q.shape, **f32)  # summed over Dv tiles
    dlog_alpha, dprior = q.new_zeros(log_alpha.shape, **f32), q.new_zeros(H, **f32)
    dv, dbeta = v.new_empty(v.shape, **f32), v.new_empty(v.shape, **f32)
    dM0, dJ0 = q.new_empty(B, H, Dv, Dk, **f32), q.new_empty(B, H, Dv, Dk, **f32)
    scratch = q.new_empty(grid[0] * grid[1] * chunk_size * 2 * BV * BK, **f32)
    wrap_triton(_backward_kernel)[grid](
        q, k, v, beta, log_alpha, prior, starts, do, du, dM_T, dJ_T, scratch,
        dq, dk, dv, dbeta, dlog_alpha, dprior, dM0, dJ0, scale, T, H, Dk, Dv,
        CHUNK=chunk_size, WITH_DU=du is not None, WITH_DM=dM_T is not None, WITH_DJ=dJ_T is not None,
        BK=BK, BV=BV)
    grads = (dq, dk, dv, dbeta, dlog_alpha, dprior, dM0, dJ0)
    likes = (q, k, v, beta, log_alpha, prior, q, q)
    return tuple(g.to(like.dtype) for g, like in zip(grads, likes))


register_autograd(triton_forward, triton_backward)


def metaplastic_triton(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty, chunk_size):
    """Inputs checked by ``metaplastic_attention``; i_prior is a [H] tensor. Same returns as
    ``metaplastic_chunk``: (o, uncertainty or None, (mu, importance))."""
    if not applies_to(q):
        raise ValueError(f"mode='triton' runs on CUDA (or on the CPU with TRITON_INTERPRET=1 set before "
                         f"routemem is imported); the inputs are on {q.device} (use mode='chunk')")
    return call_with_states(triton_forward, q, k, v, beta, log_alpha, i_prior, scale, initial_state,
                            with_uncertainty, chunk_size)
