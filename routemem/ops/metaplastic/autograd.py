"""Autograd for the two metaplastic torch.library ops (the chunked recompute and the fused kernel):
both take (q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, chunk_size), return
(o, uncertainty, M_T, J_T, chunk-start states) and have a backward op of one signature, so one set
of functions gives either backward its shapes and joins either forward to its backward."""

from __future__ import annotations

import torch


def register_autograd(forward_op, backward_op) -> None:
    """Register ``backward_op``'s fake and ``forward_op``'s autograd: save the inputs and the
    chunk-start states; backward calls ``backward_op`` with the output gradients (a missing do is
    zero; du only where the forward computed the uncertainty)."""
    backward_op.register_fake(_gradient_shapes)

    def save(ctx, inputs, output):
        q, k, v, beta, log_alpha, prior, _, _, scale, with_uncertainty, chunk_size = inputs
        ctx.save_for_backward(q, k, v, beta, log_alpha, prior, output[4])
        ctx.scale, ctx.with_uncertainty, ctx.chunk_size = scale, with_uncertainty, chunk_size

    def differentiate(ctx, do, du, dM_T, dJ_T, _starts_grad):
        q, k, v, beta, log_alpha, prior, starts = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do
        du = du if ctx.with_uncertainty else None
        grads = backward_op(do, du, dM_T, dJ_T, q, k, v, beta, log_alpha, prior, starts, ctx.scale,
                            ctx.chunk_size)
        return *grads, None, None, None  # scale, with_uncertainty, chunk_size

    forward_op.register_autograd(differentiate, setup_context=save)


def _gradient_shapes(do, du, dM_T, dJ_T, q, k, v, beta, log_alpha, prior, starts, scale, chunk_size):
    """The backward ops' fake: contiguous gradients of (q, k, v, beta, log_alpha, prior, M0, J0)."""
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    return (*(x.new_empty(x.shape) for x in (q, k, v, beta, log_alpha, prior)),
            q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk))
