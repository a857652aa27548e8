"""``mode="fused"``: metaplastic attention as one C++ scan per (batch, head), CPU only.

The chunked PyTorch form is bound by memory traffic: the elementwise M_t / I_t forces every step's
[Dv, Dk] states into memory, and each op is another pass over them. ``fused_kernel.cpp`` keeps the
two states of one head in cache and touches each cell a few times per step; its backward rebuilds
one chunk of states from the saved chunk-start states, as ``recompute.py`` does.

The kernel is compiled on first use (``routemem.ops.native``); ``available()`` says whether that
worked here. The other modes do not need it. Called through two torch.library ops
(``routemem::metaplastic_fused_forward`` / ``_backward``), so models using it compile whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from routemem.ops import native
from routemem.ops.metaplastic.autograd import call_with_states, register_autograd

_P, _I, _F = native.POINTER, native.INT64, native.DOUBLE
KERNEL = native.Kernel(Path(__file__).with_name("fused_kernel.cpp"), "metaplastic", {
    "forward": [_P] * 8 + [_F] + [_I] * 6 + [native.INT] + [_P] * 3 + [_I] * 2,
    "backward": [_P] * 7 + [_F] + [_I] * 6 + [_P] * 12 + [_I] * 2,
})
available, applies_to = KERNEL.available, KERNEL.applies_to


# The kernel as torch.library ops (docs/architecture.md, "Registering an op"): opaque to
# torch.compile (the fakes give the shapes), joined for autograd below. Custom ops cannot return
# None, so a forward without uncertainty returns an empty tensor in its place.
@torch.library.custom_op("routemem::metaplastic_fused_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, prior: Tensor,
             M0: Tensor, J0: Tensor, scale: float, with_uncertainty: bool, chunk_size: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, beta, log_alpha, prior [H], M0, J0) -> (o, uncertainty (empty without
    with_uncertainty), M_T, J_T, the chunk-start states [B, H, chunks + 1, 2, Dv, Dk] for backward)."""
    q, k, v, beta, log_alpha, prior, M0, J0 = (
        x.contiguous() for x in (q, k, v, beta, log_alpha, prior, M0, J0))
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = -(-T // chunk_size)
    o = v.new_empty(v.shape)
    unc = v.new_empty(v.shape if with_uncertainty else 0)
    starts = q.new_empty(B, H, N + 1, 2, Dv, Dk)
    kernel = KERNEL.function("forward", q.dtype)
    inputs = [native.pointer(x) for x in (q, k, v, beta, log_alpha, prior, M0, J0)]
    outputs = [native.pointer(x) for x in (o, unc if with_uncertainty else None, starts)]
    native.on_threads(lambda _, lo, hi: kernel(*inputs, scale, B, T, H, Dk, Dv, chunk_size,
                                               int(with_uncertainty), *outputs, lo, hi),
                      B * H, native.worker_count(B * H))
    return o, unc, starts[:, :, N, 0].clone(), starts[:, :, N, 1].clone(), starts


@_forward.register_fake
def _(q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, chunk_size):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = -(-T // chunk_size)
    unc = v.new_empty(v.shape if with_uncertainty else 0)
    return (v.new_empty(v.shape), unc, q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk),
            q.new_empty(B, H, N + 1, 2, Dv, Dk))


@torch.library.custom_op("routemem::metaplastic_fused_backward", mutates_args=())
def _backward(do: Tensor, du: Tensor | None, dM_T: Tensor | None, dJ_T: Tensor | None, q: Tensor,
              k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, prior: Tensor, starts: Tensor,
              scale: float, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> the gradients of (q, k, v, beta, log_alpha, prior [H], M0, J0). A None gradient is zero."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    do, du, dM_T, dJ_T = (None if x is None else x.contiguous() for x in (do, du, dM_T, dJ_T))
    q, k, v, beta, log_alpha, prior = (x.contiguous() for x in (q, k, v, beta, log_alpha, prior))
    dq, dk, dv, dbeta, dlog_alpha = (x.new_empty(x.shape) for x in (q, k, v, beta, log_alpha))
    dM0, dJ0 = q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk)
    dprior = q.new_empty(B, H)
    kernel = KERNEL.function("backward", q.dtype)
    inputs = [native.pointer(x) for x in (q, k, v, beta, log_alpha, prior, starts)]
    grads = [native.pointer(x)
             for x in (do, du, dM_T, dJ_T, dq, dk, dv, dbeta, dlog_alpha, dM0, dJ0, dprior)]
    native.on_threads(lambda _, lo, hi: kernel(*inputs, scale, B, T, H, Dk, Dv, chunk_size, *grads, lo, hi),
                      B * H, native.worker_count(B * H))
    return dq, dk, dv, dbeta, dlog_alpha, dprior.sum(0), dM0, dJ0


register_autograd(_forward, _backward)
forward_op, backward_op = _forward, _backward  # for opcheck in the tests


def metaplastic_fused(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty,
                      chunk_size):
    """Inputs checked by ``metaplastic_attention``; i_prior is a [H] tensor. Same returns as
    ``metaplastic_chunk``: (o, uncertainty or None, (mu, importance))."""
    if q.device.type != "cpu":
        raise ValueError(f"mode='fused' is a CPU kernel; the inputs are on {q.device} (use mode='chunk')")
    if q.dtype not in native.SUFFIX:
        raise ValueError(f"mode='fused' takes float32 or float64, got {q.dtype}")
    return call_with_states(_forward, q, k, v, beta, log_alpha, i_prior, scale, initial_state,
                            with_uncertainty, chunk_size)
