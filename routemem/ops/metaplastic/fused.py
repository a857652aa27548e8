"""``mode="fused"``: metaplastic attention as one C++ scan per (batch, head), CPU only.

The chunked PyTorch form is bound by memory traffic: the elementwise M_t / I_t forces every step's
[Dv, Dk] states into memory, and each op is another pass over them. ``fused_kernel.cpp`` keeps the
two states of one head in cache and touches each cell a few times per step; its backward rebuilds
one chunk of states from the saved chunk-start states, as ``recompute.py`` does.

The kernel is compiled on first use (``routemem.ops.native``); ``available()`` says whether that
worked here. The other modes do not need it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from routemem.ops import native
from routemem.ops.metaplastic.chunk import linear_state

_P, _I, _F = native.POINTER, native.INT64, native.DOUBLE
KERNEL = native.Kernel(Path(__file__).with_name("fused_kernel.cpp"), "metaplastic", {
    "forward": [_P] * 8 + [_F] + [_I] * 6 + [native.INT] + [_P] * 3 + [_I] * 2,
    "backward": [_P] * 7 + [_F] + [_I] * 6 + [_P] * 12 + [_I] * 2,
})
available, applies_to = KERNEL.available, KERNEL.applies_to


class MetaplasticFusedFn(torch.autograd.Function):
    """(q, k, v, beta, log_alpha, prior [H], M0, J0, scale, with_uncertainty, chunk_size) ->
    (o, uncertainty or None, M_T, J_T); saves the inputs and the chunk-start states."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, chunk_size):
        q, k, v, beta, log_alpha, prior, M0, J0 = (
            x.contiguous() for x in (q, k, v, beta, log_alpha, prior, M0, J0))
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        N = -(-T // chunk_size)
        o = torch.empty_like(v)
        unc = torch.empty_like(v) if with_uncertainty else None
        starts = q.new_empty(B, H, N + 1, 2, Dv, Dk)
        kernel = KERNEL.function("forward", q.dtype)
        inputs = [native.pointer(x) for x in (q, k, v, beta, log_alpha, prior, M0, J0)]
        outputs = [native.pointer(x) for x in (o, unc, starts)]
        native.on_threads(lambda _, lo, hi: kernel(*inputs, scale, B, T, H, Dk, Dv, chunk_size,
                                                   int(with_uncertainty), *outputs, lo, hi),
                          B * H, native.worker_count(B * H))
        ctx.save_for_backward(q, k, v, beta, log_alpha, prior, starts)
        ctx.scale, ctx.chunk_size, ctx.with_uncertainty = scale, chunk_size, with_uncertainty
        return o, unc, starts[:, :, N, 0].clone(), starts[:, :, N, 1].clone()

    @staticmethod
    def backward(ctx, do, du, dM_T, dJ_T):
        q, k, v, beta, log_alpha, prior, starts = ctx.saved_tensors
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        do = torch.zeros_like(v) if do is None else do.contiguous()
        du = du.contiguous() if ctx.with_uncertainty and du is not None else None
        dM_T = None if dM_T is None else dM_T.contiguous()
        dJ_T = None if dJ_T is None else dJ_T.contiguous()
        dq, dk, dv, dbeta = (torch.empty_like(x) for x in (q, k, v, beta))
        dlog_alpha = torch.empty_like(log_alpha)
        dM0, dJ0 = q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk)
        dprior = q.new_empty(B, H)
        kernel = KERNEL.function("backward", q.dtype)
        inputs = [native.pointer(x) for x in (q, k, v, beta, log_alpha, prior, starts)]
        grads = [native.pointer(x)
                 for x in (do, du, dM_T, dJ_T, dq, dk, dv, dbeta, dlog_alpha, dM0, dJ0, dprior)]
        native.on_threads(lambda _, lo, hi: kernel(*inputs, ctx.scale, B, T, H, Dk, Dv,
                                                   ctx.chunk_size, *grads, lo, hi),
                          B * H, native.worker_count(B * H))
        return dq, dk, dv, dbeta, dlog_alpha, dprior.sum(0), dM0, dJ0, None, None, None


def metaplastic_fused(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty,
                      chunk_size):
    """Inputs checked by ``metaplastic_attention``; i_prior is a [H] tensor. Same returns as
    ``metaplastic_chunk``: (o, uncertainty or None, (mu, importance))."""
    if q.device.type != "cpu":
        raise ValueError(f"mode='fused' is a CPU kernel; the inputs are on {q.device} (use mode='chunk')")
    if q.dtype not in native.SUFFIX:
        raise ValueError(f"mode='fused' takes float32 or float64, got {q.dtype}")
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    M0, J0 = linear_state(initial_state, i_prior, q, (B, H, Dv, Dk))
    o, unc, M, J = MetaplasticFusedFn.apply(q, k, v, beta, log_alpha, i_prior, M0, J0, scale,
                                            with_uncertainty, chunk_size)
    importance = J + i_prior.view(1, H, 1, 1)
    return o, unc, (M / importance, importance)
